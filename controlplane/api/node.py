"""The agent-facing Node service: attestation, renewal, the sync stream, issuance.

Every call but Attest is authenticated by the agent's X509-SVID (peer.py) and checked
against the in-memory attested-node records, which the store's change feed keeps current:
a ban or eviction takes effect for the next call and closes the agent's sync stream at once,
and authenticating a call costs no store read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import timedelta

import grpc
from cryptography.hazmat.primitives.serialization import Encoding

from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc, types_pb2
from trustmesh.errors import CAError, StoreError, SvidError, TrustmeshError
from trustmesh.logs import log_event
from trustmesh.naming import server_id
from trustmesh.policy import Policy
from trustmesh.policy.wire import policy_to_pb
from trustmesh.spiffeid import SpiffeId

from controlplane.api.convert import bundle_to_pb, entry_to_pb
from controlplane.api.peer import PeerAgent, peer_agent
from controlplane.api.status import (
    InvalidArgumentError,
    PermissionDeniedError,
    UnavailableError,
    grpc_errors,
    status_code_for,
)
from controlplane.attestation import NodeAttestor
from controlplane.authorized import AuthorizedIndex
from controlplane.runtime import ServerRuntime
from controlplane.store import CompactedError
from controlplane.policy_store import PolicyService
from controlplane.store.records import AttestedNode, PolicyRevision, RegistrationEntry

log = logging.getLogger("trustmesh.node")

MAX_BATCH = 1000
SNAPSHOT_PAGE = 500  # entries per sync page: far below the 4 MB message limit
ATTEST_STEP_TIMEOUT = 30.0
RENEWAL_GRACE = 300.0  # seconds the previous agent SVID keeps working after a renewal
MAX_AUDIENCES = 16
MAX_FLOW_COUNTERS = 10_000
_DER = Encoding.DER


@dataclass(eq=False)
class _Stream:
    agent: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    bundle_dirty: bool = False


class NodeServicer(node_pb2_grpc.NodeServicer):
    def __init__(self, api: NodeAPI) -> None:
        self._api = api
        self._rt = api.rt

    # --- attestation --------------------------------------------------------------------

    async def Attest(self, request_iterator: AsyncIterator[node_pb2.AttestRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.AttestResponse]:
        async with grpc_errors(context, "Attest"):
            first = await self._next(request_iterator)
            step = first.WhichOneof("step")
            if step == "join_token":
                attested = await self._api.attestor.attest_join_token(first.join_token, first.csr)
            elif step == "x509pop":
                challenge = await self._api.attestor.x509pop_challenge(list(first.x509pop.cert_chain))
                yield node_pb2.AttestResponse(challenge=node_pb2.X509PopChallenge(nonce=challenge.nonce))
                answer = await self._next(request_iterator)
                if answer.WhichOneof("step") != "challenge_response":
                    raise InvalidArgumentError("expected the x509pop challenge response")
                attested = await self._api.attestor.x509pop_finish(
                    challenge, answer.challenge_response.signature, answer.csr or first.csr)
            else:
                raise InvalidArgumentError("the first Attest message must carry a join_token or x509pop evidence")
            self._api.nodes_changed(attested.node)
            yield node_pb2.AttestResponse(result=node_pb2.AttestResult(
                spiffe_id=str(attested.svid.spiffe_id),
                svid_chain=[c.public_bytes(_DER) for c in attested.svid.cert_chain],
                bundle=bundle_to_pb(self._rt.ca.bundle()),
            ))

    async def _next(self, it: AsyncIterator[node_pb2.AttestRequest]) -> node_pb2.AttestRequest:
        try:
            return await asyncio.wait_for(it.__anext__(), timeout=ATTEST_STEP_TIMEOUT)
        except StopAsyncIteration:
            raise InvalidArgumentError("the Attest stream ended before attestation finished") from None
        except asyncio.TimeoutError:
            raise InvalidArgumentError(f"no Attest message within {ATTEST_STEP_TIMEOUT:.0f}s") from None

    async def RenewAgent(self, request: node_pb2.RenewAgentRequest,
                         context: grpc.aio.ServicerContext) -> node_pb2.RenewAgentResponse:
        async with grpc_errors(context, "RenewAgent"):
            peer, node = self._api.authenticate(context)
            try:
                svid = await self._rt.ca.sign_x509_svid(request.csr, peer.spiffe_id, self._rt.config.agent_ttl)
            except SvidError as err:
                raise InvalidArgumentError(f"agent CSR refused: {err}") from err
            updated = await self._rt.store.update_attested_node(
                _replace_node(node, format(svid.leaf.serial_number, "x"), svid.expires_at.timestamp(),
                              self._rt.clock()),
                expected_revision=node.revision or None)
            self._api.remember_previous_serial(peer.id, node.cert_serial)
            self._api.nodes_changed(updated)
            await self._rt.audit.record("agent.renew", actor=peer.id, subject=peer.id,
                                        serial=updated.cert_serial)
            return node_pb2.RenewAgentResponse(svid_chain=[c.public_bytes(_DER) for c in svid.cert_chain])

    # --- sync ---------------------------------------------------------------------------

    async def Sync(self, request: node_pb2.SyncRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.SyncResponse]:
        async with grpc_errors(context, "Sync"):
            peer, _ = self._api.authenticate(context)
            await self._api.ready.wait()
            stream = self._api.open_stream(peer.id)
            gauge = self._rt.metrics.gauge("trustmesh_sync_streams", "open agent sync streams")
            gauge.inc()
            try:
                sent: dict[str, int] = {}
                entries = self._api.index.authorized_for(peer.id)
                revision = self._api.revision
                policy = self._api.compiled_policy_for(peer.id)
                pages = [entries[i:i + SNAPSHOT_PAGE] for i in range(0, len(entries), SNAPSHOT_PAGE)] or [[]]
                for number, page in enumerate(pages):
                    last = number == len(pages) - 1
                    yield node_pb2.SyncResponse(revision=revision, snapshot=node_pb2.SyncSnapshot(
                        entries=[entry_to_pb(e) for e in page],
                        bundles=[bundle_to_pb(self._rt.ca.bundle())] if last else [],
                        policy=policy if last else types_pb2.CompiledPolicy(), page=number, last=last))
                sent = {e.id: e.revision for e in entries}
                while True:
                    await stream.wake.wait()
                    stream.wake.clear()
                    self._api.authenticate_id(peer)  # banned or evicted: ends the stream here
                    current = {e.id: e for e in self._api.index.authorized_for(peer.id)}
                    upserted = [e for i, e in current.items() if sent.get(i) != e.revision]
                    deleted = [i for i in sent if i not in current]
                    bundles = [bundle_to_pb(self._rt.ca.bundle())] if stream.bundle_dirty else []
                    stream.bundle_dirty = False
                    new_policy = self._api.compiled_policy_for(peer.id)
                    policy_changed = new_policy != policy
                    if not (upserted or deleted or bundles or policy_changed):
                        continue
                    sent = {i: e.revision for i, e in current.items()}
                    policy = new_policy
                    yield node_pb2.SyncResponse(revision=self._api.revision, delta=node_pb2.SyncDelta(
                        upserted_entries=[entry_to_pb(e) for e in upserted], deleted_entry_ids=deleted,
                        bundles=bundles, policy=new_policy if policy_changed else None))
            finally:
                gauge.dec()
                self._api.close_stream(stream)

    # --- issuance ---------------------------------------------------------------------------

    async def BatchSignX509(self, request: node_pb2.BatchSignX509Request,
                            context: grpc.aio.ServicerContext) -> node_pb2.BatchSignX509Response:
        async with grpc_errors(context, "BatchSignX509"):
            peer, _ = self._api.authenticate(context)
            if not request.items:
                raise InvalidArgumentError("the batch is empty")
            if len(request.items) > MAX_BATCH:
                raise InvalidArgumentError(f"at most {MAX_BATCH} items per batch, got {len(request.items)}")
            results: list[node_pb2.X509SignResult | None] = [None] * len(request.items)
            work: list[tuple[int, RegistrationEntry]] = []
            denied: list[str] = []
            for i, item in enumerate(request.items):
                entry = self._api.index.entries.get(item.entry_id)
                if entry is None or not self._api.index.is_authorized(peer.id, item.entry_id):
                    denied.append(item.entry_id[:64])
                    results[i] = _item_error(item.entry_id, grpc.StatusCode.PERMISSION_DENIED,
                                             f"entry {item.entry_id[:64]!r} is not authorized for agent {peer.id}")
                else:
                    work.append((i, entry))
            default_ttl = self._rt.config.default_x509_ttl
            signed = await self._rt.ca.sign_x509_svids([
                (request.items[i].csr, SpiffeId.parse(e.spiffe_id),
                 timedelta(seconds=e.x509_ttl) if e.x509_ttl else default_ttl, e.dns_names)
                for i, e in work
            ])
            issued: list[str] = []
            invalid = 0
            for (i, entry), outcome in zip(work, signed):
                if isinstance(outcome, TrustmeshError):
                    invalid += 1
                    code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(outcome, (SvidError, CAError)) \
                        else status_code_for(outcome)
                    results[i] = _item_error(entry.id, code, f"entry {entry.id}: {outcome}")
                    continue
                issued.append(entry.id)
                results[i] = node_pb2.X509SignResult(entry_id=entry.id, svid=node_pb2.X509Svid(
                    spiffe_id=entry.spiffe_id, cert_chain=[c.public_bytes(_DER) for c in outcome.cert_chain],
                    expires_at=int(outcome.expires_at.timestamp())))
            counter = self._rt.metrics.counter("trustmesh_x509_svids_total", "X509-SVID requests by outcome",
                                               ["outcome"])
            counter.inc(len(issued), outcome="issued")
            counter.inc(len(denied), outcome="denied")
            counter.inc(invalid, outcome="invalid")
            if issued or invalid:
                await self._rt.audit.record("svid.issue", actor=peer.id, subject=peer.id,
                                            outcome="ok" if not invalid else "partial",
                                            issued=len(issued), invalid=invalid, entry_ids=issued[:100])
            if denied:
                await self._rt.audit.record("svid.issue", actor=peer.id, subject=peer.id, outcome="denied",
                                            reason="entries not authorized for this agent", entry_ids=denied[:100])
            return node_pb2.BatchSignX509Response(results=[r for r in results if r is not None])

    async def SignJWT(self, request: node_pb2.SignJWTRequest,
                      context: grpc.aio.ServicerContext) -> node_pb2.SignJWTResponse:
        async with grpc_errors(context, "SignJWT"):
            peer, _ = self._api.authenticate(context)
            audiences = list(request.audiences)
            if not audiences or len(audiences) > MAX_AUDIENCES or any(not a or len(a) > 256 for a in audiences):
                raise InvalidArgumentError(f"give 1 to {MAX_AUDIENCES} audiences of 1 to 256 characters")
            entry = self._api.index.entries.get(request.entry_id)
            if entry is None or not self._api.index.is_authorized(peer.id, request.entry_id):
                await self._rt.audit.record("jwt.issue", actor=peer.id, subject=request.entry_id[:64],
                                            outcome="denied", reason="entry not authorized for this agent")
                raise PermissionDeniedError(f"entry {request.entry_id[:64]!r} is not authorized for agent {peer.id}")
            ttl = timedelta(seconds=entry.jwt_ttl) if entry.jwt_ttl else self._rt.config.default_jwt_ttl
            token, expires = self._rt.ca.sign_jwt_svid(SpiffeId.parse(entry.spiffe_id), audiences, ttl)
            await self._rt.audit.record("jwt.issue", actor=peer.id, subject=entry.spiffe_id, audiences=audiences)
            return node_pb2.SignJWTResponse(token=token, expires_at=int(expires.timestamp()))

    async def ReportFlows(self, request: node_pb2.ReportFlowsRequest,
                          context: grpc.aio.ServicerContext) -> node_pb2.ReportFlowsResponse:
        async with grpc_errors(context, "ReportFlows"):
            peer, _ = self._api.authenticate(context)
            if len(request.counters) > MAX_FLOW_COUNTERS:
                raise InvalidArgumentError(f"at most {MAX_FLOW_COUNTERS} counters per report")
            counter = self._rt.metrics.counter("trustmesh_flow_decisions_total",
                                               "connection decisions reported by agents", ["decision"])
            for c in request.counters:
                if c.count < 0 or c.port > 65535 or len(c.source_id) > 2048 or len(c.destination_id) > 2048 \
                        or len(c.rule) > 512:
                    raise InvalidArgumentError("a flow counter is out of range")
                denied = c.decision == node_pb2.FLOW_DECISION_DENY
                audit_mode = c.mode == types_pb2.POLICY_MODE_AUDIT
                counter.inc(c.count, decision="deny" if denied else ("audit" if audit_mode else "allow"))
                if denied or audit_mode:
                    # Denials, and what audit mode would have denied, become audit events.
                    await self._rt.audit.record(
                        "connection.denied" if denied else "connection.audit", actor=peer.id,
                        subject=c.destination_id, outcome="denied" if denied else "would-deny",
                        source=c.source_id or "unverified", port=c.port, rule=c.rule, count=c.count,
                        first_seen=c.first_seen, last_seen=c.last_seen)
            return node_pb2.ReportFlowsResponse()


class NodeAPI:
    """The Node service plus the state it shares: the index, node records, open streams."""

    def __init__(self, rt: ServerRuntime) -> None:
        self.rt = rt
        self.index = AuthorizedIndex(str(server_id(rt.config.trust_domain)))
        self.attestor = NodeAttestor(rt)
        self.ready = asyncio.Event()
        self.revision = 0
        self._streams: dict[str, set[_Stream]] = defaultdict(set)
        self._previous_serials: dict[str, tuple[str, float]] = {}
        self.policy = Policy()

    def register(self, server: grpc.aio.Server) -> None:
        node_pb2_grpc.add_NodeServicer_to_server(NodeServicer(self), server)

    def register_attestation(self, server: grpc.aio.Server) -> None:
        """Only Attest, for the listener that does not ask for client certificates."""
        servicer = NodeServicer(self)
        handler = grpc.method_handlers_generic_handler("trustmesh.v1.Node", {
            "Attest": grpc.stream_stream_rpc_method_handler(
                servicer.Attest,
                request_deserializer=node_pb2.AttestRequest.FromString,
                response_serializer=node_pb2.AttestResponse.SerializeToString,
            ),
        })
        server.add_generic_rpc_handlers((handler,))

    # --- authentication -----------------------------------------------------------------

    def authenticate(self, context: grpc.aio.ServicerContext) -> tuple[PeerAgent, AttestedNode]:
        peer = peer_agent(context, self.rt.config.trust_domain)
        return peer, self.authenticate_id(peer)

    def authenticate_id(self, peer: PeerAgent) -> AttestedNode:
        if not self.ready.is_set():
            raise UnavailableError("the server is still loading its registry; retry in a moment")
        node = self.index.nodes.get(peer.id)
        if node is None:
            raise PermissionDeniedError(f"agent {peer.id} is not attested (evicted?); re-attest with a new join token")
        if node.banned:
            raise PermissionDeniedError(f"agent {peer.id} is banned")
        if peer.serial != node.cert_serial:
            previous = self._previous_serials.get(peer.id)
            if previous is None or previous[0] != peer.serial or previous[1] < time.monotonic():
                raise PermissionDeniedError(
                    f"agent {peer.id} presented a superseded SVID (serial {peer.serial}); use the renewed one")
        return node

    def is_admin(self, spiffe_id: str) -> bool:
        """True when some registration entry for this ID is marked admin."""
        return any(e.admin and e.spiffe_id == spiffe_id for e in self.index.entries.values())

    def remember_previous_serial(self, agent: str, serial: str) -> None:
        self._previous_serials[agent] = (serial, time.monotonic() + RENEWAL_GRACE)

    # --- streams ----------------------------------------------------------------------------

    def open_stream(self, agent: str) -> _Stream:
        stream = _Stream(agent)
        self._streams[agent].add(stream)
        return stream

    def close_stream(self, stream: _Stream) -> None:
        streams = self._streams.get(stream.agent)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._streams[stream.agent]

    def _wake(self, agents: set[str], bundle: bool = False) -> None:
        for agent in agents:
            for stream in self._streams.get(agent, ()):
                stream.bundle_dirty |= bundle
                stream.wake.set()

    def nodes_changed(self, node: AttestedNode) -> None:
        """Apply our own node write at once (the change feed will confirm it)."""
        if self.ready.is_set():
            self._wake(self.index.apply_node(node.spiffe_id, node))

    # --- the change feed ----------------------------------------------------------------

    def compiled_policy_for(self, agent: str) -> types_pb2.CompiledPolicy:
        """The allowlists deciding for the destinations this agent's workloads serve."""
        ids = [SpiffeId.parse(e.spiffe_id) for e in self.index.authorized_for(agent)]
        return policy_to_pb(self.policy.for_destinations(ids))

    async def _load(self) -> int:
        store = self.rt.store
        revision = await store.current_revision()
        self.index.load(await store.list_entries(), await store.list_attested_nodes())
        self.policy = PolicyService.parse_stored(await store.get_policy_head())
        self.revision = revision
        self.ready.set()
        log_event(log, "registry_loaded", entries=len(self.index.entries), agents=len(self.index.nodes),
                  revision=revision)
        return revision

    async def _follow(self) -> None:
        revision = await self._load()
        while True:
            try:
                async for batch in self.rt.store.watch(revision):
                    for change in batch:
                        await self._apply(change.kind, change.key, change.record)
                        revision = max(revision, change.revision)
                    self.revision = revision
            except CompactedError:
                log_event(log, "change_feed_compacted", level=logging.WARNING, revision=revision)
                revision = await self._load()
                self._wake(set(self._streams), bundle=True)

    async def _apply(self, kind: str, key: str, record: object | None) -> None:
        if kind == "entry":
            self._wake(self.index.apply_entry(key, record if isinstance(record, RegistrationEntry) else None))
        elif kind == "node":
            node = record if isinstance(record, AttestedNode) else None
            self._wake(self.index.apply_node(key, node))
        elif kind == "policy" and isinstance(record, PolicyRevision):
            if record.revision > self.policy.revision:
                self.policy = PolicyService.parse_stored(record)
                self.rt.metrics.gauge("trustmesh_policy_revision", "policy revision in force").set(record.revision)
                self._wake(set(self._streams))
        elif kind == "ca":
            await self.rt.ca.reload()
            self.rt.ca.write_bundle_pem(self.rt.config.bundle_path)
            self._wake(set(self._streams), bundle=True)

    async def run(self, stop: asyncio.Event) -> None:
        follow = asyncio.create_task(self._follow(), name="change-feed")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait({follow, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if follow in done:
                follow.result()  # re-raise: the change feed must never end silently
        except StoreError as err:
            raise UnavailableError(f"lost the store's change feed: {err}") from err
        finally:
            for task in (follow, stopper):
                task.cancel()
            await asyncio.gather(follow, stopper, return_exceptions=True)


def _item_error(entry_id: str, code: grpc.StatusCode, message: str) -> node_pb2.X509SignResult:
    return node_pb2.X509SignResult(entry_id=entry_id[:64],
                                   error=node_pb2.ItemError(code=code.value[0], message=message))


def _replace_node(node: AttestedNode, serial: str, not_after: float, now: float) -> AttestedNode:
    return replace(node, cert_serial=serial, cert_not_after=not_after, updated_at=now)

