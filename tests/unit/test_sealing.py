"""Record MACs (store/sealing.py) and the replay guard (replay.py) over a real SQLite store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.server_runtime import audit_events, server_runtime
from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.integrity import FAILURE_EVENT, IntegrityMonitor
from trustmesh.controlplane.replay import ReplayGuard
from trustmesh.controlplane.store import AttestedNode, JoinToken, NodeChanged, Store, open_store
from trustmesh.controlplane.store.sealing import IntegrityFailure, RecordIntegrityError, RecordSealer, split
from trustmesh.controlplane.store.store import SEALED_KINDS
from trustmesh.spiffeid import SpiffeId

KEK = KeyEncryptionKey(bytes(range(32)))
SEALER = RecordSealer(KEK.derive, SEALED_KINDS)


@given(key=st.sampled_from(["entries/a", "nodes/spiffe://x/agent/n", "tokens/ab", "policy/revisions/1"]),
       payload=st.binary(max_size=512))
def test_a_sealed_record_opens_and_any_change_of_content_or_key_is_refused(key: str, payload: bytes) -> None:
    sealed = SEALER.seal(key, payload)
    assert SEALER.open(key, sealed) == payload
    assert split(sealed) == (payload, sealed[-64:])
    with pytest.raises(RecordIntegrityError, match="no MAC|does not match"):
        SEALER.open(key, payload + b"x")
    with pytest.raises(RecordIntegrityError, match="does not match"):
        SEALER.open(key + "2", sealed)  # moved under another key of the same kind
    flipped = bytearray(sealed)
    flipped[0 if payload else -1] ^= 1
    with pytest.raises(RecordIntegrityError):
        SEALER.open(key, bytes(flipped))


def test_kinds_have_their_own_keys_and_unsealed_kinds_pass_through() -> None:
    sealed = SEALER.seal("entries/x", b"{}")
    assert SEALER.seal("tokens/x", b"{}") != sealed  # same bytes, another kind: another MAC
    assert SEALER.kind_of("entry-index/abc") == "entry-index"
    assert SEALER.kind_of("policy/revisions/00000000000000000001") == "policy-revision"
    for key in ("audit/events/00000000000000000001", "audit/head", "ca/journal", "leader/duties"):
        assert SEALER.kind_of(key) is None and SEALER.seal(key, b"v") == b"v"
    other = RecordSealer(KeyEncryptionKey(bytes(32)).derive, SEALED_KINDS)
    with pytest.raises(RecordIntegrityError):
        other.open("entries/x", sealed)  # another KEK


async def _sealed_store(tmp_path: Path, failures: list[IntegrityFailure]) -> Store:
    store = await open_store("sqlite", tmp_path)

    async def hook(failure: IntegrityFailure) -> None:
        failures.append(failure)

    async def yes() -> bool:
        return True

    assert await store.seal_records(KEK.derive, hook, may_upgrade=yes) == 0
    return store


async def test_reads_leave_out_records_without_a_valid_mac_and_writes_still_compare(tmp_path: Path) -> None:
    failures: list[IntegrityFailure] = []
    store = await _sealed_store(tmp_path, failures)
    now = time.time()
    await store.create_join_token(JoinToken("a" * 64, "node-1", now + 60, now))
    await store.raw_put("tokens/" + "b" * 64, JoinToken("b" * 64, "node-2", now + 60, now).to_json())
    assert [t.token_hash for t in await store.list_join_tokens()] == ["a" * 64]
    with pytest.raises(Exception, match="does not exist"):
        await store.get_join_token("b" * 64)
    assert {(f.kind, f.key) for f in failures} == {("join-token", "tokens/" + "b" * 64)}
    # A value compare (the policy head's CAS) still holds on sealed values.
    await store.append_policy_revision("a: 1", "me", "", now, expected_head=0)
    await store.append_policy_revision("a: 2", "me", "", now, expected_head=1)
    assert (head := await store.get_policy_head()) is not None and head.revision == 2
    checked, bad = await store.check_records()
    assert checked == 6 and [f.key for f in bad] == ["tokens/" + "b" * 64]  # 2 tokens, 2 revisions, head, marker
    await store.close()


async def test_the_watch_leaves_out_a_forged_record(tmp_path: Path) -> None:
    failures: list[IntegrityFailure] = []
    store = await _sealed_store(tmp_path, failures)
    start = await store.current_revision()
    node = AttestedNode(SpiffeId.parse("spiffe://example.org/agent/n"), "n", "join_token", "01", 1e10, False, 1, 1)
    await store.raw_put("nodes/spiffe://example.org/agent/forged", node.to_json())
    await store.create_attested_node(node)
    batches = store.watch(start)
    changes = await asyncio.wait_for(anext(batches), 5)
    await batches.aclose()
    assert [(type(c), c.key) for c in changes] == [(NodeChanged, "spiffe://example.org/agent/n")]
    assert [f.key for f in failures] == ["nodes/spiffe://example.org/agent/forged"]
    await store.close()


async def test_the_replay_guard_holds_one_way_facts_from_the_audit_chain(tmp_path: Path) -> None:
    failures: list[IntegrityFailure] = []
    store = await _sealed_store(tmp_path, failures)

    async def hook(failure: IntegrityFailure) -> None:
        failures.append(failure)

    guard = ReplayGuard(hook)
    store.replay = guard
    now = time.time()
    node = AttestedNode(SpiffeId.parse("spiffe://example.org/agent/n"), "n", "join_token", "01", 1e10, False, now, now)
    await store.create_attested_node(node)
    old_node = await store.raw_get("nodes/spiffe://example.org/agent/n")
    for n in (1, 2, 3):
        await store.append_policy_revision(f"a: {n}", "me", "", now, expected_head=n - 1)
    old_head = await store.raw_get("policy/head")
    await store.append_policy_revision("a: 4", "me", "", now, expected_head=3)
    audit = AuditLog(store, KEK.derive("audit-chain"))
    await audit.record("agent.ban", actor="me", subject=str(node.spiffe_id))
    await audit.record("policy.apply", actor="me", subject="policy", revision=4)
    assert guard.banned == {str(node.spiffe_id)} and guard.policy_revision == 4
    # Put back the validly sealed records from before the ban and before revision 4.
    assert old_node is not None and old_head is not None
    await store.raw_put("nodes/spiffe://example.org/agent/n", old_node)
    await store.raw_put("policy/head", old_head)
    assert (await store.get_attested_node(node.spiffe_id)).banned
    assert (head := await store.get_policy_head()) is not None and head.revision == 4
    await asyncio.sleep(0)  # the reports are scheduled
    assert {f.kind for f in failures} == {"node", "policy-head"}
    # A fresh guard learns the same facts from the chain alone.
    fresh = ReplayGuard(hook)
    assert await fresh.load(lambda s, n: store.list_audit_events(since_seq=s, limit=n)) == 2
    assert fresh.banned == guard.banned and fresh.policy_revision == 4
    await store.close()


async def test_integrity_failures_are_audited_once_per_record_and_at_most_60_a_minute(tmp_path: Path) -> None:
    async with server_runtime(tmp_path) as rt:
        now = [1000.0]
        monitor = IntegrityMonitor(rt.metrics, clock=lambda: now[0])
        monitor.audit = rt.audit
        for i in range(100):
            await monitor(IntegrityFailure("entry", f"entries/{i}", "it carries no MAC"))
        for _ in range(3):
            await monitor(IntegrityFailure("entry", "entries/0", "it carries no MAC"))  # read again: not again
        assert len(await audit_events(rt, FAILURE_EVENT)) == 60
        now[0] += 61
        await monitor(IntegrityFailure("node", "nodes/x", "its MAC does not match its key and content"))
        events = await audit_events(rt, FAILURE_EVENT)
        assert len(events) == 61 and events[-1].details["others_not_audited"] == 40
        assert events[-1].outcome == "denied" and events[-1].subject == "nodes/x"
        text = rt.metrics.render()
        assert 'trustmesh_store_integrity_failures_total{kind="entry"} 103.0' in text


async def test_an_evicted_attestation_put_back_cannot_renew(tmp_path: Path) -> None:
    failures: list[IntegrityFailure] = []
    store = await _sealed_store(tmp_path, failures)

    async def hook(failure: IntegrityFailure) -> None:
        failures.append(failure)

    store.replay = ReplayGuard(hook)
    node = AttestedNode(SpiffeId.parse("spiffe://example.org/agent/m"), "m", "join_token", "0a", 1e10, False, 1, 1)
    await store.create_attested_node(node)
    kept = await store.raw_get("nodes/spiffe://example.org/agent/m")
    await store.delete_attested_node(node.spiffe_id)
    await AuditLog(store, KEK.derive("audit-chain")).record(
        "agent.evict", actor="me", subject=str(node.spiffe_id), cert_serial="0a")
    assert kept is not None
    await store.raw_put("nodes/spiffe://example.org/agent/m", kept)
    back = await store.get_attested_node(node.spiffe_id)
    assert back.cert_serial == "" and not back.superseded  # no SVID of it matches any more
    await asyncio.sleep(0)
    assert [f.kind for f in failures] == ["node"] and "evicted" in failures[0].reason
    await store.close()
