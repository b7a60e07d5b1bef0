"""What a sync stream sends, computed without a server: snapshots, resumes and the deltas
that follow (the paging itself is checked in test_authorized.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.bundle import Bundle
from trustmesh.controlplane import sync_delta
from trustmesh.controlplane.registry_view import CAJournalChanged, RegistryView
from trustmesh.controlplane.store import open_store
from trustmesh.controlplane.store.records import RegistrationEntry
from trustmesh.controlplane.sync_service import OWN_BUNDLE_SECONDS, SyncService
from trustmesh.metrics import Registry
from trustmesh.policy import Allowlist, AllowRule, IdPattern, PathPattern, Policy
from trustmesh.policy.wire import policy_from_pb
from trustmesh.selectors import Selector
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.wire import bundle_to_pb

AGENT = "spiffe://example.org/agent/n1"
OWN = TrustDomain("example.org")
PARTNER = TrustDomain("partner.example")
OTHER = TrustDomain("other.example")


def _bundle(td: TrustDomain, sequence: int = 1) -> Bundle:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{td.name} root")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return Bundle(td, (cert,), sequence_number=sequence)


def entry(i: int, revision: int = 1, federates_with: tuple[str, ...] = ()) -> RegistrationEntry:
    return RegistrationEntry(
        id=f"e{i}",
        spiffe_id=SpiffeId.parse(f"spiffe://example.org/w{i}"),
        parent_id=SpiffeId.parse(AGENT),
        selectors=(Selector.parse("unix:uid:1"),),
        x509_ttl=0,
        jwt_ttl=0,
        dns_names=(),
        federates_with=tuple(TrustDomain(td) for td in federates_with),
        admin=False,
        created_at=0,
        updated_at=0,
        revision=revision,
    )


def allow(destination: str, source: str, revision: int = 1) -> Policy:
    rule = Allowlist(
        name=f"to-{destination.rsplit('/', 1)[-1]}",
        destination=IdPattern.parse(destination),
        allow=(AllowRule(IdPattern.parse(source)),),
    )
    return Policy((rule,), revision)


OWN_BUNDLE = _bundle(OWN, 7)
FEDERATED = {PARTNER.name: _bundle(PARTNER, 3), OTHER.name: _bundle(OTHER, 4)}
POLICY = Policy(
    (
        *allow("spiffe://example.org/w1", "spiffe://example.org/w2").allowlists,
        *allow("spiffe://example.org/unrelated", "spiffe://example.org/w2").allowlists,
    ),
    5,
)


def state(
    entries: list[RegistrationEntry],
    revision: int = 10,
    policy: Policy = POLICY,
    revoked: frozenset[str] = frozenset(),
    own: Bundle = OWN_BUNDLE,
) -> sync_delta.AgentState:
    return sync_delta.agent_state(
        entries, own_bundle=bundle_to_pb(own), federated=FEDERATED, policy=policy, revoked_serials=revoked,
        revision=revision,
    )


def test_an_agent_gets_its_own_bundle_the_federated_ones_its_entries_name_and_the_policy_for_them() -> None:
    s = state([entry(1, federates_with=(PARTNER.name, "unknown.example")), entry(2)], revoked=frozenset({"abc"}))
    assert list(s.bundles) == [OWN.name, PARTNER.name], "unknown trust domains and unrelated bundles stay out"
    assert s.bundles[PARTNER.name].sequence_number == 3
    assert [r.allowlist for r in s.policy.rules] == ["to-w1"], "only allowlists for the agent's destinations"
    assert list(s.policy.revoked_serials) == ["abc"] and s.policy.revision == 5


def test_an_agent_that_does_not_enforce_routes_is_sent_no_route_rule() -> None:
    """An agent of a release before route rules would read `methods`/`paths` as absent, i.e.
    allow every request: it gets none of them, and so denies what they alone allow."""
    routed = Policy((Allowlist("ledger-read", IdPattern.parse("spiffe://example.org/w1"), (
        AllowRule(IdPattern.parse("spiffe://example.org/fraud"), methods=("GET",), paths=(PathPattern.parse("/a/*"),)),
        AllowRule(IdPattern.parse("spiffe://example.org/w2")))),), 6)
    current = sync_delta.agent_state([entry(1)], own_bundle=bundle_to_pb(OWN_BUNDLE), federated=FEDERATED,
                                     policy=routed, revoked_serials=frozenset(), revision=10)
    assert [(a.id, list(a.methods)) for a in current.policy.rules[0].allow] == [
        ("spiffe://example.org/fraud", ["GET"]), ("spiffe://example.org/w2", [])]
    old = sync_delta.agent_state([entry(1)], own_bundle=bundle_to_pb(OWN_BUNDLE), federated=FEDERATED,
                                 policy=routed, revoked_serials=frozenset(), revision=10, http_routes=False)
    assert [a.id for a in old.policy.rules[0].allow] == ["spiffe://example.org/w2"]
    decision = policy_from_pb(old.policy).decide(SpiffeId.parse("spiffe://example.org/fraud"),
                                                 SpiffeId.parse("spiffe://example.org/w1"), None,
                                                 datetime.now(timezone.utc))
    assert not decision.allowed


def test_a_new_agent_gets_a_snapshot_then_the_bundles_it_must_drop() -> None:
    s = state([entry(i) for i in range(sync_delta.PAGE_ENTRIES + 3)])
    begun = sync_delta.start(
        s,
        since=0,
        changed=None,
        known_trust_domains={PARTNER.name, "gone.example"},
        bundle_sequences={},
        policy_changed_at=0,
    )
    assert not begun.resumed
    *pages, dropping = begun.messages
    assert [m.snapshot.page for m in pages] == [0, 1] and [m.snapshot.last for m in pages] == [False, True]
    assert all(m.revision == 10 for m in begun.messages)
    assert sum(len(m.snapshot.entries) for m in pages) == sync_delta.PAGE_ENTRIES + 3
    assert not pages[0].snapshot.bundles and not pages[0].snapshot.HasField("policy")
    assert [b.trust_domain for b in pages[-1].snapshot.bundles] == [OWN.name]
    assert pages[-1].snapshot.policy.revision == 5
    assert list(dropping.delta.deleted_bundles) == ["gone.example", PARTNER.name]
    assert begun.sent.revision == 10 and set(begun.sent.entries) == {e.id for e in s.entries}


def test_a_resuming_agent_gets_only_what_changed_since_its_revision() -> None:
    s = state([entry(1, revision=9), entry(2)])
    begun = sync_delta.start(
        s,
        since=8,
        changed={"e1", "e-gone"},
        known_trust_domains=set(),
        bundle_sequences={OWN.name: 7},
        policy_changed_at=3,
    )
    assert begun.resumed
    [message] = begun.messages
    assert message.revision == 10
    assert [e.id for e in message.delta.upserted_entries] == ["e1"]
    assert list(message.delta.deleted_entry_ids) == ["e-gone"]
    assert not message.delta.bundles, "a bundle at the sequence the agent holds is not sent again"
    assert message.delta.HasField("policy"), "entries changed: the policy for them is sent along"

    quiet = sync_delta.start(
        s, since=9, changed=set(), known_trust_domains=set(), bundle_sequences={OWN.name: 6}, policy_changed_at=3
    )
    [message] = quiet.messages
    assert [b.trust_domain for b in message.delta.bundles] == [OWN.name], "a newer own bundle is sent"
    assert not message.delta.HasField("policy") and not message.delta.upserted_entries
    moved = sync_delta.start(
        s, since=9, changed=set(), known_trust_domains=set(), bundle_sequences={OWN.name: 7}, policy_changed_at=10
    )
    assert moved.messages[0].delta.HasField("policy"), "the policy changed after the agent's revision"


def test_the_next_delta_is_the_difference_from_what_the_stream_sent() -> None:
    first = state([entry(1), entry(2, federates_with=(PARTNER.name,))], revision=10)
    sent = sync_delta.start(
        first, since=0, changed=None, known_trust_domains=set(), bundle_sequences={}, policy_changed_at=0
    ).sent

    messages, after = sync_delta.next_delta(
        state([entry(1), entry(2, federates_with=(PARTNER.name,))], revision=11), sent
    )
    assert messages == [] and after is sent, "nothing changed: nothing sent, and the stream stays at its revision"

    messages, after = sync_delta.next_delta(
        state([entry(1), entry(2, federates_with=(PARTNER.name,))], revision=11), sent, keepalive=True
    )
    [keepalive] = messages
    assert keepalive.revision == 11 and keepalive.delta.ByteSize() == 0
    assert after.revision == 11

    changed = state([entry(1, revision=12), entry(3)], revision=12, policy=replace(POLICY, revision=6))
    messages, after = sync_delta.next_delta(changed, sent)
    [delta] = messages
    assert delta.revision == 12
    assert sorted(e.id for e in delta.delta.upserted_entries) == ["e1", "e3"]
    assert list(delta.delta.deleted_entry_ids) == ["e2"]
    assert list(delta.delta.deleted_bundles) == [PARTNER.name], "no entry federates with it any more"
    assert delta.delta.policy.revision == 6
    assert sync_delta.delivered_policy_revision(delta) == 6
    assert after.entries == {"e1": 12, "e3": 1} and set(after.bundles) == {OWN.name}

    rotated = state(
        [entry(1, revision=12), entry(3)], revision=13, policy=replace(POLICY, revision=6), own=_bundle(OWN, 8)
    )
    [delta] = sync_delta.next_delta(rotated, after)[0]
    assert [b.sequence_number for b in delta.delta.bundles] == [8], "a rotated own bundle is pushed"
    assert sync_delta.delivered_policy_revision(delta) is None


def test_a_snapshot_page_delivers_no_policy_revision() -> None:
    begun = sync_delta.start(
        state([]), since=0, changed=None, known_trust_domains=set(), bundle_sequences={}, policy_changed_at=0
    )
    assert [sync_delta.delivered_policy_revision(m) for m in begun.messages] == [None]


async def test_the_own_bundle_is_built_once_per_wake_up_and_again_after_a_ca_change(tmp_path: Path) -> None:
    # One conversion for a whole fleet woken by one change, not one per agent; a CA journal
    # change (a new root) or the passing of time (an old root expiring) makes a new one.
    store = await open_store("sqlite", tmp_path)
    now = [1000.0]
    built: list[int] = []

    def own() -> Bundle:
        built.append(1)
        return OWN_BUNDLE

    try:
        view = RegistryView(store, OWN, Registry(), lambda: now[0])
        sync = SyncService(view, own, Registry(), lambda: now[0])
        for agent in ("spiffe://example.org/agent/a", "spiffe://example.org/agent/b"):
            assert OWN.name in sync.state_for(agent).bundles
        assert len(built) == 1
        await sync.on_registry_event(CAJournalChanged(revision=1))
        sync.state_for("spiffe://example.org/agent/a")
        assert len(built) == 2
        now[0] += OWN_BUNDLE_SECONDS
        sync.state_for("spiffe://example.org/agent/a")
        assert len(built) == 3
    finally:
        await store.close()
