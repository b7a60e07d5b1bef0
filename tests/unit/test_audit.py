"""The audit chain over the real store: links, verification, tampering, two replicas."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.audit import GENESIS, AuditLog
from controlplane.store import Store, open_store

KEY = b"k" * 32




async def _log(store: Store, n: int = 5) -> AuditLog:
    log = AuditLog(store, KEY)
    for i in range(n):
        await log.record("entry.create", actor="admin:local-socket", subject=f"spiffe://example.org/s{i}", n=i)
    return log


async def _rewrite(store: Store, seq: int, change: object) -> None:
    raw = await store.raw_get(Store.audit_event_key(seq))
    assert raw is not None
    doc = json.loads(raw)
    change(doc)  # type: ignore[operator]
    await store.raw_put(Store.audit_event_key(seq), json.dumps(doc).encode())


async def test_events_form_a_chain_that_verifies(store: Store) -> None:
    log = await _log(store)
    events = await store.list_audit_events()
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:]))
    result = await log.verify()
    assert result.ok and result.checked == 5


async def test_empty_log_verifies(store: Store) -> None:
    result = await AuditLog(store, KEY).verify()
    assert result.ok and result.checked == 0


async def test_an_edited_event_is_named(store: Store) -> None:
    log = await _log(store)
    await _rewrite(store, 3, lambda d: d.update(subject="spiffe://example.org/evil"))
    result = await log.verify()
    assert not result.ok and result.first_broken_seq == 3 and "edited" in result.reason


async def test_a_removed_middle_event_is_named(store: Store) -> None:
    log = await _log(store)
    # Remove event 3 by moving 4 and 5 down would need a rewrite; a plain deletion leaves a gap.
    from controlplane.store.kv import Delete

    await store._kv.txn([], [Delete(Store.audit_event_key(3))])  # noqa: SLF001 - tampering on purpose
    result = await log.verify()
    assert not result.ok and result.first_broken_seq == 3 and "missing" in result.reason


async def test_a_removed_last_event_is_detected_by_the_head(store: Store) -> None:
    log = await _log(store)
    from controlplane.store.kv import Delete

    await store._kv.txn([], [Delete(Store.audit_event_key(5))])  # noqa: SLF001
    result = await log.verify()
    assert not result.ok and "removed from the end" in result.reason


async def test_swapped_events_are_detected(store: Store) -> None:
    log = await _log(store)
    a = await store.raw_get(Store.audit_event_key(2))
    b = await store.raw_get(Store.audit_event_key(3))
    assert a and b
    await store.raw_put(Store.audit_event_key(2), b)
    await store.raw_put(Store.audit_event_key(3), a)
    result = await log.verify()
    assert not result.ok and result.first_broken_seq == 2


async def test_a_reforged_chain_without_the_key_is_detected(store: Store) -> None:
    log = await _log(store, 3)
    # An attacker edits event 2 and recomputes every link with plain sha256 (no key).
    prev = (await store.get_audit_event(1)).hash
    for seq in (2, 3):
        raw = await store.raw_get(Store.audit_event_key(seq))
        assert raw
        doc = json.loads(raw)
        if seq == 2:
            doc["subject"] = "spiffe://example.org/evil"
        doc["prev_hash"] = prev
        doc["hash"] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        await store.raw_put(Store.audit_event_key(seq), json.dumps(doc).encode())
        prev = doc["hash"]
    result = await log.verify()
    assert not result.ok and result.first_broken_seq == 2
    # The same log verified with another key fails at the first event.
    assert (await AuditLog(store, b"x" * 32).verify()).first_broken_seq == 1


async def test_two_replicas_extend_one_chain(store: Store) -> None:
    a, b = AuditLog(store, KEY), AuditLog(store, KEY)
    await asyncio.gather(*(log.record("svid.issue", actor=f"replica-{name}", i=i)
                           for i in range(20) for name, log in (("a", a), ("b", b))))
    events = await store.list_audit_events()
    assert [e.seq for e in events] == list(range(1, 41))
    assert {e.actor for e in events} == {"replica-a", "replica-b"}
    result = await a.verify()
    assert result.ok and result.checked == 40


def test_a_short_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        AuditLog(None, b"short")  # type: ignore[arg-type]
