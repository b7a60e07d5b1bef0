"""The sync stream, scripted message by message: snapshot pages swap in atomically, deltas
apply, the revision resumes, state survives a restart, and the reconnect reasons (server
unreachable, agent banned, SVID rotated) are told apart in state, logs and metrics."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from trustmesh._proto.trustmesh.v1 import node_pb2, types_pb2
from trustmesh.agent.config import RotationConfig
from trustmesh.agent.convert import AgentEntry
from trustmesh.agent.sync import STATE_FILE, SyncClient, SyncState
from trustmesh.bundle import Bundle, BundleSet
from trustmesh.keys import generate_private_key
from trustmesh.metrics import Registry
from trustmesh.policy import PolicyError
from trustmesh.spiffeid import TrustDomain
from trustmesh.x509svid import build_ca_certificate

TD = TrustDomain("example.org")
PARTNER = TrustDomain("partner.example")
NOW = datetime.now(timezone.utc)


def root_der(td: TrustDomain) -> bytes:
    key = generate_private_key()
    cert = build_ca_certificate(trust_domain=td, public_key=key.public_key(), issuer=None, issuer_key=key,
                                not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(days=1),
                                path_length=1, common_name="root")
    return cert.public_bytes(serialization.Encoding.DER)


OWN_ROOT, PARTNER_ROOT = root_der(TD), root_der(PARTNER)


def pb_entry(name: str, revision: int = 1) -> types_pb2.Entry:
    return types_pb2.Entry(id=name, spiffe_id=f"spiffe://example.org/{name}", revision=revision,
                           selectors=[types_pb2.Selector(type="unix", value="uid:1000")])


def pb_bundle(td: TrustDomain, der: bytes, seq: int = 1) -> types_pb2.Bundle:
    return types_pb2.Bundle(trust_domain=td.name, x509_authorities=[der], sequence_number=seq)


def snapshot(revision: int, pages: list[list[str]], bundles: list[types_pb2.Bundle],
             policy_revision: int = 0) -> list[node_pb2.SyncResponse]:
    out = []
    for i, names in enumerate(pages):
        last = i == len(pages) - 1
        out.append(node_pb2.SyncResponse(revision=revision, snapshot=node_pb2.SyncSnapshot(
            entries=[pb_entry(n) for n in names], page=i, last=last, bundles=bundles if last else [],
            policy=types_pb2.CompiledPolicy(revision=policy_revision) if last else None)))
    return out


def delta(revision: int, **kw: object) -> node_pb2.SyncResponse:
    return node_pb2.SyncResponse(revision=revision, delta=node_pb2.SyncDelta(**kw))  # type: ignore[arg-type]


# --- the pure state ---------------------------------------------------------------------------


def test_snapshot_pages_become_visible_only_on_the_last_one() -> None:
    state = SyncState()
    state.entries = {"old": AgentEntry.from_dict({"id": "old", "spiffe_id": "spiffe://example.org/old",
                                                  "selectors": [], "x509_ttl": 0, "jwt_ttl": 0, "dns_names": [],
                                                  "federates_with": [], "revision": 1})}
    state.bundles = {PARTNER: Bundle.from_der(PARTNER_ROOT, PARTNER)}
    first, second = snapshot(7, [["a", "b"], ["c"]], [pb_bundle(TD, OWN_ROOT)], policy_revision=3)
    assert state.apply(first) is False
    assert set(state.entries) == {"old"} and state.revision == 0, "half a snapshot is never visible"
    assert state.apply(second) is True
    assert set(state.entries) == {"a", "b", "c"}
    assert set(state.bundles) == {TD}, "a snapshot replaces the bundles too: the partner is gone"
    assert state.revision == 7 and state.policy.revision == 3


def test_an_interrupted_snapshot_is_discarded_on_a_new_stream() -> None:
    state = SyncState()
    state.apply(snapshot(5, [["a"], ["b"]], [])[0])
    state.start_stream()
    state.apply(snapshot(6, [["c"]], [])[0])
    assert set(state.entries) == {"c"}


def test_deltas_upsert_delete_and_move_the_revision() -> None:
    state = SyncState()
    for message in snapshot(3, [["a", "b"]], [pb_bundle(TD, OWN_ROOT)]):
        state.apply(message)
    assert state.apply(delta(4, upserted_entries=[pb_entry("c"), pb_entry("a", revision=4)],
                             deleted_entry_ids=["b"], bundles=[pb_bundle(PARTNER, PARTNER_ROOT, 9)]))
    assert set(state.entries) == {"a", "c"} and state.entries["a"].revision == 4
    assert set(state.bundles) == {TD, PARTNER} and state.revision == 4
    state.apply(delta(5, deleted_bundles=[PARTNER.name], policy=types_pb2.CompiledPolicy(revision=8)))
    assert set(state.bundles) == {TD} and state.policy.revision == 8
    # A paged delta: the first page carries the old revision, so a cut stream resumes before it.
    state.apply(delta(5, upserted_entries=[pb_entry("d")]))
    assert state.revision == 5
    state.apply(delta(6, upserted_entries=[pb_entry("e")]))
    assert state.revision == 6


def test_a_delta_whose_policy_this_agent_cannot_use_changes_nothing() -> None:
    state = SyncState()
    for message in snapshot(3, [["a"]], [], policy_revision=2):
        state.apply(message)
    unusable = types_pb2.CompiledPolicy(revision=9, rules=[types_pb2.PolicyRule(
        destination="spiffe://example.org/ledger", allowlist="ledger-read",
        allow=[types_pb2.AllowedSource(id="spiffe://example.org/fraud", methods=["get"], paths=["/a"])])])
    with pytest.raises(PolicyError, match="ledger-read"):
        state.apply(delta(4, upserted_entries=[pb_entry("b")], policy=unusable))
    assert set(state.entries) == {"a"} and state.policy.revision == 2 and state.revision == 3


def test_the_request_resumes_with_revision_and_bundle_sequences() -> None:
    state = SyncState()
    assert state.request().since_revision == 0
    for message in snapshot(12, [["a"]], [pb_bundle(TD, OWN_ROOT, 4), pb_bundle(PARTNER, PARTNER_ROOT, 2)], 5):
        state.apply(message)
    req = state.request()
    assert req.since_revision == 12 and req.policy_revision == 5
    assert dict(req.bundle_sequences) == {"example.org": 4, "partner.example": 2}


def test_state_round_trips_through_json() -> None:
    state = SyncState()
    for message in snapshot(12, [["a", "b"]], [pb_bundle(TD, OWN_ROOT, 4)], 5):
        state.apply(message)
    again = SyncState()
    again.load_json(state.to_json())
    assert again.entries == state.entries and again.revision == 12 and again.policy.revision == 5
    assert again.bundles[TD].x509_authorities == state.bundles[TD].x509_authorities
    with pytest.raises(ValueError):
        SyncState().load_json(b'{"entries": 3}')
    with pytest.raises(ValueError):
        SyncState().load_json(b"not json")


# --- the client, against a scripted connection ----------------------------------------------


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), f"{code.name.lower()} for test")


class FakeCall:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.cancelled = False

    async def read(self) -> object:
        item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeConnection:
    """Each Sync call takes the next FakeCall; tests feed it messages and errors."""

    def __init__(self) -> None:
        self.requests: list[node_pb2.SyncRequest] = []
        self.calls: list[FakeCall] = []
        self.opened = asyncio.Event()
        self.generation = 0
        self.failovers = 0
        self._new = asyncio.Event()
        self.address = "cp:8081"
        self.untrusted_because: str | None = None  # what the TLS check of the server would say

    async def untrusted(self) -> str | None:
        return self.untrusted_because

    @property
    def untrusted_message(self) -> str:
        return "the server's certificate does not chain to the trust bundle /b.pem; check --trust-bundle"

    async def wait_new_generation(self, after: int) -> int:
        while self.generation <= after:
            await self._new.wait()
        return self.generation

    def rotate(self) -> None:
        self.generation += 1
        event, self._new = self._new, asyncio.Event()
        event.set()

    def failover(self) -> None:
        self.failovers += 1
        self.rotate()

    def stub(self) -> FakeConnection:
        return self

    def Sync(self, request: node_pb2.SyncRequest) -> FakeCall:  # noqa: N802 (the stub's name)
        self.requests.append(request)
        call = FakeCall()
        self.calls.append(call)
        self.opened.set()
        return call

    async def next_call(self, count: int) -> FakeCall:
        async with asyncio.timeout(3):
            while len(self.calls) < count:
                self.opened.clear()
                await self.opened.wait()
        return self.calls[count - 1]


class Sink:
    def __init__(self) -> None:
        self.entries: dict[str, AgentEntry] = {}
        self.bundles = BundleSet()
        self.changed = asyncio.Event()

    def set_entries(self, entries: dict[str, AgentEntry]) -> None:
        self.entries = dict(entries)
        self.changed.set()

    def set_bundles(self, bundles: BundleSet) -> None:
        self.bundles = bundles


FAST = RotationConfig(backoff_base=0.01, backoff_cap=0.02, refused_retry=30)


def make(tmp_path: Path, **kw: object) -> tuple[SyncClient, FakeConnection, Sink, Registry, list[Bundle]]:
    conn, sink, registry = FakeConnection(), Sink(), Registry()
    own: list[Bundle] = []
    client = SyncClient(conn, sink, tmp_path, TD, registry, own.append, random.Random(1),  # type: ignore[arg-type]
                        rotation=kw.pop("rotation", FAST), **kw)  # type: ignore[arg-type]
    return client, conn, sink, registry, own


def metric(registry: Registry, line: str) -> bool:
    # By value: the exposition prints 1 as "1.0".
    sample, value = line.rsplit(" ", 1)
    return any(s == sample and float(v) == float(value)
               for s, _, v in (rendered.rpartition(" ") for rendered in registry.render().splitlines()))


async def until(predicate: object, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_connect_apply_persist_and_resume_after_unreachable(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client, conn, sink, registry, own = make(tmp_path)
    task = asyncio.create_task(client.run())
    try:
        call = await conn.next_call(1)
        assert conn.requests[0].since_revision == 0
        for message in snapshot(10, [["a"], ["b"]], [pb_bundle(TD, OWN_ROOT, 3)]):
            call.queue.put_nowait(message)
        await until(lambda: set(sink.entries) == {"a", "b"})
        assert client.state == "connected" and metric(registry, 'trustmesh_agent_server_state{state="connected"} 1')
        assert own and own[-1].trust_domain == TD, "the own bundle goes to the channel's roots"
        assert (tmp_path / STATE_FILE).exists()
        call.queue.put_nowait(rpc_error(grpc.StatusCode.UNAVAILABLE))
        call2 = await conn.next_call(2)
        assert conn.failovers == 1, "the next address is tried"
        assert metric(registry, 'trustmesh_agent_server_state{state="unreachable"} 1')
        assert metric(registry, 'trustmesh_agent_sync_reconnects_total{reason="unreachable"} 1')
        assert conn.requests[1].since_revision == 10 and dict(conn.requests[1].bundle_sequences) == {"example.org": 3}
        call2.queue.put_nowait(delta(11, deleted_entry_ids=["a"]))
        await until(lambda: set(sink.entries) == {"b"})
        assert client.state == "connected"
    finally:
        task.cancel()
    assert [m for m, in [(r.getMessage(),) for r in caplog.records] if m == "server_unreachable"]
    # A restart (server still down) serves the persisted state at once.
    again, _, sink2, _, _ = make(tmp_path)
    again.load_persisted()
    assert set(sink2.entries) == {"b"} and again.revision == 11


async def test_banned_is_told_apart_and_retried_only_rarely(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client, conn, sink, registry, _ = make(tmp_path)
    task = asyncio.create_task(client.run())
    try:
        call = await conn.next_call(1)
        for message in snapshot(4, [["a"]], []):
            call.queue.put_nowait(message)
        await until(lambda: "a" in sink.entries)
        call.queue.put_nowait(rpc_error(grpc.StatusCode.PERMISSION_DENIED))
        await until(lambda: client.state == "banned")
        await asyncio.sleep(0.3)
        assert len(conn.calls) == 1, "no reconnect storm: refused_retry is 30 s"
        assert conn.failovers == 0, "a ban is not a server problem: no failover"
        assert metric(registry, 'trustmesh_agent_server_state{state="banned"} 1')
        assert metric(registry, 'trustmesh_agent_server_state{state="unreachable"} 0')
        assert metric(registry, 'trustmesh_agent_sync_reconnects_total{reason="banned"} 1')
        assert set(sink.entries) == {"a"}, "it keeps serving what it has"
    finally:
        task.cancel()
    refused = [r for r in caplog.records if r.getMessage() == "agent_refused"]
    assert refused and "an operator must re-admit it" in str(refused[0].fields["hint"])


async def test_an_untrusted_server_is_named_once_and_retried(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client, conn, sink, registry, _ = make(tmp_path)
    conn.untrusted_because = "unable to get local issuer certificate"
    task = asyncio.create_task(client.run())
    try:
        for n in range(1, 5):
            (await conn.next_call(n)).queue.put_nowait(rpc_error(grpc.StatusCode.UNAVAILABLE))
        await conn.next_call(5)
        assert client.state == "untrusted" and metric(registry, 'trustmesh_agent_server_state{state="untrusted"} 1')
        assert metric(registry, 'trustmesh_agent_server_state{state="unreachable"} 0')
        assert metric(registry, 'trustmesh_agent_sync_reconnects_total{reason="untrusted"} 4')
        assert conn.failovers == 4, "another replica may be the right server"
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.getMessage() for r in errors] == ["server_untrusted"], "said once, at ERROR, not per retry"
        assert errors[0].levelno == logging.ERROR and "check --trust-bundle" in str(errors[0].fields["error"])
        # Fixed (the right server answers): connected again; broken again later: said again.
        conn.untrusted_because = None
        for message in snapshot(4, [["a"]], []):
            conn.calls[4].queue.put_nowait(message)
        await until(lambda: client.state == "connected")
        conn.untrusted_because = "unable to get local issuer certificate"
        conn.calls[4].queue.put_nowait(rpc_error(grpc.StatusCode.UNAVAILABLE))
        await conn.next_call(6)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == ["server_untrusted"] * 2
    finally:
        task.cancel()


async def test_a_rotated_svid_reopens_the_stream_at_once(tmp_path: Path) -> None:
    client, conn, sink, registry, _ = make(tmp_path, rotation=RotationConfig(backoff_base=5, backoff_cap=10))
    task = asyncio.create_task(client.run())
    try:
        call = await conn.next_call(1)
        for message in snapshot(4, [["a"]], []):
            call.queue.put_nowait(message)
        await until(lambda: "a" in sink.entries)
        conn.rotate()  # the agent SVID was renewed: a new channel
        await conn.next_call(2)  # at once, although the backoff base is 5 s
        assert call.cancelled and conn.requests[1].since_revision == 4
        assert metric(registry, 'trustmesh_agent_sync_reconnects_total{reason="rotated"} 1')
    finally:
        task.cancel()


async def test_a_silent_stream_is_treated_as_dead(tmp_path: Path) -> None:
    client, conn, _, registry, _ = make(tmp_path, idle_timeout=0.2)
    task = asyncio.create_task(client.run())
    try:
        call = await conn.next_call(1)
        await conn.next_call(2)
        assert call.cancelled and client.state == "unreachable"
    finally:
        task.cancel()


async def test_cancelling_mid_snapshot_leaves_the_old_state(tmp_path: Path) -> None:
    client, conn, sink, _, _ = make(tmp_path)
    task = asyncio.create_task(client.run())
    call = await conn.next_call(1)
    for message in snapshot(4, [["a"]], []):
        call.queue.put_nowait(message)
    await until(lambda: "a" in sink.entries)
    call.queue.put_nowait(rpc_error(grpc.StatusCode.UNAVAILABLE))
    call2 = await conn.next_call(2)
    call2.queue.put_nowait(snapshot(9, [["x"], ["y"]], [])[0])  # page 1 of 2, then cancelled
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert call2.cancelled and set(sink.entries) == {"a"} and client.revision == 4
