"""The agent-facing Node service: protobuf in, domain calls, protobuf out.

The call layer (calls.py) authenticates every call but Attest by the agent's X509-SVID, the
registry view's attested-node records and clones.py (one identity, one place) before a
handler runs; the rules live in the domain: attestation.py (Attest), issuance.py (signing,
renewal, flow reports) and sync_service.py with sync_delta.py (the sync stream).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from cryptography.hazmat.primitives.serialization import Encoding

from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc, types_pb2
from trustmesh.controlplane.api.callers import current_agent
from trustmesh.controlplane.api.convert import bundle_to_pb
from trustmesh.controlplane.api.peer import PeerAgent, peer_host
from trustmesh.controlplane.api.status import status_code_for
from trustmesh.controlplane.attestation import NodeAttestor
from trustmesh.controlplane.clones import CloneGuard
from trustmesh.controlplane.flow_audit import FlowCounter, RefusalCounter
from trustmesh.controlplane.issuance import (
    MAX_FLOW_COUNTERS,
    IssuanceService,
    X509Issued,
    X509Outcome,
    X509Request,
)
from trustmesh.controlplane.registration import AttestedNode
from trustmesh.controlplane.registry_view import RegistryView
from trustmesh.controlplane.sync_service import SyncService
from trustmesh.errors import CAError
from trustmesh.naming import agent_id
from trustmesh.policy.wire import HTTP_ROUTES, TIME_WINDOWS
from trustmesh.x509svid import X509Svid

ATTEST_STEP_TIMEOUT = 30.0
_DER = Encoding.DER


class NodeServicer(node_pb2_grpc.NodeServicer):
    def __init__(self, view: RegistryView, attestor: NodeAttestor, issuance: IssuanceService,
                 sync: SyncService, guard: CloneGuard | None = None) -> None:
        self._view = view
        self._guard = guard
        self._attestor = attestor
        self._issuance = issuance
        self._sync = sync

    def register(self, server: grpc.aio.Server) -> None:
        node_pb2_grpc.add_NodeServicer_to_server(self, server)

    def register_attestation(self, server: grpc.aio.Server) -> None:
        """Only Attest, for the listener that does not ask for client certificates."""
        handler = grpc.method_handlers_generic_handler("trustmesh.v1.Node", {
            "Attest": grpc.stream_stream_rpc_method_handler(
                self.Attest,
                request_deserializer=node_pb2.AttestRequest.FromString,
                response_serializer=node_pb2.AttestResponse.SerializeToString,
            ),
        })
        server.add_generic_rpc_handlers((handler,))

    @staticmethod
    def _agent() -> tuple[PeerAgent, AttestedNode]:
        """The calling agent and its node record, as the call layer authenticated them."""
        agent = current_agent()
        return agent.peer, agent.node

    # --- attestation --------------------------------------------------------------------

    async def Attest(self, request_iterator: AsyncIterator[node_pb2.AttestRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.AttestResponse]:
        # At most two messages are read, each within ATTEST_STEP_TIMEOUT; anything after
        # the result is ignored, so the conversation is bounded in time and size.
        attestor = self._attestor
        address = peer_host(context.peer())
        first = await self._next(request_iterator, "first")
        # Before any check: a source that attempts too often is refused. (After the first
        # message is read: a status sent before it reaches clients as INTERNAL, not as ours.)
        await attestor.admit(address)
        step = first.WhichOneof("step")
        if step == "join_token":
            attested = await attestor.attest_join_token(first.join_token, first.csr, address)
        elif step == "x509pop":
            challenge = await attestor.x509pop_challenge(list(first.x509pop.cert_chain))
            yield node_pb2.AttestResponse(challenge=node_pb2.X509PopChallenge(nonce=challenge.nonce))
            answer = await self._next(request_iterator, "challenge response")
            if answer.WhichOneof("step") != "challenge_response":
                raise await attestor.invalid("expected the x509pop challenge response as second message",
                                             "x509pop", challenge.node_name)
            if self._guard is not None:
                self._guard.check_reattestation(str(agent_id(self._view.trust_domain, challenge.node_name)), address)
            attested = await attestor.x509pop_finish(
                challenge, answer.challenge_response.signature, answer.csr or first.csr, address)
        else:
            raise await attestor.invalid("the first Attest message must carry a join_token or x509pop evidence")
        await self._view.node_written(attested.node)
        yield node_pb2.AttestResponse(result=node_pb2.AttestResult(
            spiffe_id=str(attested.svid.spiffe_id), svid_chain=_chain(attested.svid),
            bundle=bundle_to_pb(self._issuance.trust_bundle()),
        ))

    async def _next(self, it: AsyncIterator[node_pb2.AttestRequest], what: str) -> node_pb2.AttestRequest:
        try:
            return await asyncio.wait_for(it.__anext__(), timeout=ATTEST_STEP_TIMEOUT)
        except StopAsyncIteration:
            raise await self._attestor.invalid(
                f"the Attest stream ended before the {what} message; send it before closing") from None
        except asyncio.TimeoutError:
            raise await self._attestor.invalid(
                f"no {what} Attest message within {ATTEST_STEP_TIMEOUT:.0f}s") from None

    async def RenewAgent(self, request: node_pb2.RenewAgentRequest,
                         context: grpc.aio.ServicerContext) -> node_pb2.RenewAgentResponse:
        peer, node = self._agent()
        svid = await self._issuance.renew_agent(peer.spiffe_id, node, request.csr, peer.host)
        return node_pb2.RenewAgentResponse(svid_chain=_chain(svid))

    # --- sync ---------------------------------------------------------------------------

    async def Sync(self, request: node_pb2.SyncRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.SyncResponse]:
        peer, node = self._agent()
        updated = await self._attestor.note_permissive_listeners(node, list(request.permissive_listeners))
        if updated is not None:
            await self._view.node_written(updated)
            node = updated
        # An agent that does not say it enforces route rules is sent none (it would read each
        # as allowing every request); likewise rules with time windows (as allowing at all times).
        with self._sync.open(peer, node, peer.not_after, http_routes=HTTP_ROUTES in request.features,
                             time_windows=TIME_WINDOWS in request.features) as stream:
            for message in stream.start(request.since_revision, dict(request.bundle_sequences)):
                yield message
            while True:
                for message in await stream.next():
                    yield message

    # --- issuance -----------------------------------------------------------------------

    async def BatchSignX509(self, request: node_pb2.BatchSignX509Request,
                            context: grpc.aio.ServicerContext) -> node_pb2.BatchSignX509Response:
        peer, _ = self._agent()
        outcomes = await self._issuance.sign_x509_batch(
            peer.id, [X509Request(item.entry_id, item.csr) for item in request.items])
        return node_pb2.BatchSignX509Response(results=[_x509_result(o) for o in outcomes])

    async def SignJWT(self, request: node_pb2.SignJWTRequest,
                      context: grpc.aio.ServicerContext) -> node_pb2.SignJWTResponse:
        peer, _ = self._agent()
        issued = await self._issuance.sign_jwt(peer.id, request.entry_id, list(request.audiences))
        return node_pb2.SignJWTResponse(token=issued.token, expires_at=int(issued.expires_at.timestamp()))

    async def ReportFlows(self, request: node_pb2.ReportFlowsRequest,
                          context: grpc.aio.ServicerContext) -> node_pb2.ReportFlowsResponse:
        peer, _ = self._agent()
        # One counter past the limit is enough for the service to refuse an oversized
        # report; converting all of a hostile one first would stall the event loop.
        counters = [_flow_counter(c) for c in request.counters[:MAX_FLOW_COUNTERS + 1]]
        refusals = [_refusal_counter(r) for r in request.refusals[:MAX_FLOW_COUNTERS + 1 - len(counters)]]
        await self._issuance.report_flows(peer.id, counters, refusals)
        return node_pb2.ReportFlowsResponse()


def _chain(svid: X509Svid) -> list[bytes]:
    return list(svid.chain_ders())


def _x509_result(outcome: X509Outcome) -> node_pb2.X509SignResult:
    if isinstance(outcome, X509Issued):
        return node_pb2.X509SignResult(entry_id=outcome.entry_id, svid=node_pb2.X509Svid(
            spiffe_id=str(outcome.spiffe_id), cert_chain=_chain(outcome.svid),
            expires_at=int(outcome.svid.expires_at.timestamp())))
    if outcome.outcome == "denied":
        code = grpc.StatusCode.PERMISSION_DENIED
    elif outcome.cause is None or isinstance(outcome.cause, CAError):
        code = grpc.StatusCode.INVALID_ARGUMENT  # the CA could not sign this CSR for this entry
    else:
        code = status_code_for(outcome.cause)
    return node_pb2.X509SignResult(entry_id=outcome.entry_id[:64],
                                   error=node_pb2.ItemError(code=code.value[0], message=outcome.message))


def _flow_counter(c: node_pb2.FlowCounter) -> FlowCounter:
    return FlowCounter(source_id=c.source_id, destination_id=c.destination_id, port=c.port,
                       denied=c.decision == node_pb2.FLOW_DECISION_DENY,
                       audit_mode=c.mode == types_pb2.POLICY_MODE_AUDIT, rule=c.rule, count=c.count,
                       first_seen=c.first_seen, last_seen=c.last_seen, bytes_in=c.bytes_in, bytes_out=c.bytes_out,
                       unverified=c.decision == node_pb2.FLOW_DECISION_UNVERIFIED, source_address=c.source_address,
                       route=c.route)


def _refusal_counter(r: node_pb2.RefusalCounter) -> RefusalCounter:
    return RefusalCounter(kind=r.kind, subject=r.subject, peer=r.peer, reason=r.reason, count=r.count,
                          first_seen=r.first_seen, last_seen=r.last_seen)
