"""Quarantine: the record (stable, validated, sealed), the decision (both directions and the
node, before any allowlist), the wire, the admin role table, and the service with the registry
view and issuance over a real SQLite store, audit log and CA."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.unit.server_runtime import Clock, audit_events, server_runtime
from tests.unit.test_workload_api import Authority
from trustmesh.controlplane import quarantine as quarantine_module
from trustmesh.controlplane.api.calls import CALLS, Caller, CallerKind
from trustmesh.controlplane.issuance import IssuanceService, X509Issued, X509Refused, X509Request
from trustmesh.controlplane.quarantine import QuarantineService
from trustmesh.controlplane.registry_view import AllAgentsChanged, RegistryEvent, RegistryView
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store import AttestedNode, BundleRecord, RegistrationEntry
from trustmesh.controlplane.store.records import Quarantine, QuarantineChanged, RecordFormatError
from trustmesh.controlplane.store.store import quarantine_key
from trustmesh.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from trustmesh.keys import generate_private_key
from trustmesh.policy import load_text
from trustmesh.policy.model import QUARANTINE
from trustmesh.policy.wire import policy_from_pb, policy_to_pb
from trustmesh.selectors import Selector
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_csr

TD = "spiffe://example.org"
PAYMENTS, LEDGER, WEB = f"{TD}/payments", f"{TD}/ledger", f"{TD}/web"
NODE_1, NODE_2 = f"{TD}/agent/node-1", f"{TD}/agent/node-2"
OFFICER = f"{TD}/operator/olga"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
POLICY = load_text(f"""
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger}}
spec: {{destination: "{LEDGER}", mode: audit, allow: [{{from: "{PAYMENTS}"}}]}}
""", "ledger.yaml").policy


def sid(text: str) -> SpiffeId:
    return SpiffeId.parse(text)


# --- the record ---------------------------------------------------------------------------


def sample() -> Quarantine:
    return Quarantine(target=PAYMENTS, kind="identity", reason="credential seen off the mesh", created_by="detector",
                      created_at=1.5, node="node-1", evidence=("new peer spiffe://example.org/x", "volume x9"),
                      detector="new_peer", score=0.93)


def test_the_record_round_trips_through_stable_json() -> None:
    data = sample().to_json()
    assert b'"v":1' in data
    again = Quarantine.from_json(data, revision=7)
    assert again == sample() and again.revision == 7 and again.to_json() == data


@pytest.mark.parametrize("field, value, message", [
    ("kind", "everything", "kind 'everything'"),
    ("target", "not an id", "'target' is not a SPIFFE ID"),
    ("evidence", [1], "'evidence' must hold strings"),
    ("score", True, "'score' has the wrong type"),
    ("created_at", "yesterday", "'created_at' has the wrong type"),
    ("reason", None, "'reason' has the wrong type"),
])
def test_a_malformed_record_is_refused(field: str, value: object, message: str) -> None:
    obj = json.loads(sample().to_json())
    obj[field] = value
    with pytest.raises(RecordFormatError, match=message):
        Quarantine.from_json(json.dumps(obj).encode())
    del obj[field]
    with pytest.raises(RecordFormatError, match=f"no '{field}' field"):
        Quarantine.from_json(json.dumps(obj).encode())


async def test_a_tampered_record_is_never_used(tmp_path: Path) -> None:
    """Sealed like every security-relevant record: an edited or forged one is left out, so an
    attacker with write access to the store cannot slip a release (or a quarantine) past the MAC."""
    from tests.unit.test_sealing import _sealed_store

    failures: list[object] = []
    store = await _sealed_store(tmp_path, failures)  # type: ignore[arg-type]
    try:
        start = await store.current_revision()
        await store.create_quarantine(sample())
        forged = replace(sample(), target=WEB)
        await store.raw_put("quarantine/" + quarantine_key(WEB), forged.to_json())
        assert [q.target for q in await store.list_quarantines()] == [PAYMENTS]
        edited = (await store.raw_get("quarantine/" + quarantine_key(PAYMENTS)) or b"").replace(b"0.93", b"0.01")
        await store.raw_put("quarantine/" + quarantine_key(PAYMENTS), edited)
        assert await store.list_quarantines() == []
        with pytest.raises(NotFoundError):
            await store.get_quarantine(PAYMENTS)
        batches = store.watch(start)
        changes = await asyncio.wait_for(anext(batches), 5)
        await batches.aclose()
        assert [(type(c), c.key) for c in changes] == [(QuarantineChanged, quarantine_key(PAYMENTS))]
        assert len(failures) >= 2
    finally:
        await store.close()


# --- the decision and the wire -------------------------------------------------------------


def test_decide_refuses_a_quarantined_source_or_destination_before_any_allowlist() -> None:
    assert POLICY.decide(sid(PAYMENTS), sid(LEDGER), 5432, NOW).allowed
    assert POLICY.decide(sid(WEB), sid(LEDGER), 5432, NOW).audit_only  # audit mode lets anything through...
    for quarantined in (PAYMENTS, LEDGER):
        policy = replace(POLICY, quarantined=frozenset({quarantined}))
        decision = policy.decide(sid(PAYMENTS), sid(LEDGER), 5432, NOW)
        assert not decision.allowed and not decision.audit_only and decision.rule == QUARANTINE
        assert decision.reason == (f"{quarantined} is in quarantine; a security officer releases it with "
                                   "trustmesh quarantine release")
        # ...but never a quarantined identity.
        assert not policy.decide(sid(WEB), sid(LEDGER) if quarantined == LEDGER else sid(PAYMENTS), 1, NOW).allowed
    other = replace(POLICY, quarantined=frozenset({WEB}))
    assert other.decide(sid(PAYMENTS), sid(LEDGER), 5432, NOW).allowed


def test_a_quarantined_node_refuses_everything_its_listeners_see() -> None:
    policy = replace(POLICY, quarantined=frozenset({NODE_1}))
    assert policy.decide(sid(PAYMENTS), sid(LEDGER), 5432, NOW, node=sid(NODE_2)).allowed
    refused = policy.decide(sid(PAYMENTS), sid(LEDGER), 5432, NOW, node=sid(NODE_1))
    assert not refused.allowed and NODE_1 in refused.reason
    assert policy.in_quarantine(sid(PAYMENTS), None) is None


def test_quarantine_survives_the_narrowing_per_node_and_the_wire() -> None:
    policy = replace(POLICY, revision=4, revoked_serials=frozenset({"ab"}), quarantined=frozenset({WEB, NODE_1}))
    narrowed = policy.for_destinations([sid(f"{TD}/elsewhere")])
    assert narrowed.allowlists == () and narrowed.quarantined == policy.quarantined  # every node refuses them
    message = policy_to_pb(policy)
    assert list(message.quarantined) == sorted([WEB, NODE_1])
    again = policy_from_pb(message)
    assert again.quarantined == policy.quarantined and again.revoked_serials == policy.revoked_serials
    assert again.allowlists == policy.allowlists and again.revision == 4
    assert policy_from_pb(policy_to_pb(POLICY)).quarantined == frozenset()


# --- who may call what ---------------------------------------------------------------------


@pytest.mark.parametrize("method, roles, step_up", [
    ("ListQuarantines", {"admin", "security-officer", "auditor", "viewer", "policy-author"}, False),
    ("AddQuarantine", {"admin", "security-officer"}, False),
    ("ReleaseQuarantine", {"admin", "security-officer"}, True),
])
def test_the_role_table(method: str, roles: set[str], step_up: bool) -> None:
    rule = CALLS[f"/trustmesh.v1.Admin/{method}"]
    for role in ("admin", "security-officer", "auditor", "viewer", "policy-author"):
        assert rule.permits(Caller(CallerKind.OPERATOR, "op", roles=frozenset({role}))) == (role in roles), role
    assert rule.permits(Caller(CallerKind.LOCAL_ADMIN, "root"))  # the admin socket: break-glass
    assert not rule.permits(Caller(CallerKind.AGENT, NODE_1)) and not rule.permits(Caller(CallerKind.WORKLOAD, WEB))
    assert rule.step_up is step_up


# --- the service, the registry view and issuance over a real store ---------------------------


def node(name: str) -> AttestedNode:
    return AttestedNode(spiffe_id=sid(f"{TD}/agent/{name}"), node_name=name, attestation_type="join_token",
                        cert_serial="1", cert_not_after=4e9, banned=False, created_at=1.0, updated_at=1.0)


def entry(entry_id: str, spiffe_id: str, parent: str) -> RegistrationEntry:
    return RegistrationEntry(id=entry_id, spiffe_id=sid(spiffe_id), parent_id=sid(parent),
                             selectors=(Selector.parse("unix:uid:1"),), x509_ttl=0, jwt_ttl=0, dns_names=(),
                             federates_with=(), admin=False, created_at=1.0, updated_at=1.0)


@dataclass
class World:
    rt: ServerRuntime
    view: RegistryView
    service: QuarantineService
    events: asyncio.Queue[RegistryEvent]

    async def settled(self) -> RegistryEvent:
        """The next event the view publishes (after a write reached it)."""
        return await asyncio.wait_for(self.events.get(), 5)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with server_runtime(tmp_path, Clock(1_000_000.0)) as rt:
        await rt.store.create_attested_node(node("node-1"))
        await rt.store.create_attested_node(node("node-2"))
        await rt.store.create_entry(entry("e-pay", PAYMENTS, NODE_1))
        await rt.store.create_entry(entry("e-ledger", LEDGER, NODE_1))
        await rt.store.create_entry(entry("e-web", WEB, NODE_2))
        partner = Authority.make(TrustDomain("partner.example")).bundle()
        await rt.store.put_bundle(BundleRecord(partner.trust_domain, partner.to_jwks(), 1, 1.0))
        view = RegistryView(rt.store, rt.config.trust_domain, rt.metrics, rt.clock)
        events: asyncio.Queue[RegistryEvent] = asyncio.Queue()

        async def record(event: RegistryEvent) -> None:
            await events.put(event)

        view.subscribe(record)
        stop = asyncio.Event()
        task = asyncio.create_task(view.run(stop))
        try:
            await asyncio.wait_for(view.ready.wait(), 5)
            world = World(rt, view, QuarantineService(rt, view), events)
            await world.settled()  # the load
            yield world
        finally:
            stop.set()
            await task


def gauge(rt: ServerRuntime) -> str:
    return next(line for line in rt.metrics.render().splitlines() if line.startswith("trustmesh_quarantined "))


async def test_add_reaches_every_agent_and_release_ends_it(world: World) -> None:
    q = await world.service.add(PAYMENTS, "identity", "INC-1: credential seen off the mesh", OFFICER)
    assert (q.target, q.kind, q.created_by, q.created_at) == (PAYMENTS, "identity", OFFICER, 1_000_000.0)
    event = await world.settled()
    assert isinstance(event, AllAgentsChanged)  # every agent at once, whatever its entries
    assert world.view.policy.quarantined == {PAYMENTS} and world.view.is_quarantined(PAYMENTS)
    assert world.view.policy_changed_at == event.revision  # a resuming agent is sent the policy again
    assert [x.target for x in world.view.quarantines()] == [PAYMENTS] and gauge(world.rt).endswith(" 1.0")
    assert [x.target for x in await world.service.list()] == [PAYMENTS]
    (added,) = await audit_events(world.rt, "quarantine.add")
    assert added.actor == OFFICER and added.subject == PAYMENTS and added.details["reason"].startswith("INC-1")

    with pytest.raises(AlreadyExistsError, match="in quarantine already .by spiffe://example.org/operator/olga"):
        await world.service.add(PAYMENTS, "identity", "again", OFFICER)
    with pytest.raises(InvalidArgumentError, match="--reason is required"):
        await world.service.release(PAYMENTS, " ", OFFICER)
    released = await world.service.release(PAYMENTS, "key rotated", OFFICER)
    assert released.target == PAYMENTS
    assert isinstance(await world.settled(), AllAgentsChanged)
    assert world.view.policy.quarantined == frozenset() and not world.view.is_quarantined(PAYMENTS)
    assert gauge(world.rt).endswith(" 0.0")
    (event_,) = await audit_events(world.rt, "quarantine.release")
    assert event_.details["release_reason"] == "key rotated" and event_.details["added_by"] == OFFICER
    with pytest.raises(NotFoundError, match="is not in quarantine; `trustmesh quarantine list`"):
        await world.service.release(PAYMENTS, "again", OFFICER)


async def test_an_automatic_add_is_idempotent_and_keeps_the_evidence(world: World) -> None:
    first = await world.service.add(WEB, "identity", "new peer", "detector", node="node-2",
                                    evidence=("talked to spiffe://example.org/db", "x" * 5000), detector="new_peer",
                                    score=0.9)
    assert first.evidence[0] == "talked to spiffe://example.org/db" and len(first.evidence[1]) == 256
    again = await world.service.add(WEB, "identity", "volume", "detector", detector="volume", score=1.0)
    assert again == first  # unchanged: the first explanation stands
    (added,) = await audit_events(world.rt, "quarantine.add")
    assert added.details["detector"] == "new_peer" and added.details["score"] == 0.9
    assert added.details["node"] == "node-2" and len(added.details["evidence"]) == 2


async def test_a_node_is_quarantined_by_its_agents_id_and_released_by_its_name(world: World) -> None:
    q = await world.service.add("node-1", "node", "INC-2: host compromised", OFFICER)
    assert (q.target, q.kind, q.node) == (NODE_1, "node", "node-1")
    await world.settled()
    assert world.view.policy.quarantined == {NODE_1}
    with pytest.raises(NotFoundError, match="no attested node named 'node-9'"):
        await world.service.add("node-9", "node", "typo", OFFICER)
    assert (await world.service.release("node-1", "reimaged", OFFICER)).target == NODE_1


@pytest.mark.parametrize("target, kind, message", [
    ("not-an-id", "identity", "ID: invalid SPIFFE ID"),
    (TD, "identity", "has no path"),
    (NODE_1, "identity", "is an agent: quarantine its node with `trustmesh quarantine add node-1 --node"),
    (f"{TD}/agent", "identity", "reserved for trustmesh itself"),
    (f"{TD}/trustmesh/server", "identity", "reserved for trustmesh itself"),
    (OFFICER, "identity", "is an operator, not a workload"),
    ("spiffe://stranger.example/x", "identity", "does not federate with"),
    ("node/1", "node", "invalid node name"),
    (PAYMENTS, "person", "kind 'person': one of identity, node"),
])
async def test_bad_targets_are_refused_before_anything_is_stored(world: World, target: str, kind: str,
                                                                 message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        await world.service.add(target, kind, "why", OFFICER)
    assert await world.rt.store.list_quarantines() == []


async def test_a_federated_identity_may_be_quarantined(world: World) -> None:
    q = await world.service.add("spiffe://partner.example/settlement", "identity", "INC-3", OFFICER)
    assert q.target == "spiffe://partner.example/settlement"


async def test_at_most_so_many_quarantines_are_in_force(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quarantine_module, "MAX_QUARANTINES", 1)
    await world.service.add(PAYMENTS, "identity", "one", OFFICER)
    await world.settled()
    with pytest.raises(ResourceExhaustedError, match="1 quarantines are in force"):
        await world.service.add(WEB, "identity", "two", OFFICER)
    # An automatic add of what is there already is still answered (nothing new is stored).
    assert (await world.service.add(PAYMENTS, "identity", "x", "detector", detector="d")).reason == "one"


async def test_issuance_refuses_quarantined_identities_and_nodes_but_renews_the_agent(world: World) -> None:
    issuance = IssuanceService(world.rt, world.view)

    def csr(path: str) -> bytes:
        return build_csr(generate_private_key(), sid(path))

    outcomes = await issuance.sign_x509_batch(NODE_1, [X509Request("e-pay", csr(PAYMENTS))])
    assert isinstance(outcomes[0], X509Issued)
    await world.service.add(PAYMENTS, "identity", "INC-1", OFFICER)
    await world.settled()
    outcomes = await issuance.sign_x509_batch(NODE_1, [X509Request("e-pay", csr(PAYMENTS)),
                                                       X509Request("e-ledger", csr(LEDGER))])
    refused, issued = outcomes
    assert isinstance(refused, X509Refused) and refused.outcome == "denied" and isinstance(issued, X509Issued)
    assert refused.message.startswith(f"{PAYMENTS} is in quarantine: no SVID is issued for it; a security officer "
                                      f"releases it with `trustmesh quarantine release {PAYMENTS}")
    with pytest.raises(PermissionDeniedError, match="is in quarantine"):
        await issuance.sign_jwt(NODE_1, "e-pay", ["bank"])
    await issuance.sign_jwt(NODE_1, "e-ledger", ["bank"])

    await world.service.add("node-1", "node", "INC-2", OFFICER)
    await world.settled()
    (refused,) = await issuance.sign_x509_batch(NODE_1, [X509Request("e-ledger", csr(LEDGER))])
    assert isinstance(refused, X509Refused) and refused.message.startswith("node node-1 is in quarantine")
    assert "quarantine release node-1 " in refused.message
    with pytest.raises(PermissionDeniedError, match="node node-1 is in quarantine"):
        await issuance.sign_jwt(NODE_1, "e-ledger", ["bank"])
    (other,) = await issuance.sign_x509_batch(NODE_2, [X509Request("e-web", csr(WEB))])
    assert isinstance(other, X509Issued)  # another node is not concerned
    # The agent keeps its own identity, so that it learns of the release.
    agent_key = generate_private_key()
    renewed = await issuance.renew_agent(sid(NODE_1), world.view.node_for(NODE_1), build_csr(agent_key, sid(NODE_1)))
    assert str(renewed.spiffe_id) == NODE_1

    # Audited per agent, aggregated: the first refusal at once, the rest summed into the next event.
    (first,) = [e for e in await audit_events(world.rt, "svid.issue") if e.outcome == "denied"]
    assert first.actor == NODE_1 and first.details["reason"] == "in quarantine"
    assert first.details["spiffe_ids"] == [PAYMENTS] and first.details["x509"] == 1
    stop = asyncio.Event()
    stop.set()
    await issuance.quarantine_refusals.run(stop)  # at stop, what is pending is written
    denied = [e for e in await audit_events(world.rt, "svid.issue") if e.outcome == "denied"]
    assert len(denied) == 2 and denied[1].details["jwt"] == 2 and denied[1].details["x509"] == 1
    assert denied[1].details["node_quarantined"] == "node-1"



# --- the agent's inbound listener -------------------------------------------------------------


async def test_the_inbound_listener_cuts_and_refuses_quarantined_sources_and_nodes() -> None:
    """Real TLS on loopback: an open allowed connection is cut at the policy change that
    quarantines its source; a new one is refused after the handshake; a node quarantine (the
    agent's own ID) cuts and refuses everything, plaintext clients of a permissive listener too."""
    from tests.etcd_process import free_port
    from tests.unit.test_permissive_listener import FX, Seen, _echo, _exchange, _until
    from trustmesh.agent.proxy.listeners import Flow, InboundConfig, InboundListener, ServiceConfig
    from trustmesh.agent.proxy.tls import client_context
    from trustmesh.bundle import BundleSet
    from trustmesh.metrics import Registry
    from trustmesh.policy import Policy

    fx_policy = load_text(f"""
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: fx}}
spec: {{destination: "{FX}", allow: [{{from: "{PAYMENTS}"}}]}}
""", "fx.yaml").policy
    authority = Authority.make(TrustDomain("example.org"))
    svid, bundles = authority.svid("fx"), BundleSet([authority.bundle()])
    current: list[Policy] = [fx_policy]
    seen = Seen()
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    service = ServiceConfig("fx", FX, InboundConfig(f"127.0.0.1:{free_port()}",
                                                    f"127.0.0.1:{echo.sockets[0].getsockname()[1]}", "permissive"))
    flow = Flow(lambda _sid: svid, lambda: bundles, lambda: current[0], seen.report, Registry(),
                identities=None,  # type: ignore[arg-type]
                refused=lambda kind, subject, peer, reason: seen.refused.append(reason),
                traffic=seen.traffic, unverified=seen.unverified, node=sid(NODE_1))
    listener = InboundListener(service, flow)
    await listener.start()
    client = client_context(authority.svid("payments"), bundles)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port, ssl=client, server_hostname="fx")
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        current[0] = replace(fx_policy, quarantined=frozenset({PAYMENTS}))
        assert listener.recheck() == 1  # what the agent does on every policy it receives
        assert await asyncio.wait_for(reader.read(4), 5) == b""
        writer.close()
        cut = (PAYMENTS, str(FX), listener.port, "deny", QUARANTINE, "", "")
        assert seen.connections[cut] == 1
        assert await _exchange(listener.port, b"hello", client) == b""  # refused per connection
        await _until(lambda: seen.connections[cut] == 2)

        current[0] = fx_policy  # released
        assert await _exchange(listener.port, b"hello", client) == b"hello"
        plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", listener.port)
        plain_writer.write(b"GET /")
        assert await asyncio.wait_for(plain_reader.readexactly(5), 5) == b"GET /"
        current[0] = replace(fx_policy, quarantined=frozenset({NODE_1}))  # this node
        assert listener.recheck() == 1
        assert await asyncio.wait_for(plain_reader.read(5), 5) == b""
        plain_writer.close()
        assert await _exchange(listener.port, b"hello", client) == b""
        assert await _exchange(listener.port, b"GET /") == b""
        await _until(lambda: "quarantine" in seen.refused)
    finally:
        await listener.close()
        echo.close()


async def test_a_recomposed_policy_is_no_new_revision_converging(world: World) -> None:
    """A quarantine (or a grant) re-sends the revision in force with another quarantine set:
    the convergence histogram must count each revision once per stream, not the time since the
    revision's commit again (days, for a quarantine long after the last apply)."""
    from trustmesh.controlplane.policy_store import PolicyService
    from trustmesh.controlplane.sync_service import SyncService

    sync = SyncService(world.view, lambda: Authority.make(TrustDomain("example.org")).bundle(), world.rt.metrics,
                       world.rt.clock)
    world.view.subscribe(sync.on_registry_event)

    def converged() -> float:
        return next(float(line.split()[-1]) for line in world.rt.metrics.render().splitlines()
                    if line.startswith("trustmesh_policy_convergence_seconds_count"))

    class Peer:
        id, serial = NODE_1, "1"

    await PolicyService(world.rt).apply(
        f"apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {{name: l}}\nspec: {{destination: {LEDGER}, "
        f"allow: [{{from: {PAYMENTS}}}]}}\n", author="t", comment="", expected_head=0, dry_run=False, actor="t")
    await world.settled()
    with sync.open(Peer(), node("node-1"), 4e9) as stream:
        stream.start(0, {})
        await world.service.add(WEB, "identity", "INC-2", OFFICER)
        await world.settled()
        messages = await asyncio.wait_for(stream.next(), 5)
        assert any(m.delta.policy.quarantined == [WEB] for m in messages if m.WhichOneof("body") == "delta")
        assert converged() == 0.0


async def test_detection_acts_on_a_report_and_its_baselines_survive_a_restart_sealed(world: World,
                                                                                     tmp_path: Path) -> None:
    """The server's detection service on a real registry view and store: an accepted report
    that sweeps is quarantined through the quarantine service (default responses only alert, so
    a Response document is applied first); the baselines are saved sealed with the KEK, come
    back after a restart, and a tampered or foreign-key state is refused (learned again)."""
    from trustmesh.controlplane.ca.kek import KeyEncryptionKey
    from trustmesh.controlplane.detection import STATE_FILE, DetectionService
    from trustmesh.controlplane.flow_audit import FlowCounter
    from trustmesh.controlplane.policy_store import PolicyService

    kek = KeyEncryptionKey(bytes(range(32)))
    await PolicyService(world.rt).apply(
        "apiVersion: trustmesh/v1\nkind: Response\nmetadata: {name: r}\nspec:\n  rules:\n"
        "    - {identity: '*', detectors: [sweep], action: quarantine, above: 0.5}\n",
        author="t", comment="", expected_head=0, dry_run=False, actor="t")
    await world.settled()
    detection = DetectionService(world.rt, world.view, world.service, learn=0.0, state_dir=tmp_path, sealer=kek)
    sweep = [(FlowCounter(PAYMENTS, f"{TD}/svc{i}", 443, True, False, "", 1, 0, 0), True) for i in range(6)]
    alerts = await detection.observe(NODE_1, sweep)
    assert [(a.detector, a.action) for a in alerts] == [("sweep", "quarantine")]
    await world.settled()
    assert world.view.is_quarantined(PAYMENTS)
    (added,) = await audit_events(world.rt, "quarantine.add")
    assert added.actor == "detector" and added.details["detector"] == "sweep"
    (anomaly,) = await audit_events(world.rt, "detect.anomaly")
    assert anomaly.subject == PAYMENTS and anomaly.details["quarantined"] == f"identity {PAYMENTS}"

    await detection.save()
    state = tmp_path / STATE_FILE
    assert state.stat().st_mode & 0o777 == 0o600 and PAYMENTS.encode() not in state.read_bytes()  # sealed
    restarted = DetectionService(world.rt, world.view, world.service, learn=0.0, state_dir=tmp_path, sealer=kek)
    restarted.load()
    assert restarted.engine.identities() == 1
    for blob in (state.read_bytes()[:-1] + bytes([state.read_bytes()[-1] ^ 1]),):
        state.write_bytes(blob)
        tampered = DetectionService(world.rt, world.view, world.service, learn=0.0, state_dir=tmp_path, sealer=kek)
        tampered.load()
        assert tampered.engine.identities() == 0  # refused: learned afresh, never a forged baseline
    other = KeyEncryptionKey(bytes(range(1, 33)))
    await detection.save()
    foreign = DetectionService(world.rt, world.view, world.service, learn=0.0, state_dir=tmp_path, sealer=other)
    foreign.load()
    assert foreign.engine.identities() == 0
