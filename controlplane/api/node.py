"""The agent-facing Node service: attestation, renewal, the sync stream, issuance.

Every call but Attest is authenticated by the agent's X509-SVID (peer.py) and checked
against the in-memory attested-node records, which the store's change feed keeps current:
a ban or eviction takes effect for the next call and closes the agent's sync stream at once,
and authenticating a call costs no store read.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TypeVar

import grpc
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.message import Message

from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc, types_pb2
from trustmesh.bundle import Bundle
from trustmesh.controlplane.api.convert import bundle_to_pb, entry_to_pb
from trustmesh.controlplane.api.peer import PeerAgent, peer_agent
from trustmesh.controlplane.api.status import (
    InvalidArgumentError,
    PermissionDeniedError,
    UnavailableError,
    grpc_errors,
    status_code_for,
)
from trustmesh.controlplane.attestation import NodeAttestor
from trustmesh.controlplane.authorized import AuthorizedIndex
from trustmesh.controlplane.policy_store import PolicyService
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store import CompactedError
from trustmesh.controlplane.store.records import (
    AttestedNode,
    BundleRecord,
    Change,
    PartnerCertificate,
    PolicyRevision,
    RecordFormatError,
    RegistrationEntry,
)
from trustmesh.errors import (
    BundleError,
    CAError,
    InvalidSpiffeIdError,
    StoreError,
    StoreUnavailableError,
    SvidError,
    TrustmeshError,
)
from trustmesh.logs import log_event
from trustmesh.naming import server_id
from trustmesh.policy import Policy
from trustmesh.policy.wire import policy_to_pb
from trustmesh.spiffeid import SpiffeId, TrustDomain

log = logging.getLogger("trustmesh.node")

MAX_BATCH = 1000
# A sync message holds at most this many entries and about this many bytes: with 4 MB as
# gRPC's message limit, a page never comes near it whatever the entries hold.
PAGE_ENTRIES = 500
PAGE_BYTES = 1024 * 1024
ATTEST_STEP_TIMEOUT = 30.0
RENEWAL_GRACE = 300.0  # seconds the previous agent SVID keeps working for calls after a renewal
SYNC_KEEPALIVE = 300.0  # an idle sync stream gets an empty delta this often (finds dead peers)
MAX_AUDIENCES = 16
MAX_FLOW_COUNTERS = 10_000
MAX_REMEMBERED_EVICTIONS = 10_000
FEED_RETRY_MAX = 5.0
_DER = Encoding.DER

M = TypeVar("M", bound=Message)


def paged(items: Sequence[M], max_items: int = PAGE_ENTRIES, max_bytes: int = PAGE_BYTES) -> list[list[M]]:
    """Split messages into pages of at most `max_items` and about `max_bytes` each; always at
    least one (maybe empty) page. One item larger than `max_bytes` gets a page of its own."""
    pages: list[list[M]] = [[]]
    size = 0
    for item in items:
        n = item.ByteSize() + 8  # + the field tag and length prefix, generously
        if pages[-1] and (len(pages[-1]) >= max_items or size + n > max_bytes):
            pages.append([])
            size = 0
        pages[-1].append(item)
        size += n
    return pages


def delta_messages(upserted: Sequence[types_pb2.Entry], deleted: Sequence[str],
                   bundles: Sequence[types_pb2.Bundle], deleted_bundles: Sequence[str],
                   policy: types_pb2.CompiledPolicy | None, *, start: int, end: int) -> list[node_pb2.SyncResponse]:
    """One delta as paged SyncResponses. Only the last page carries the new revision `end`:
    an agent cut off half-way then resumes from `start` and gets all of it again."""
    deltas = [node_pb2.SyncDelta()]
    size = 0

    def room_for(n: int, full: bool) -> node_pb2.SyncDelta:
        nonlocal size
        if size and (full or size + n > PAGE_BYTES):
            deltas.append(node_pb2.SyncDelta())
            size = 0
        size += n
        return deltas[-1]

    for entry in upserted:
        room_for(entry.ByteSize() + 8, len(deltas[-1].upserted_entries) >= PAGE_ENTRIES).upserted_entries.append(entry)
    for entry_id in deleted:
        room_for(len(entry_id) + 8, False).deleted_entry_ids.append(entry_id)
    last = deltas[-1]
    last.bundles.extend(bundles)
    last.deleted_bundles.extend(deleted_bundles)
    if policy is not None:
        last.policy.CopyFrom(policy)
    return [node_pb2.SyncResponse(revision=end if i == len(deltas) - 1 else start, delta=d)
            for i, d in enumerate(deltas)]


@dataclass(eq=False)
class _Stream:
    agent: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Sent:
    """What one sync stream has sent, to compute the next delta by difference."""

    entries: dict[str, int]  # entry id -> entry revision
    bundles: dict[str, bytes]  # trust domain -> the serialized Bundle message
    policy: types_pb2.CompiledPolicy
    revision: int


class NodeServicer(node_pb2_grpc.NodeServicer):
    def __init__(self, api: NodeAPI) -> None:
        self._api = api
        self._rt = api.rt

    # --- attestation --------------------------------------------------------------------

    async def Attest(self, request_iterator: AsyncIterator[node_pb2.AttestRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.AttestResponse]:
        # At most two messages are read, each within ATTEST_STEP_TIMEOUT; anything after
        # the result is ignored, so the conversation is bounded in time and size.
        async with grpc_errors(context, "Attest"):
            attestor = self._api.attestor
            first = await self._next(request_iterator, "first")
            step = first.WhichOneof("step")
            if step == "join_token":
                attested = await attestor.attest_join_token(first.join_token, first.csr)
            elif step == "x509pop":
                challenge = await attestor.x509pop_challenge(list(first.x509pop.cert_chain))
                yield node_pb2.AttestResponse(challenge=node_pb2.X509PopChallenge(nonce=challenge.nonce))
                answer = await self._next(request_iterator, "challenge response")
                if answer.WhichOneof("step") != "challenge_response":
                    raise await attestor.invalid("expected the x509pop challenge response as second message",
                                                 "x509pop", challenge.node_name)
                attested = await attestor.x509pop_finish(
                    challenge, answer.challenge_response.signature, answer.csr or first.csr)
            else:
                raise await attestor.invalid("the first Attest message must carry a join_token or x509pop evidence")
            self._api.node_written(attested.node)
            yield node_pb2.AttestResponse(result=node_pb2.AttestResult(
                spiffe_id=str(attested.svid.spiffe_id),
                svid_chain=[c.public_bytes(_DER) for c in attested.svid.cert_chain],
                bundle=bundle_to_pb(self._rt.ca.bundle()),
            ))

    async def _next(self, it: AsyncIterator[node_pb2.AttestRequest], what: str) -> node_pb2.AttestRequest:
        try:
            return await asyncio.wait_for(it.__anext__(), timeout=ATTEST_STEP_TIMEOUT)
        except StopAsyncIteration:
            raise await self._api.attestor.invalid(
                f"the Attest stream ended before the {what} message; send it before closing") from None
        except asyncio.TimeoutError:
            raise await self._api.attestor.invalid(
                f"no {what} Attest message within {ATTEST_STEP_TIMEOUT:.0f}s") from None

    async def RenewAgent(self, request: node_pb2.RenewAgentRequest,
                         context: grpc.aio.ServicerContext) -> node_pb2.RenewAgentResponse:
        async with grpc_errors(context, "RenewAgent"):
            peer, node = self._api.authenticate(context)
            try:
                svid = await self._rt.ca.sign_x509_svid(request.csr, peer.spiffe_id, self._rt.config.agent_ttl)
            except SvidError as err:
                raise InvalidArgumentError(f"agent CSR refused: {err}") from err
            # Compare-and-swap on the revision we hold: a ban written meanwhile makes this
            # fail (ABORTED) instead of being overwritten with banned=False.
            updated = await self._rt.store.update_attested_node(
                replace(node, cert_serial=format(svid.leaf.serial_number, "x"),
                        cert_not_after=svid.expires_at.timestamp(), updated_at=self._rt.clock()),
                expected_revision=node.revision or None)
            self._api.node_written(updated)
            await self._rt.audit.record("agent.renew", actor=peer.id, subject=peer.id,
                                        serial=updated.cert_serial, previous_serial=node.cert_serial)
            self._rt.metrics.counter("trustmesh_agent_renewals_total", "agent SVID renewals").inc()
            return node_pb2.RenewAgentResponse(svid_chain=[c.public_bytes(_DER) for c in svid.cert_chain])

    # --- sync ---------------------------------------------------------------------------

    async def Sync(self, request: node_pb2.SyncRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.SyncResponse]:
        async with grpc_errors(context, "Sync"):
            api = self._api
            peer, node = api.authenticate(context)
            stream = api.open_stream(peer.id)
            gauge = self._rt.metrics.gauge("trustmesh_sync_streams", "open agent sync streams")
            gauge.inc()
            try:
                messages, sent = api.sync_start(peer.id, request.since_revision, dict(request.bundle_sequences))
                for message in messages:
                    yield message
                while True:
                    # The stream must not outlive the certificate it was opened with; the
                    # agent reconnects with its renewed SVID (UNAVAILABLE: "try again").
                    left = peer.not_after - self._rt.clock()
                    if left <= 0:
                        raise UnavailableError(f"the agent SVID this sync stream was opened with expired; "
                                               f"reconnect with the renewed one ({peer.id})")
                    try:
                        await asyncio.wait_for(stream.wake.wait(), timeout=min(SYNC_KEEPALIVE, left))
                        keepalive = False
                    except asyncio.TimeoutError:
                        keepalive = True
                    stream.wake.clear()
                    api.authenticate_stream(peer, node)  # banned, evicted or re-attested: ends here
                    for message in api.sync_next(peer.id, sent, keepalive=keepalive):
                        api.observe_convergence(message)
                        yield message
            finally:
                gauge.dec()
                api.close_stream(stream)

    # --- issuance ---------------------------------------------------------------------------

    async def BatchSignX509(self, request: node_pb2.BatchSignX509Request,
                            context: grpc.aio.ServicerContext) -> node_pb2.BatchSignX509Response:
        async with grpc_errors(context, "BatchSignX509"):
            peer, _ = self._api.authenticate(context)
            if not request.items:
                raise InvalidArgumentError(f"the batch is empty; send 1 to {MAX_BATCH} (entry id, CSR) items")
            if len(request.items) > MAX_BATCH:
                raise InvalidArgumentError(f"at most {MAX_BATCH} items per batch, got {len(request.items)}; "
                                           "split the batch")
            index = self._api.index
            results: list[node_pb2.X509SignResult | None] = [None] * len(request.items)
            work: list[tuple[int, RegistrationEntry]] = []
            denied: list[str] = []
            for i, item in enumerate(request.items):
                entry = index.entries.get(item.entry_id)
                if entry is None or not index.is_authorized(peer.id, item.entry_id):
                    # Unknown and foreign entries get the same answer: an agent learns
                    # nothing about other nodes' entries by probing ids.
                    denied.append(item.entry_id[:64])
                    results[i] = _item_error(item.entry_id, grpc.StatusCode.PERMISSION_DENIED,
                                             f"entry {item.entry_id[:64]!r} is not authorized for agent {peer.id}")
                else:
                    work.append((i, entry))
            default_ttl = self._rt.config.default_x509_ttl
            # One call for the whole batch: the CA signs it off the event loop.
            signed = await self._rt.ca.sign_x509_svids([
                (request.items[i].csr, SpiffeId.parse(e.spiffe_id),
                 timedelta(seconds=e.x509_ttl) if e.x509_ttl else default_ttl, e.dns_names)
                for i, e in work
            ]) if work else []
            issued: list[str] = []
            invalid: list[str] = []
            for (i, entry), outcome in zip(work, signed):
                if isinstance(outcome, TrustmeshError):
                    invalid.append(entry.id)
                    code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(outcome, (SvidError, CAError)) \
                        else status_code_for(outcome)
                    results[i] = _item_error(entry.id, code, f"entry {entry.id}: {outcome}")
                    continue
                issued.append(entry.id)
                results[i] = node_pb2.X509SignResult(entry_id=entry.id, svid=node_pb2.X509Svid(
                    spiffe_id=entry.spiffe_id, cert_chain=outcome.chain_ders(),
                    expires_at=int(outcome.expires_at.timestamp())))
            counter = self._rt.metrics.counter("trustmesh_x509_svids_total", "X509-SVID requests by outcome",
                                               ["outcome"])
            counter.inc(len(issued), outcome="issued")
            counter.inc(len(denied), outcome="denied")
            counter.inc(len(invalid), outcome="invalid")
            if issued or invalid:
                await self._rt.audit.record("svid.issue", actor=peer.id, subject=peer.id,
                                            outcome="ok" if not invalid else "partial",
                                            issued=len(issued), invalid=len(invalid), entry_ids=issued[:100],
                                            invalid_entry_ids=invalid[:100])
            if denied:
                await self._rt.audit.record("svid.issue", actor=peer.id, subject=peer.id, outcome="denied",
                                            reason="entries not authorized for this agent", denied=len(denied),
                                            entry_ids=denied[:100])
            return node_pb2.BatchSignX509Response(results=[r for r in results if r is not None])

    async def SignJWT(self, request: node_pb2.SignJWTRequest,
                      context: grpc.aio.ServicerContext) -> node_pb2.SignJWTResponse:
        async with grpc_errors(context, "SignJWT"):
            peer, _ = self._api.authenticate(context)
            audiences = list(request.audiences)
            if not audiences or len(audiences) > MAX_AUDIENCES or any(not a or len(a) > 256 for a in audiences):
                raise InvalidArgumentError(f"give 1 to {MAX_AUDIENCES} audiences of 1 to 256 characters each")
            entry = self._api.index.entries.get(request.entry_id)
            if entry is None or not self._api.index.is_authorized(peer.id, request.entry_id):
                await self._rt.audit.record("jwt.issue", actor=peer.id, subject=request.entry_id[:64],
                                            outcome="denied", reason="entry not authorized for this agent")
                self._rt.metrics.counter("trustmesh_jwt_svids_total", "JWT-SVID requests by outcome",
                                         ["outcome"]).inc(outcome="denied")
                raise PermissionDeniedError(f"entry {request.entry_id[:64]!r} is not authorized for agent {peer.id}")
            ttl = timedelta(seconds=entry.jwt_ttl) if entry.jwt_ttl else self._rt.config.default_jwt_ttl
            token, expires = self._rt.ca.sign_jwt_svid(SpiffeId.parse(entry.spiffe_id), audiences, ttl)
            await self._rt.audit.record("jwt.issue", actor=peer.id, subject=entry.spiffe_id, entry_id=entry.id,
                                        audiences=audiences)
            self._rt.metrics.counter("trustmesh_jwt_svids_total", "JWT-SVID requests by outcome",
                                     ["outcome"]).inc(outcome="issued")
            return node_pb2.SignJWTResponse(token=token, expires_at=int(expires.timestamp()))

    async def ReportFlows(self, request: node_pb2.ReportFlowsRequest,
                          context: grpc.aio.ServicerContext) -> node_pb2.ReportFlowsResponse:
        async with grpc_errors(context, "ReportFlows"):
            peer, _ = self._api.authenticate(context)
            if len(request.counters) > MAX_FLOW_COUNTERS:
                raise InvalidArgumentError(f"at most {MAX_FLOW_COUNTERS} counters per report; report more often")
            for c in request.counters:  # validate all before counting any
                if c.count < 0 or c.port > 65535 or len(c.source_id) > 2048 or len(c.destination_id) > 2048 \
                        or len(c.rule) > 512:
                    raise InvalidArgumentError("a flow counter is out of range (count >= 0, port <= 65535, "
                                               "IDs of at most 2048 and rule names of at most 512 characters)")
            counter = self._rt.metrics.counter("trustmesh_flow_decisions_total",
                                               "connection decisions reported by agents", ["decision"])
            for c in request.counters:
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
        self._td = rt.config.trust_domain
        self.index = AuthorizedIndex(str(server_id(self._td)))
        self.attestor = NodeAttestor(rt)
        self.ready = asyncio.Event()
        self.revision = 0  # every change up to this store revision is in the index
        self.policy = Policy()
        self._policy_changed_at = 0
        self._policy_committed_at = 0.0  # when the policy in force was applied (its record's time)
        self._convergence = rt.metrics.histogram(
            "trustmesh_policy_convergence_seconds", "from a policy revision's commit to its delivery to each agent")
        self._federated: dict[str, types_pb2.Bundle] = {}  # trust domain -> its stored bundle
        self._gone_bundles: set[str] = set()  # trust domains whose stored bundle was deleted
        self._revoked: frozenset[str] = frozenset()  # serials of revoked partner certificates
        self._partner_revocations: dict[str, bool] = {}  # serial -> revoked, for every partner certificate
        self._streams: dict[str, set[_Stream]] = defaultdict(set)
        self._previous_serials: dict[str, tuple[str, float]] = {}
        self._evicted: OrderedDict[str, None] = OrderedDict()

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
        """The calling agent and its node record; refuses evicted, banned and superseded SVIDs."""
        peer = peer_agent(context, self._td)
        node = self._current_node(peer.id)
        if peer.serial != node.cert_serial:
            previous = self._previous_serials.get(peer.id)
            if previous is None or previous[0] != peer.serial or previous[1] < self.rt.clock():
                raise PermissionDeniedError(
                    f"agent {peer.id} presented a superseded SVID (serial {peer.serial}); use the renewed one, "
                    "or attest again")
        return peer, node

    def authenticate_stream(self, peer: PeerAgent, opened: AttestedNode) -> None:
        """Re-check an open stream after a change: the same attestation, not banned.

        A renewal does not end the stream (the agent renewed, it was not revoked); an
        eviction does, and so does a new attestation of the same name after one.
        """
        node = self._current_node(peer.id)
        if node.created_at != opened.created_at:
            raise PermissionDeniedError(f"agent {peer.id} was attested again since this stream opened; "
                                        "reconnect with the new agent SVID")

    def _current_node(self, agent: str) -> AttestedNode:
        if not self.ready.is_set():
            raise UnavailableError("the server is still loading its registry; retry in a moment")
        node = self.index.nodes.get(agent)
        if node is None:
            name = agent.rsplit("/", 1)[-1]
            if agent in self._evicted:
                raise PermissionDeniedError(f"agent {agent} was evicted; re-attest with a new join token "
                                            f"(`trustmesh token create --node {name}`)")
            raise PermissionDeniedError(f"agent {agent} is not attested; attest with a join token "
                                        f"(`trustmesh token create --node {name}`) or x509pop")
        if node.banned:
            raise PermissionDeniedError(f"agent {agent} is banned")
        return node

    def is_admin(self, spiffe_id: str) -> bool:
        """True when some registration entry for this ID is marked admin."""
        return self.index.is_admin(spiffe_id)

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

    def _wake(self, agents: Iterable[str]) -> None:
        for agent in agents:
            for stream in self._streams.get(agent, ()):
                stream.wake.set()

    def _wake_all(self) -> None:
        self._wake(list(self._streams))

    def sync_start(self, agent: str, since: int,
                   bundle_sequences: Mapping[str, int]) -> tuple[list[node_pb2.SyncResponse], _Sent]:
        """The first messages of a sync stream: a delta when the agent can resume from
        `since`, else a (paged) snapshot; and what the stream has then sent."""
        entries = self.index.authorized_for(agent)
        revision = self.revision
        bundles = self._bundles_for(entries)
        policy = self._compiled_policy(entries)
        sent = _Sent({e.id: e.revision for e in entries},
                     {td: b.SerializeToString() for td, b in bundles.items()}, policy, revision)
        # Bundles the agent may hold from earlier and must drop: every trust domain we know
        # of (or knew, until deleted) that this agent does not federate with.
        drop = sorted((set(self._federated) | self._gone_bundles) - set(bundles))
        changed = self.index.changed_since(agent, since) if 0 < since <= revision else None
        resumes = self.rt.metrics.counter("trustmesh_sync_starts_total", "sync streams opened, by how they began",
                                          ["kind"])
        if changed is None:
            resumes.inc(kind="snapshot")
            pages = paged([entry_to_pb(e) for e in entries])
            messages = [node_pb2.SyncResponse(revision=revision, snapshot=node_pb2.SyncSnapshot(
                entries=page, page=number, last=number == len(pages) - 1,
                bundles=list(bundles.values()) if number == len(pages) - 1 else [],
                policy=policy if number == len(pages) - 1 else None)) for number, page in enumerate(pages)]
            if drop:
                messages += delta_messages([], [], [], drop, None, start=revision, end=revision)
            return messages, sent
        resumes.inc(kind="resume")
        current = {e.id: e for e in entries}
        upserted = [entry_to_pb(current[i]) for i in sorted(changed) if i in current]
        deleted = sorted(i for i in changed if i not in current)
        fresh = [b for td, b in bundles.items()
                 if not (b.sequence_number and bundle_sequences.get(td) == b.sequence_number)]
        new_policy = policy if (upserted or deleted or self._policy_changed_at > since) else None
        return delta_messages(upserted, deleted, fresh, drop, new_policy, start=since, end=revision), sent

    def sync_next(self, agent: str, sent: _Sent, *, keepalive: bool = False) -> list[node_pb2.SyncResponse]:
        """The delta since what `sent` records (updated in place); nothing when nothing changed."""
        entries = self.index.authorized_for(agent)
        current = {e.id: e for e in entries}
        upserted = [e for e in entries if sent.entries.get(e.id) != e.revision]
        deleted = [i for i in sent.entries if i not in current]
        bundles = {td: (b, b.SerializeToString()) for td, b in self._bundles_for(entries).items()}
        changed_bundles = [b for td, (b, data) in bundles.items() if sent.bundles.get(td) != data]
        dropped = [td for td in sent.bundles if td not in bundles]
        policy = self._compiled_policy(entries)
        policy_changed = policy != sent.policy
        revision = self.revision
        if not (upserted or deleted or changed_bundles or dropped or policy_changed or keepalive):
            return []
        messages = delta_messages([entry_to_pb(e) for e in upserted], deleted, changed_bundles, dropped,
                                  policy if policy_changed else None, start=sent.revision, end=revision)
        sent.entries = {e.id: e.revision for e in entries}
        sent.bundles = {td: data for td, (_, data) in bundles.items()}
        sent.policy = policy
        sent.revision = revision
        return messages

    def observe_convergence(self, message: node_pb2.SyncResponse) -> None:
        """Time from a policy revision's commit to its delivery on an agent's stream, as the
        `trustmesh_policy_convergence_seconds` histogram (the fleet's propagation, live)."""
        delta = message.delta if message.WhichOneof("body") == "delta" else None
        if delta is not None and delta.HasField("policy") and delta.policy.revision == self.policy.revision \
                and self._policy_committed_at:
            self._convergence.observe(max(0.0, self.rt.clock() - self._policy_committed_at))

    def _bundles_for(self, entries: Iterable[RegistrationEntry]) -> dict[str, types_pb2.Bundle]:
        """Our own bundle, and the stored bundle of every trust domain these entries federate with."""
        own = bundle_to_pb(self.rt.ca.bundle())
        bundles = {own.trust_domain: own}
        for td in sorted({td for e in entries for td in e.federates_with}):
            federated = self._federated.get(td)
            if federated is not None and td not in bundles:
                bundles[td] = federated
        return bundles

    def _compiled_policy(self, entries: Iterable[RegistrationEntry]) -> types_pb2.CompiledPolicy:
        """The allowlists deciding for the destinations this agent's workloads serve."""
        policy = self.policy.for_destinations([SpiffeId.parse(e.spiffe_id) for e in entries])
        return policy_to_pb(replace(policy, revoked_serials=self._revoked))

    # --- the change feed ----------------------------------------------------------------

    def node_written(self, node: AttestedNode) -> None:
        """Apply our own node write at once; the change feed will confirm it."""
        if self.ready.is_set():
            self._wake(self._node_change(node.spiffe_id, node, node.revision))

    def _node_change(self, agent: str, node: AttestedNode | None, revision: int) -> set[str]:
        old = self.index.nodes.get(agent)
        if old is not None and revision and old.revision > revision:
            return set()  # we already applied a newer write of our own (node_written)
        if node is None:
            self._previous_serials.pop(agent, None)
            self._evicted[agent] = None
            self._evicted.move_to_end(agent)
            while len(self._evicted) > MAX_REMEMBERED_EVICTIONS:
                self._evicted.popitem(last=False)
        else:
            self._evicted.pop(agent, None)
            if old is not None and old.created_at == node.created_at and old.cert_serial != node.cert_serial:
                # A renewal (or x509pop re-attestation): calls with the previous SVID keep
                # working briefly, on every replica, while the agent switches over.
                self._previous_serials[agent] = (old.cert_serial, self.rt.clock() + RENEWAL_GRACE)
            elif old is None or old.created_at != node.created_at:
                self._previous_serials.pop(agent, None)
        # Our own writes may come without a revision; the revision we are at is a safe
        # lower bound for where this agent's resumable history starts.
        return self.index.apply_node(agent, node, revision or self.revision)

    def _set_federated(self, trust_domain: str, record: BundleRecord | None) -> None:
        if record is None or trust_domain == self._td.name:
            self._federated.pop(trust_domain, None)
            self._gone_bundles.add(trust_domain)
            return
        try:
            bundle = Bundle.from_jwks(record.jwks, TrustDomain(trust_domain)).with_sequence_number(record.sequence)
        except (BundleError, InvalidSpiffeIdError) as err:
            log_event(log, "federated_bundle_unusable", level=logging.ERROR, trust_domain=trust_domain,
                      error=str(err), hint="store a valid SPIFFE bundle for it again")
            self._federated.pop(trust_domain, None)
            return
        self._federated[trust_domain] = bundle_to_pb(bundle)
        self._gone_bundles.discard(trust_domain)

    async def _load(self) -> int:
        store = self.rt.store
        revision = await store.current_revision()
        entries, nodes = await store.list_entries(), await store.list_attested_nodes()
        policy = PolicyService.parse_stored(await store.get_policy_head())
        bundles = await store.list_bundles()
        partners = await store.list_partner_certificates()
        self.index.load(entries, nodes, revision)
        self._partner_revocations = {c.serial: c.revoked_at > 0 for c in partners}
        self._revoked = frozenset(serial for serial, revoked in self._partner_revocations.items() if revoked)
        self.policy, self._policy_changed_at = policy, revision
        self._gone_bundles |= set(self._federated)
        self._federated.clear()
        for record in bundles:
            self._set_federated(record.trust_domain, record)
        self.revision = revision
        self.ready.set()
        log_event(log, "registry_loaded", entries=len(self.index.entries), agents=len(self.index.nodes),
                  federated_bundles=len(self._federated), revision=revision)
        return revision

    async def _apply(self, change: Change) -> set[str] | None:
        """Apply one change; return the agents whose streams must look again (None: all)."""
        if change.kind == "entry":
            entry = change.record if isinstance(change.record, RegistrationEntry) else None
            return self.index.apply_entry(change.key, entry, change.revision)
        if change.kind == "node":
            node = change.record if isinstance(change.record, AttestedNode) else None
            return self._node_change(change.key, node, change.revision)
        if change.kind == "bundle":
            self._set_federated(change.key, change.record if isinstance(change.record, BundleRecord) else None)
            return None
        if change.kind == "policy" and isinstance(change.record, PolicyRevision):
            if change.record.revision > self.policy.revision:
                self.policy = PolicyService.parse_stored(change.record)
                self._policy_changed_at = change.revision
                self._policy_committed_at = change.record.created_at
                self.rt.metrics.gauge("trustmesh_policy_revision", "policy revision in force").set(
                    change.record.revision)
                return None
        if change.kind == "partner":
            # A revocation reaches every agent at once: it is part of what each enforces.
            record = change.record if isinstance(change.record, PartnerCertificate) else None
            if record is None:
                self._partner_revocations.pop(change.key, None)
            else:
                self._partner_revocations[change.key] = record.revoked_at > 0
            revoked = frozenset(serial for serial, gone in self._partner_revocations.items() if gone)
            if revoked == self._revoked:
                return set()
            self._revoked = revoked
            return None
        if change.kind == "ca":
            # Another replica (or our own rotation) moved the CA journal: pick up the new
            # roots and keys, republish bundle.pem, and push the bundle to every agent.
            await self.rt.ca.reload()
            self.rt.ca.write_bundle_pem(self.rt.config.bundle_path)
            return None
        return set()

    async def _follow(self) -> None:
        """Keep the index current from the change feed, forever; resume after outages."""
        connected = self.rt.metrics.gauge("trustmesh_change_feed_connected", "1 while the store's change feed runs")
        revision: int | None = None  # None: (re)load everything first
        failures = 0
        while True:
            try:
                if revision is None:
                    revision = await self._load()
                    self._wake_all()
                connected.set(1)
                async for batch in self.rt.store.watch(revision):
                    wake: set[str] | None = set()
                    for change in batch:
                        agents = await self._apply(change)
                        wake = None if agents is None or wake is None else wake | agents
                        revision = max(revision, change.revision)
                    # Streams wake only once the whole batch is in, so the revision they
                    # report to agents covers everything they send.
                    self.revision = revision
                    if wake is None:
                        self._wake_all()
                    else:
                        self._wake(wake)
                    if failures:
                        log_event(log, "change_feed_resumed", revision=revision, after_failures=failures)
                        failures = 0
            except CompactedError:
                log_event(log, "change_feed_compacted", level=logging.WARNING, revision=revision)
                revision = None
                continue
            except RecordFormatError as err:
                if revision is None:
                    raise  # the registry itself is unreadable: stop loudly, do not serve a guess
                # A record we cannot read (e.g. an audit event edited by hand): reload what
                # we need and carry on after it, rather than stop serving every agent.
                log_event(log, "change_feed_unreadable_record", level=logging.ERROR, revision=revision,
                          error=str(err))
                revision = None
                continue
            except StoreUnavailableError as err:
                connected.set(0)
                failures += 1
                delay = min(FEED_RETRY_MAX, 0.1 * 2 ** min(failures, 6))
                # Calls keep being answered from the index meanwhile; changes made while
                # the store is unreachable arrive when the watch resumes from `revision`.
                log_event(log, "change_feed_unavailable", level=logging.WARNING, revision=revision,
                          error=str(err), retry_in=f"{delay:.1f}s")
                await asyncio.sleep(delay)
                continue
            connected.set(0)
            raise UnavailableError("the store's change feed ended unexpectedly (store closed?)")

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
