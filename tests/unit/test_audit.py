"""The audit chain over the real store: links, verification, tampering, two replicas."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from trustmesh.controlplane.audit import GENESIS, AuditLog, link, verify_events
from trustmesh.controlplane.store import AuditEvent, Store
from trustmesh.controlplane.store.kv import Delete

KEY = b"k" * 32
ATTACKER_KEY = b"x" * 32


class Clock:
    def __init__(self, start: float = 1_790_000_000.25) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.5
        return self.now


async def _log(store: Store, n: int = 5) -> AuditLog:
    log = AuditLog(store, KEY, clock=Clock())
    for i in range(n):
        await log.record("entry.create", actor="admin:local-socket", subject=f"spiffe://example.org/s{i}", n=i)
    return log


async def _rewrite(store: Store, seq: int, change: Callable[[dict[str, Any]], None]) -> None:
    raw = await store.raw_get(Store.audit_event_key(seq))
    assert raw is not None
    doc = json.loads(raw)
    change(doc)
    await store.raw_put(Store.audit_event_key(seq), json.dumps(doc).encode())


async def _delete(store: Store, seq: int) -> None:
    # The Store offers no way to delete an event (append-only); an attacker with access
    # to the backend could, so tamper through the backend itself.
    await store._kv.txn([], [Delete(Store.audit_event_key(seq))])  # noqa: SLF001


async def _broken(log: AuditLog, seq: int, words: str) -> None:
    result = await log.verify()
    assert not result.ok, result
    assert result.first_broken_seq == seq, result
    assert words in result.reason, result
    assert result.checked == seq - 1, "everything before the break was checked and held"


# --- the chain --------------------------------------------------------------------------------------


async def test_events_form_a_chain_that_verifies(store: Store) -> None:
    log = await _log(store)
    events = await store.list_audit_events()
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
    assert len({e.hash for e in events}) == 5
    assert [e.details for e in events] == [{"n": i} for i in range(5)]
    assert [e.subject for e in events] == [f"spiffe://example.org/s{i}" for i in range(5)]
    assert all(e.outcome == "ok" and e.kind == "entry.create" for e in events)
    assert await store.get_audit_head() == events[-1]
    for e in events:
        assert e.hash == link(KEY, e.seq, e.time, e.kind, e.actor, e.subject, e.outcome, e.details, e.prev_hash)
    result = await log.verify()
    assert result.ok and result.checked == 5 and result.first_broken_seq == 0


async def test_record_returns_what_was_stored(store: Store) -> None:
    log = AuditLog(store, KEY, clock=Clock())
    event = await log.record("connection.deny", actor="agent:node-1", subject="spiffe://example.org/ledger",
                             outcome="denied", source="spiffe://example.org/frontend", port=9443,
                             tags=("a", "b"), nested={"z": 1, "a": [1.5, None]}, note="naïve ✓")
    assert event == await store.get_audit_event(1)
    assert event.details == {"source": "spiffe://example.org/frontend", "port": 9443, "tags": ["a", "b"],
                             "nested": {"z": 1, "a": [1.5, None]}, "note": "naïve ✓"}
    assert event.outcome == "denied"
    assert (await log.verify()).ok


@pytest.mark.parametrize("clock", [lambda: 1_790_000_000, lambda: 1_790_000_000.1234567891],
                         ids=["int-clock", "sub-microsecond-clock"])
async def test_any_clock_value_gives_a_chain_that_verifies(store: Store, clock: Callable[[], float]) -> None:
    # The store hands time back as a float: an int clock must not look like an edit later.
    log = AuditLog(store, KEY, clock=clock)
    for i in range(3):
        await log.record("svid.issue", actor="r1", i=i)
    result = await AuditLog(store, KEY).verify()
    assert result.ok and result.checked == 3, result


async def test_a_fresh_instance_continues_the_chain(store: Store) -> None:
    await _log(store, 3)
    restarted = AuditLog(store, KEY, clock=Clock())
    event = await restarted.record("server.start", actor="server")
    assert event.seq == 4 and event.prev_hash == (await store.get_audit_event(3)).hash
    assert (await restarted.verify()).checked == 4


async def test_empty_log_verifies(store: Store) -> None:
    result = await AuditLog(store, KEY).verify()
    assert result.ok and result.checked == 0 and result.first_broken_seq == 0


async def test_verify_pages_through_a_long_chain(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import trustmesh.controlplane.audit as audit

    monkeypatch.setattr(audit, "_PAGE", 3)
    log = await _log(store, 10)
    result = await log.verify()
    assert result.ok and result.checked == 10
    await _rewrite(store, 7, lambda d: d.update(actor="someone-else"))
    await _broken(log, 7, "edited")


# --- tampering ------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    lambda d: d.update(subject="spiffe://example.org/evil"),
    lambda d: d.update(outcome="denied"),
    lambda d: d.update(time=d["time"] + 1),
    lambda d: d["details"].update(n=99),
    lambda d: d.update(kind="entry.delete"),
], ids=["subject", "outcome", "time", "details", "kind"])
async def test_an_edited_event_is_named(store: Store, change: Callable[[dict[str, Any]], None]) -> None:
    log = await _log(store)
    await _rewrite(store, 3, change)
    await _broken(log, 3, "edited")


async def test_an_edited_first_event_is_named(store: Store) -> None:
    log = await _log(store)
    await _rewrite(store, 1, lambda d: d.update(actor="nobody"))
    await _broken(log, 1, "edited")


async def test_an_event_overwritten_with_garbage_is_named(store: Store) -> None:
    log = await _log(store)
    await store.raw_put(Store.audit_event_key(3), b"\x00not an event")
    await _broken(log, 3, "unreadable")


async def test_a_removed_middle_event_is_named(store: Store) -> None:
    log = await _log(store)
    await _delete(store, 3)
    await _broken(log, 3, "missing")


async def test_a_removed_event_with_the_rest_renumbered_is_named(store: Store) -> None:
    # Delete 3 and move 4 and 5 down so the numbering has no gap: the links still break.
    log = await _log(store)
    for seq in (4, 5):
        raw = await store.raw_get(Store.audit_event_key(seq))
        assert raw
        doc = json.loads(raw)
        doc["seq"] = seq - 1
        await store.raw_put(Store.audit_event_key(seq - 1), json.dumps(doc).encode())
    await _delete(store, 5)
    await store.raw_put("audit/head", (await store.raw_get(Store.audit_event_key(4))) or b"")
    result = await log.verify()
    assert not result.ok and result.first_broken_seq == 3, result


async def test_a_removed_last_event_is_detected_by_the_head(store: Store) -> None:
    log = await _log(store)
    await _delete(store, 5)
    result = await log.verify()
    assert not result.ok and result.first_broken_seq == 5 and "removed from the end" in result.reason
    assert result.checked == 4


async def test_a_forged_head_is_detected(store: Store) -> None:
    # Instead of deleting an event: make the head claim a 6th event that was never written.
    log = await _log(store)
    head = await store.get_audit_head()
    assert head is not None
    forged = AuditEvent(seq=6, time=head.time + 1, kind="x", actor="x", subject="", outcome="ok", details={},
                        prev_hash=head.hash, hash="f" * 64)
    await store.raw_put("audit/head", forged.to_json())
    result = await log.verify()
    assert not result.ok and result.first_broken_seq == 6 and "head names event 6" in result.reason
    assert result.checked == 5


async def test_a_removed_head_is_detected(store: Store) -> None:
    log = await _log(store)
    await store._kv.txn([], [Delete("audit/head")])  # noqa: SLF001
    result = await log.verify()
    assert not result.ok and result.first_broken_seq == 6


async def test_an_unreadable_head_is_detected(store: Store) -> None:
    log = await _log(store)
    await store.raw_put("audit/head", b"{}")
    result = await log.verify()
    assert not result.ok and result.first_broken_seq == 6 and "head" in result.reason


async def test_an_event_written_past_the_head_is_detected(store: Store) -> None:
    log = await _log(store, 3)
    head = await store.get_audit_head()
    assert head is not None
    extra = AuditEvent(seq=4, time=head.time + 1, kind="x", actor="x", subject="", outcome="ok", details={},
                       prev_hash=head.hash,
                       hash=link(ATTACKER_KEY, 4, head.time + 1, "x", "x", "", "ok", {}, head.hash))
    await store.raw_put(Store.audit_event_key(4), extra.to_json())
    await _broken(log, 4, "edited")


async def test_swapped_events_are_detected(store: Store) -> None:
    log = await _log(store)
    a = await store.raw_get(Store.audit_event_key(2))
    b = await store.raw_get(Store.audit_event_key(3))
    assert a and b
    await store.raw_put(Store.audit_event_key(2), b)
    await store.raw_put(Store.audit_event_key(3), a)
    await _broken(log, 2, "moved")


async def test_a_duplicated_event_is_detected(store: Store) -> None:
    log = await _log(store)
    a = await store.raw_get(Store.audit_event_key(2))
    assert a
    await store.raw_put(Store.audit_event_key(3), a)
    await _broken(log, 3, "reordered")


async def test_a_reforged_chain_with_plain_sha256_is_detected(store: Store) -> None:
    log = await _log(store, 4)
    # An attacker edits event 2 and recomputes every later link with plain sha256 (no key).
    prev = (await store.get_audit_event(1)).hash
    for seq in (2, 3, 4):
        raw = await store.raw_get(Store.audit_event_key(seq))
        assert raw
        doc = json.loads(raw)
        if seq == 2:
            doc["subject"] = "spiffe://example.org/evil"
        doc["prev_hash"] = prev
        body = {k: v for k, v in doc.items() if k not in ("hash", "v")}
        doc["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        await store.raw_put(Store.audit_event_key(seq), json.dumps(doc).encode())
        prev = doc["hash"]
    await store.raw_put("audit/head", (await store.raw_get(Store.audit_event_key(4))) or b"")
    await _broken(log, 2, "edited")


async def test_a_chain_reforged_with_another_key_is_detected(store: Store) -> None:
    log = await _log(store, 4)
    # An attacker who knows the link format but not the key re-links from event 2 with their own.
    prev = (await store.get_audit_event(1)).hash
    for seq in (2, 3, 4):
        ev = await store.get_audit_event(seq)
        subject = "spiffe://example.org/evil" if seq == 2 else ev.subject
        forged = AuditEvent(seq=seq, time=ev.time, kind=ev.kind, actor=ev.actor, subject=subject,
                            outcome=ev.outcome, details=ev.details, prev_hash=prev,
                            hash=link(ATTACKER_KEY, seq, ev.time, ev.kind, ev.actor, subject, ev.outcome,
                                      ev.details, prev))
        await store.raw_put(Store.audit_event_key(seq), forged.to_json())
        prev = forged.hash
    await store.raw_put("audit/head", forged.to_json())
    await _broken(log, 2, "edited")
    # The same forged chain does verify under the attacker's key: only the key makes the difference.
    assert not (await AuditLog(store, ATTACKER_KEY).verify()).ok  # event 1 is still ours
    assert verify_events(ATTACKER_KEY, (await store.list_audit_events())[1:],
                         prev_hash=(await store.get_audit_event(1)).hash, expect_seq=2).ok


async def test_another_key_rejects_an_intact_log(store: Store) -> None:
    await _log(store, 3)
    result = await AuditLog(store, ATTACKER_KEY).verify()
    assert not result.ok and result.first_broken_seq == 1 and result.checked == 0


# --- replicas -----------------------------------------------------------------------------------


async def test_two_replicas_extend_one_chain(store: Store) -> None:
    a, b = AuditLog(store, KEY), AuditLog(store, KEY)
    await asyncio.gather(*(log.record("svid.issue", actor=f"replica-{name}", i=i)
                           for i in range(20) for name, log in (("a", a), ("b", b))))
    events = await store.list_audit_events()
    assert [e.seq for e in events] == list(range(1, 41))
    assert sorted((e.actor, e.details["i"]) for e in events) == sorted(
        (f"replica-{n}", i) for n in "ab" for i in range(20)), "every record landed exactly once"
    assert events[0].prev_hash == GENESIS
    assert all(y.prev_hash == x.hash for x, y in zip(events, events[1:], strict=False))
    for log in (a, b):
        result = await log.verify()
        assert result.ok and result.checked == 40
    # Each replica keeps appending correctly after the race.
    assert (await a.record("after", actor="replica-a")).seq == 41
    assert (await b.record("after", actor="replica-b")).seq == 42
    assert (await a.verify()).checked == 42


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        AuditLog(None, b"short")  # type: ignore[arg-type]
