"""The Store contract, run unchanged over SQLite and a real etcd.

Every refusal path is checked as hard as the happy path: after a refused write, the test
looks at what is stored (records and index keys) to prove nothing was half-written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.etcd_process import free_port
from trustmesh.controlplane.store import (
    AttestedNode,
    AuditEvent,
    BundleRecord,
    Change,
    CompactedError,
    InvalidRecordError,
    JoinToken,
    PolicyRevision,
    RecordFormatError,
    RegistrationEntry,
    Store,
    open_store,
)
from trustmesh.controlplane.store.etcd import EtcdKV, parse_endpoints
from trustmesh.controlplane.store.records import (
    AuditAppended,
    BundleChanged,
    CaChanged,
    EntryChanged,
    FederationChanged,
    FederationRecord,
    NodeChanged,
    PartnerCertificate,
    PartnerChanged,
    PolicyChanged,
    TokenChanged,
)
from trustmesh.controlplane.store.store import ENTRY_INDEX, entry_identity_key
from trustmesh.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
)
from trustmesh.selectors import Selector
from trustmesh.spiffeid import SpiffeId, TrustDomain

WAIT = 10.0
TD = "spiffe://example.org"


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s = await open_store("sqlite", tmp_path)
    else:
        url = request.getfixturevalue("etcd_server")
        s = await open_store(url, tmp_path, etcd_namespace=f"/test-{uuid.uuid4().hex}/")
    try:
        yield s
    finally:
        await s.close()


def _typed(fields: dict[str, object]) -> dict[str, object]:
    """Records hold parsed values; the tests name them as text, as an admin would."""
    out = dict(fields)
    for name in ("spiffe_id", "parent_id"):
        if isinstance(out.get(name), str):
            out[name] = SpiffeId.parse(str(out[name]))
    selectors = out.get("selectors", ())
    assert isinstance(selectors, tuple)
    out["selectors"] = tuple(Selector.parse(s) if isinstance(s, str) else s for s in selectors)
    if "federates_with" in out:
        federates_with = out["federates_with"]
        assert isinstance(federates_with, tuple)
        out["federates_with"] = tuple(TrustDomain.parse(t) if isinstance(t, str) else t for t in federates_with)
    return out


def entry(id: str = "e1", **kw: object) -> RegistrationEntry:
    fields: dict[str, object] = dict(
        id=id,
        spiffe_id=f"{TD}/payments",
        parent_id=f"{TD}/agent/node-1",
        selectors=("unix:uid:1000",),
        x509_ttl=3600,
        jwt_ttl=300,
        dns_names=("payments.internal",),
        federates_with=(),
        admin=False,
        created_at=1000.0,
        updated_at=1000.0,
    )
    fields.update(kw)
    return RegistrationEntry(**_typed(fields))  # type: ignore[arg-type]


def node(name: str = "node-1", **kw: object) -> AttestedNode:
    fields: dict[str, object] = dict(
        spiffe_id=f"{TD}/agent/{name}",
        node_name=name,
        attestation_type="join_token",
        cert_serial="01ab",
        cert_not_after=5000.0,
        banned=False,
        created_at=1000.0,
        updated_at=1000.0,
        selectors=("node:name:" + name,),
    )
    fields.update(kw)
    return AttestedNode(**_typed(fields))  # type: ignore[arg-type]


def token(hash_: str = "h1", expires_at: float = 2000.0) -> JoinToken:
    return JoinToken(token_hash=hash_, node_name="node-1", expires_at=expires_at, created_at=1000.0)


def audit(seq: int, prev_hash: str, actor: str = "admin") -> AuditEvent:
    digest = hashlib.sha256(f"{seq}{prev_hash}{actor}".encode()).hexdigest()
    return AuditEvent(
        seq=seq,
        time=1000.0 + seq,
        kind="entry.create",
        actor=actor,
        subject=f"{TD}/payments",
        outcome="ok",
        details={"z": 1, "a": [1, 2]},
        prev_hash=prev_hash,
        hash=digest,
    )


async def index_keys(store: Store) -> list[str]:
    kv = store._kv  # the contract checks what is physically stored
    return [x.key for x in await kv.range(ENTRY_INDEX)]


# -- records ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        entry(federates_with=("spiffe://partner.example",), admin=True),
        node(banned=True),
        token(),
        PolicyRevision(3, "kind: Allowlist\n", "alice", "why", 1.5, "ab" * 32),
        BundleRecord(TrustDomain("partner.example"), b'{"keys":[]}\xff', 7, 12.25),
        audit(1, "0" * 64),
    ],
)
def test_records_round_trip_through_stable_json(record: object) -> None:
    data = record.to_json()  # type: ignore[attr-defined]
    assert b'"v":1' in data
    again = type(record).from_json(data)  # type: ignore[attr-defined]
    assert again == record
    assert again.to_json() == data  # stable bytes


def test_audit_details_are_stored_sorted() -> None:
    data = audit(1, "").to_json()
    assert data.index(b'"a"') < data.index(b'"z"')


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b'{"v":2}', b'{"v":1}', b'{"v":1,"token_hash":1}'],
)
def test_bad_record_bytes_are_refused_clearly(data: bytes) -> None:
    with pytest.raises(RecordFormatError, match="join token"):
        JoinToken.from_json(data)


def test_a_bool_is_not_a_ttl() -> None:
    data = entry().to_json().replace(b'"x509_ttl":3600', b'"x509_ttl":true')
    with pytest.raises(RecordFormatError, match="x509_ttl"):
        RegistrationEntry.from_json(data)


# -- registration entries --------------------------------------------------------------


async def test_entry_crud(store: Store) -> None:
    created = await store.create_entry(entry())
    assert created.revision > 0
    got = await store.get_entry("e1")
    assert got == created
    updated = await store.update_entry(replace(got, x509_ttl=60, updated_at=2000.0))
    assert updated.revision > created.revision
    assert (await store.get_entry("e1")).x509_ttl == 60
    await store.delete_entry("e1")
    with pytest.raises(NotFoundError, match="e1"):
        await store.get_entry("e1")
    assert await index_keys(store) == []


async def test_list_entries_filters_by_parent(store: Store) -> None:
    await store.create_entry(entry("a"))
    await store.create_entry(entry("b", parent_id=f"{TD}/agent/node-2"))
    await store.create_entry(entry("c", spiffe_id=f"{TD}/ledger"))
    assert [e.id for e in await store.list_entries()] == ["a", "b", "c"]
    assert [e.id for e in await store.list_entries(parent_id=f"{TD}/agent/node-1")] == ["a", "c"]
    assert await store.list_entries(parent_id=f"{TD}/agent/none") == []


async def test_entry_with_the_same_id_is_refused(store: Store) -> None:
    await store.create_entry(entry())
    with pytest.raises(AlreadyExistsError, match="'e1' already exists"):
        await store.create_entry(entry(spiffe_id=f"{TD}/other"))
    assert (await store.get_entry("e1")).spiffe_id == SpiffeId.parse(f"{TD}/payments")
    assert len(await index_keys(store)) == 1


async def test_duplicate_entry_identity_is_refused_and_leaves_nothing(store: Store) -> None:
    first = await store.create_entry(entry("first", selectors=("unix:uid:1000", "unix:gid:5")))
    # Same spiffe_id, parent and selector set (other order): a duplicate.
    with pytest.raises(AlreadyExistsError, match="'first' already registers"):
        await store.create_entry(entry("second", selectors=("unix:gid:5", "unix:uid:1000")))
    with pytest.raises(NotFoundError):
        await store.get_entry("second")
    assert await index_keys(store) == [entry_identity_key(first)]
    # A different selector set is a different entry.
    await store.create_entry(entry("third", selectors=("unix:uid:1001",)))
    assert len(await index_keys(store)) == 2


async def test_update_moves_the_uniqueness_claim(store: Store) -> None:
    a = await store.create_entry(entry("a"))
    await store.update_entry(replace(a, selectors=("unix:uid:2000",)))
    # The old identity is free again, the new one is taken.
    await store.create_entry(entry("b"))
    with pytest.raises(AlreadyExistsError):
        await store.create_entry(entry("c", selectors=("unix:uid:2000",)))
    assert len(await index_keys(store)) == 2


async def test_update_into_another_entrys_identity_is_refused_atomically(store: Store) -> None:
    a = await store.create_entry(entry("a"))
    await store.create_entry(entry("b", selectors=("unix:uid:2000",)))
    before = await index_keys(store)
    with pytest.raises(AlreadyExistsError, match="'b' already registers"):
        await store.update_entry(replace(a, selectors=(Selector.parse("unix:uid:2000"),), x509_ttl=1))
    got = await store.get_entry("a")
    assert (got.selectors, got.x509_ttl, got.revision) == ((Selector.parse("unix:uid:1000"),), 3600, a.revision)
    assert await index_keys(store) == before


async def test_update_entry_with_a_stale_revision_conflicts(store: Store) -> None:
    a = await store.create_entry(entry())
    fresh = await store.update_entry(replace(a, jwt_ttl=10), expected_revision=a.revision)
    with pytest.raises(ConflictError, match="re-read"):
        await store.update_entry(replace(a, jwt_ttl=20), expected_revision=a.revision)
    assert (await store.get_entry("e1")).jwt_ttl == 10
    await store.update_entry(replace(a, jwt_ttl=30), expected_revision=fresh.revision)
    assert (await store.get_entry("e1")).jwt_ttl == 30


async def test_update_or_delete_of_a_missing_entry_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.update_entry(entry("ghost"))
    with pytest.raises(NotFoundError):
        await store.delete_entry("ghost")
    assert await store.list_entries() == []
    assert await index_keys(store) == []


async def test_delete_entry_with_a_stale_revision_conflicts(store: Store) -> None:
    a = await store.create_entry(entry())
    await store.update_entry(replace(a, jwt_ttl=1))
    with pytest.raises(ConflictError):
        await store.delete_entry("e1", expected_revision=a.revision)
    assert (await store.get_entry("e1")).jwt_ttl == 1


async def test_concurrent_creates_of_one_identity_have_one_winner(store: Store) -> None:
    results = await asyncio.gather(
        *(store.create_entry(entry(f"e{i}")) for i in range(6)), return_exceptions=True
    )
    assert sum(isinstance(r, RegistrationEntry) for r in results) == 1
    assert all(isinstance(r, (RegistrationEntry, AlreadyExistsError)) for r in results)
    assert len(await store.list_entries()) == 1
    assert len(await index_keys(store)) == 1


async def test_empty_entry_id_is_refused(store: Store) -> None:
    with pytest.raises(InvalidRecordError, match="entry id"):
        await store.create_entry(entry(""))


# -- attested nodes --------------------------------------------------------------------


async def test_attested_node_crud(store: Store) -> None:
    n = await store.create_attested_node(node())
    with pytest.raises(AlreadyExistsError, match="node-1"):
        await store.create_attested_node(node(cert_serial="other"))
    assert (await store.get_attested_node(n.spiffe_id)).cert_serial == "01ab"
    banned = await store.update_attested_node(replace(n, banned=True), expected_revision=n.revision)
    with pytest.raises(ConflictError):
        await store.update_attested_node(replace(n, cert_serial="x"), expected_revision=n.revision)
    assert (await store.get_attested_node(n.spiffe_id)) == banned
    await store.create_attested_node(node("node-0"))
    assert [x.node_name for x in await store.list_attested_nodes()] == ["node-0", "node-1"]
    await store.delete_attested_node(n.spiffe_id)
    for call in (
        store.get_attested_node(n.spiffe_id),
        store.delete_attested_node(n.spiffe_id),
        store.update_attested_node(n),
    ):
        with pytest.raises(NotFoundError):
            await call
    assert [x.node_name for x in await store.list_attested_nodes()] == ["node-0"]


# -- join tokens -----------------------------------------------------------------------


async def test_join_token_is_consumed_once_with_the_node_created(store: Store) -> None:
    await store.create_join_token(token())
    with pytest.raises(AlreadyExistsError):
        await store.create_join_token(token())
    await store.consume_join_token_and_attest("h1", node())
    assert (await store.get_attested_node(node().spiffe_id)).node_name == "node-1"
    with pytest.raises(NotFoundError, match="already used"):
        await store.get_join_token("h1")
    with pytest.raises(NotFoundError, match="token create"):
        await store.consume_join_token_and_attest("h1", node("node-2"))
    with pytest.raises(NotFoundError):
        await store.get_attested_node(node("node-2").spiffe_id)


async def test_consume_when_the_node_exists_leaves_the_token(store: Store) -> None:
    await store.create_attested_node(node(cert_serial="original"))
    await store.create_join_token(token())
    with pytest.raises(AlreadyExistsError, match="already attested"):
        await store.consume_join_token_and_attest("h1", node(cert_serial="new"))
    assert await store.get_join_token("h1") == token()
    assert (await store.get_attested_node(node().spiffe_id)).cert_serial == "original"


async def test_racing_agents_with_one_token_have_one_winner(store: Store) -> None:
    await store.create_join_token(token())
    results = await asyncio.gather(
        *(store.consume_join_token_and_attest("h1", node(f"n{i}")) for i in range(6)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(r is None or isinstance(r, NotFoundError) for r in results)
    assert len(await store.list_attested_nodes()) == 1


async def test_expired_join_tokens_are_deleted(store: Store) -> None:
    await store.create_join_token(token("old", expires_at=100.0))
    await store.create_join_token(token("edge", expires_at=200.0))
    await store.create_join_token(token("new", expires_at=300.0))
    assert await store.delete_expired_join_tokens(200.0) == 2
    assert [t.token_hash for t in await store.list_join_tokens()] == ["new"]
    assert await store.delete_expired_join_tokens(200.0) == 0


async def test_only_long_expired_unbanned_nodes_are_pruned(store: Store) -> None:
    await store.create_attested_node(node("gone", cert_not_after=100.0))
    await store.create_attested_node(node("banned-gone", cert_not_after=100.0, banned=True))
    await store.create_attested_node(node("edge", cert_not_after=200.0))
    await store.create_attested_node(node("alive", cert_not_after=5000.0))
    assert await store.delete_expired_nodes(200.0) == [f"{TD}/agent/gone"]
    left = sorted(n.node_name for n in await store.list_attested_nodes())
    assert left == ["alive", "banned-gone", "edge"], "a ban outlives the SVID; the edge is not past"
    assert await store.delete_expired_nodes(200.0) == []


async def test_leader_key_is_held_by_one_holder_until_its_lease_ends(store: Store) -> None:
    assert await store.get_leader("duties") is None
    first = await store.lease_grant(10)
    second = await store.lease_grant(10)
    assert await store.try_become_leader("duties", "replica-a", first)
    assert not await store.try_become_leader("duties", "replica-b", second)
    assert await store.get_leader("duties") == "replica-a"
    assert await store.lease_keepalive(first) > 0
    await store.lease_revoke(first)  # a clean shutdown hands over at once
    assert await store.get_leader("duties") is None
    assert await store.lease_keepalive(first) == 0
    assert await store.try_become_leader("duties", "replica-b", second)
    assert await store.get_leader("duties") == "replica-b"
    await store.lease_revoke(second)


# -- policy ----------------------------------------------------------------------------


async def test_policy_revisions_append_with_a_head_cas(store: Store) -> None:
    assert await store.get_policy_head() is None
    p1 = await store.append_policy_revision("doc: 1\n", "alice", "first", 1.0, expected_head=0)
    assert (p1.revision, p1.sha256) == (1, hashlib.sha256(b"doc: 1\n").hexdigest())
    p2 = await store.append_policy_revision("doc: 2\n", "bob", "second", 2.0, expected_head=1)
    with pytest.raises(ConflictError, match="head is at revision 2, not 1"):
        await store.append_policy_revision("doc: late\n", "carol", "stale", 3.0, expected_head=1)
    with pytest.raises(ConflictError, match="head is at revision 2, not 0"):
        await store.append_policy_revision("doc: late\n", "carol", "stale", 3.0, expected_head=0)
    with pytest.raises(ConflictError):
        await store.append_policy_revision("doc: ahead\n", "carol", "ahead", 3.0, expected_head=5)
    assert await store.get_policy_head() == p2
    assert await store.list_policy_revisions() == [p1, p2]
    assert await store.get_policy_revision(1) == p1
    with pytest.raises(NotFoundError):
        await store.get_policy_revision(3)
    with pytest.raises(InvalidRecordError):
        await store.append_policy_revision("x", "a", "c", 1.0, expected_head=-1)


async def test_racing_policy_applies_have_one_winner(store: Store) -> None:
    results = await asyncio.gather(
        *(store.append_policy_revision(f"d{i}", "a", "", 1.0, expected_head=0) for i in range(5)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, PolicyRevision) for r in results) == 1
    assert len(await store.list_policy_revisions()) == 1


async def test_policy_revisions_list_in_numeric_order(store: Store) -> None:
    for head in range(11):
        await store.append_policy_revision(f"d{head}", "a", "", 1.0, expected_head=head)
    assert [p.revision for p in await store.list_policy_revisions()] == list(range(1, 12))


# -- bundles ---------------------------------------------------------------------------


async def test_bundle_crud_and_sequence_cas(store: Store) -> None:
    b1 = BundleRecord(TrustDomain("partner.example"), b'{"keys":[1]}', 1, 10.0)
    with pytest.raises(ConflictError, match="not at sequence 3"):
        await store.put_bundle(b1, expected_sequence=3)
    with pytest.raises(NotFoundError):
        await store.get_bundle("partner.example")
    await store.put_bundle(b1, expected_sequence=0)
    b2 = replace(b1, jwks=b'{"keys":[2]}', sequence=2)
    with pytest.raises(ConflictError):
        await store.put_bundle(b2, expected_sequence=0)
    await store.put_bundle(b2, expected_sequence=1)
    assert await store.get_bundle("partner.example") == b2
    await store.put_bundle(BundleRecord(TrustDomain("a.example"), b"{}", 1, 1.0))  # unconditional
    assert [b.trust_domain.name for b in await store.list_bundles()] == ["a.example", "partner.example"]
    await store.delete_bundle("a.example")
    with pytest.raises(NotFoundError):
        await store.delete_bundle("a.example")


# -- CA journal ------------------------------------------------------------------------


async def test_ca_state_cas(store: Store) -> None:
    assert await store.load_ca_state() == (None, 0)
    with pytest.raises(ConflictError, match="version 0, not 1"):
        await store.save_ca_state(b"x", expected_version=1)
    assert await store.save_ca_state(b"state-1", expected_version=0) == 1
    with pytest.raises(ConflictError, match="another server saved first"):
        await store.save_ca_state(b"other", expected_version=0)
    assert await store.save_ca_state(b"state-2", expected_version=1) == 2
    assert await store.load_ca_state() == (b"state-2", 2)


async def test_racing_ca_saves_have_one_winner(store: Store) -> None:
    results = await asyncio.gather(
        *(store.save_ca_state(f"s{i}".encode(), expected_version=0) for i in range(5)),
        return_exceptions=True,
    )
    winners = [i for i, r in enumerate(results) if r == 1]
    assert len(winners) == 1
    assert await store.load_ca_state() == (f"s{winners[0]}".encode(), 1)


# -- audit -----------------------------------------------------------------------------


async def test_audit_chain_appends_and_lists(store: Store) -> None:
    assert await store.get_audit_head() is None
    with pytest.raises(ConflictError, match="must have seq 1"):
        await store.append_audit_event(audit(2, "x"))
    e1 = await store.append_audit_event(audit(1, "0" * 64))
    e2 = await store.append_audit_event(audit(2, e1.hash))
    e3 = await store.append_audit_event(audit(3, e2.hash))
    assert await store.get_audit_head() == e3
    assert await store.list_audit_events() == [e1, e2, e3]
    assert await store.list_audit_events(since_seq=1) == [e2, e3]
    assert await store.list_audit_events(since_seq=1, limit=1) == [e2]
    assert await store.list_audit_events(since_seq=3) == []
    assert await store.get_audit_event(2) == e2


async def test_audit_append_that_does_not_chain_conflicts(store: Store) -> None:
    e1 = await store.append_audit_event(audit(1, ""))
    with pytest.raises(ConflictError, match="head is seq 1"):
        await store.append_audit_event(audit(2, "wrong-hash"))
    with pytest.raises(ConflictError):
        await store.append_audit_event(audit(3, e1.hash))
    with pytest.raises(ConflictError):
        await store.append_audit_event(audit(1, ""))
    assert await store.list_audit_events() == [e1]


async def test_two_replicas_appending_the_same_seq_one_wins(store: Store) -> None:
    e1 = await store.append_audit_event(audit(1, ""))
    a, b = audit(2, e1.hash, actor="replica-a"), audit(2, e1.hash, actor="replica-b")
    results = await asyncio.gather(
        store.append_audit_event(a), store.append_audit_event(b), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["AuditEvent", "ConflictError"]
    winner = next(r for r in results if isinstance(r, AuditEvent))
    assert await store.get_audit_head() == winner
    assert await store.list_audit_events() == [e1, winner]


async def test_tampering_through_the_raw_hook_is_visible(store: Store) -> None:
    e1 = await store.append_audit_event(audit(1, ""))
    key = Store.audit_event_key(1)
    assert await store.raw_get(key) == e1.to_json()
    forged = replace(e1, actor="mallory")
    await store.raw_put(key, forged.to_json())
    assert await store.get_audit_event(1) == forged
    # The head copy is untouched, which is what lets a verifier notice.
    assert await store.get_audit_head() == e1
    assert await store.raw_get("no/such/key") is None


# -- change feed -----------------------------------------------------------------------


async def next_changes(it: AsyncIterator[list[Change]]) -> list[Change]:
    return await asyncio.wait_for(anext(it), WAIT)


async def test_watch_decodes_typed_changes_in_order(store: Store) -> None:
    start = await store.current_revision()
    feed = store.watch(start)
    created = await store.create_entry(entry())
    await store.create_join_token(token())
    await store.consume_join_token_and_attest("h1", node())
    await store.append_policy_revision("doc", "a", "", 1.0, expected_head=0)
    await store.put_bundle(BundleRecord(TrustDomain("partner.example"), b"{}", 1, 1.0))
    await store.save_ca_state(b"ca", expected_version=0)
    await store.append_audit_event(audit(1, ""))
    await store.delete_entry("e1")

    batches = [await next_changes(feed) for _ in range(8)]
    got = [[(c.kind, c.key, c.deleted) for c in b] for b in batches]
    assert got[0] == [("entry", "e1", False)]  # the index key is not a change of its own
    assert got[1] == [("token", "h1", False)]
    assert sorted(got[2]) == [("node", str(node().spiffe_id), False), ("token", "h1", True)]
    assert got[3] == [("policy", "1", False)]
    assert got[4] == [("bundle", "partner.example", False)]
    assert got[5] == [("ca", "journal", False)]
    assert got[6] == [("audit", "1", False)]
    assert got[7] == [("entry", "e1", True)]
    assert batches[0][0] == EntryChanged("e1", created, created.revision)
    assert batches[5][0] == CaChanged("journal", b"ca", batches[5][0].revision)
    assert batches[7][0] == EntryChanged("e1", None, batches[7][0].revision)
    kinds = {type(c) for b in batches for c in b}
    assert kinds == {EntryChanged, TokenChanged, NodeChanged, PolicyChanged, BundleChanged, CaChanged, AuditAppended}
    revisions = [b[0].revision for b in batches]
    assert revisions == sorted(set(revisions))


async def test_watch_types_federation_and_partner_changes(store: Store) -> None:
    start = await store.current_revision()
    feed = store.watch(start)
    relationship = FederationRecord(TrustDomain("partner.example"), "https://partner.example/b", "https_spiffe",
                                    SpiffeId.parse("spiffe://partner.example/server"), 1.0)
    await store.create_federation(relationship, BundleRecord(TrustDomain("partner.example"), b"{}", 1, 1.0))
    cert = PartnerCertificate("7a", SpiffeId.parse(f"{TD}/partners/acme"), 9.0, 1.0, "admin")
    await store.create_partner_certificate(cert)
    await store.delete_federation("partner.example")

    batches = [await next_changes(feed) for _ in range(3)]
    described = []
    for change in (c for b in batches for c in b):
        match change:
            case FederationChanged(key, FederationRecord() as record):
                assert record == replace(relationship, revision=change.revision)
                described.append(f"federation {key}")
            case FederationChanged(key, None):
                described.append(f"federation {key} gone")
            case BundleChanged(key, BundleRecord()):
                described.append(f"bundle {key}")
            case BundleChanged(key, None):
                described.append(f"bundle {key} gone")
            case PartnerChanged(key, PartnerCertificate() as record):
                assert record == cert
                described.append(f"partner {key}")
            case _:
                described.append(f"unexpected {change}")
    assert sorted(described) == ["bundle partner.example", "bundle partner.example gone", "federation partner.example",
                                 "federation partner.example gone", "partner 7a"]
    await feed.aclose()


async def test_watch_resumes_exactly_and_reports_compaction(store: Store) -> None:
    start = await store.current_revision()
    for i in range(4):
        await store.create_entry(entry(f"e{i}", spiffe_id=f"{TD}/w{i}"))
    feed = store.watch(start)
    first = [await next_changes(feed) for _ in range(2)]
    await feed.aclose()
    resumed = store.watch(first[-1][0].revision)
    rest = [await next_changes(resumed) for _ in range(2)]
    assert [b[0].key for b in first + rest] == ["e0", "e1", "e2", "e3"]
    await resumed.aclose()

    await store.compact(await store.current_revision())
    with pytest.raises(CompactedError):
        await next_changes(store.watch(start))


# -- persistence and opening -----------------------------------------------------------


async def test_sqlite_store_survives_a_restart(tmp_path: Path) -> None:
    s = await open_store("sqlite", tmp_path)
    created = await s.create_entry(entry())
    await s.save_ca_state(b"ca", expected_version=0)
    rev = await s.current_revision()
    await s.close()

    async with await open_store(f"sqlite://{tmp_path / 'store.db'}", tmp_path / "unused") as s:
        assert await s.get_entry("e1") == created
        assert await s.load_ca_state() == (b"ca", 1)
        with pytest.raises(AlreadyExistsError):
            await s.create_entry(entry("e2"))  # the uniqueness index survived too
        again = await s.update_entry(created)
        assert again.revision == rev + 1


async def test_open_store_refuses_unknown_urls(tmp_path: Path) -> None:
    for url in ["postgres://db", "sqlite:relative.db", "sqlite://", ""]:
        with pytest.raises(StoreError, match="sqlite:///path/to/store.db"):
            await open_store(url, tmp_path)


@pytest.mark.etcd
async def test_open_store_with_etcd_down_is_unavailable(tmp_path: Path) -> None:
    port = free_port()
    expected = f"127.0.0.1:{port}.*check that etcd is running"
    with pytest.raises(StoreUnavailableError, match=expected):
        await asyncio.wait_for(
            open_store(f"etcd://127.0.0.1:{port}", tmp_path, etcd_timeout=2.0), 15.0
        )


@pytest.mark.etcd
async def test_etcd_store_is_shared_between_replicas(etcd_server: str, tmp_path: Path) -> None:
    namespace = f"/test-{uuid.uuid4().hex}/"
    a = await open_store(etcd_server, tmp_path, etcd_namespace=namespace)
    b = Store(await EtcdKV.connect(parse_endpoints(etcd_server), namespace=namespace))
    try:
        await a.create_entry(entry())
        with pytest.raises(AlreadyExistsError):
            await b.create_entry(entry("e2"))
        e1 = await a.append_audit_event(audit(1, ""))
        with pytest.raises(ConflictError):
            await b.append_audit_event(audit(1, ""))
        assert await b.get_audit_head() == e1
    finally:
        await a.close()
        await b.close()


# -- stores written by earlier versions ------------------------------------------------
#
# fixtures/records_v1.json holds one record of every kind as the version before typed
# records wrote it (string IDs and selectors). A store holding those bytes must load into
# typed records, re-encode to the very same bytes, and keep the entry's uniqueness key.

FIXTURE = Path(__file__).parent / "fixtures" / "records_v1.json"


def stored_v1() -> dict[str, bytes]:
    return {name: text.encode() for name, text in json.loads(FIXTURE.read_text()).items()}


def v1_key(name: str, data: bytes) -> str:
    """Where the earlier version stored the record, from its own JSON."""
    o = json.loads(data)
    kind = name.split("_")[0]
    return {
        "entry": lambda: f"entries/{o.get('id')}",
        "node": lambda: f"nodes/{o.get('spiffe_id')}",
        "token": lambda: f"tokens/{o.get('token_hash')}",
        "policy": lambda: f"policy/revisions/{o.get('revision', 0):020d}",
        "bundle": lambda: f"bundles/{o.get('trust_domain')}",
        "audit": lambda: f"audit/events/{o.get('seq', 0):020d}",
        "federation": lambda: f"federation/{o.get('trust_domain')}",
        "partner": lambda: f"partner-certs/{o.get('serial')}",
    }[kind]()


def v1_identity_key(data: bytes) -> str:
    o = json.loads(data)
    identity = json.dumps([o["spiffe_id"], o["parent_id"], sorted(set(o["selectors"]))], separators=(",", ":"))
    return ENTRY_INDEX + hashlib.sha256(identity.encode()).hexdigest()


def test_the_fixture_covers_every_record_kind() -> None:
    kinds = {name.split("_")[0] for name in stored_v1()}
    assert kinds == {"entry", "node", "token", "policy", "bundle", "audit", "federation", "partner"}


@pytest.mark.parametrize("name", sorted(stored_v1()))
def test_v1_bytes_decode_to_typed_records_and_encode_back_unchanged(name: str) -> None:
    data = stored_v1()[name]
    decoder = {
        "entry": RegistrationEntry, "node": AttestedNode, "token": JoinToken, "policy": PolicyRevision,
        "bundle": BundleRecord, "audit": AuditEvent, "federation": FederationRecord, "partner": PartnerCertificate,
    }[name.split("_")[0]]
    record = decoder.from_json(data)  # type: ignore[attr-defined]
    assert record.to_json() == data
    if isinstance(record, RegistrationEntry):
        assert isinstance(record.spiffe_id, SpiffeId) and isinstance(record.parent_id, SpiffeId)
        assert all(isinstance(s, Selector) for s in record.selectors)
        assert all(isinstance(td, TrustDomain) for td in record.federates_with)
        assert entry_identity_key(record) == v1_identity_key(data)
    if isinstance(record, AttestedNode):
        assert isinstance(record.spiffe_id, SpiffeId) and all(isinstance(s, Selector) for s in record.selectors)
    if isinstance(record, PartnerCertificate):
        assert isinstance(record.spiffe_id, SpiffeId)
    if isinstance(record, (FederationRecord, BundleRecord)):
        assert isinstance(record.trust_domain, TrustDomain)
    if isinstance(record, FederationRecord):
        assert (record.endpoint_spiffe_id is None) == (record.profile != "https_spiffe")


def test_v1_entry_holds_parsed_values() -> None:
    e = RegistrationEntry.from_json(stored_v1()["entry"])
    assert e.spiffe_id == SpiffeId.parse("spiffe://example.org/ledger")
    assert e.parent_id == SpiffeId.parse("spiffe://example.org/agent/node-1")
    assert e.selectors == (Selector.parse("unix:path:/usr/bin/ledger"), Selector.parse("unix:uid:1000"))
    assert e.federates_with == (TrustDomain("partner.example"),)
    alias = RegistrationEntry.from_json(stored_v1()["entry_node_alias"])
    assert alias.parent_id == SpiffeId.parse("spiffe://example.org/trustmesh/server")
    under_alias = RegistrationEntry.from_json(stored_v1()["entry_alias_parent"])
    assert under_alias.parent_id == alias.spiffe_id  # a node alias is a SPIFFE ID too


@pytest.mark.parametrize(
    ("field", "value"),
    [("spiffe_id", "example.org/ledger"), ("parent_id", "spiffe://Example.org/agent/x"),
     ("selectors", ["no-colon"]), ("federates_with", ["Bad_TD!"]), ("selectors", [7])],
)
def test_stored_ids_and_selectors_that_do_not_parse_are_refused_clearly(field: str, value: object) -> None:
    o = json.loads(stored_v1()["entry"])
    o[field] = value
    with pytest.raises(RecordFormatError, match=field):
        RegistrationEntry.from_json(json.dumps(o).encode())


async def test_a_store_written_by_the_previous_version_loads(store: Store) -> None:
    stored = stored_v1()
    start = await store.current_revision()
    feed = store.watch(start)
    for name, data in sorted(stored.items()):
        await store.raw_put(v1_key(name, data), data)
        if name.startswith("entry"):
            await store.raw_put(v1_identity_key(data), json.loads(data)["id"].encode())
    await store.raw_put("policy/head", b"3")

    loaded: list[object] = [
        *await store.list_entries(), *await store.list_attested_nodes(), *await store.list_join_tokens(),
        *await store.list_policy_revisions(), *await store.list_bundles(), *await store.list_audit_events(),
        *await store.list_federations(), *await store.list_partner_certificates(),
    ]
    assert sorted(r.to_json() for r in loaded) == sorted(stored.values())  # type: ignore[attr-defined]
    ledger = await store.get_entry("0f3c")
    assert ledger.spiffe_id == SpiffeId.parse("spiffe://example.org/ledger") and ledger.revision > 0
    assert [e.id for e in await store.list_entries(parent_id=SpiffeId.parse(f"{TD}/agent/node-1"))] == ["0f3c"]
    node_1 = await store.get_attested_node(SpiffeId.parse(f"{TD}/agent/node-1"))
    assert Selector.parse("node:name:node-1") in node_1.selectors
    assert (await store.get_policy_head()) is not None
    # The index keys the previous version wrote still guard uniqueness.
    with pytest.raises(AlreadyExistsError, match="'0f3c' already registers"):
        await store.create_entry(replace(ledger, id="dup"))
    # ... and update and delete find them (nothing left behind).
    await store.update_entry(replace(ledger, x509_ttl=600))
    for e in await store.list_entries():
        await store.delete_entry(e.id)
    assert await index_keys(store) == []

    seen: dict[str, bytes] = {}
    while len(seen) < len(stored):
        for change in await next_changes(feed):
            match change:
                case EntryChanged(entry=RegistrationEntry() as record) | NodeChanged(node=AttestedNode() as record) \
                        | TokenChanged(token=JoinToken() as record) | PolicyChanged(policy=PolicyRevision() as record) \
                        | BundleChanged(bundle=BundleRecord() as record) | AuditAppended(event=AuditEvent() as record) \
                        | FederationChanged(federation=FederationRecord() as record) \
                        | PartnerChanged(certificate=PartnerCertificate() as record):
                    seen[f"{change.kind}/{change.key}"] = record.to_json()
    assert sorted(seen.values()) == sorted(stored.values())
    await feed.aclose()
