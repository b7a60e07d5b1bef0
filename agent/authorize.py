"""`Authorize` on the agent's socket: the allowlist's decision for services that terminate
mTLS themselves. Only workloads registered on this node may ask (the caller is attested
from the kernel and bound to its connection, as for the Workload API), so the policy is no
oracle for strangers.

The source and destination in a request are the caller's words. A decision is reported to
the control plane (and so can reach the audit log) only when one side is an identity the
caller holds: a service asking about its own connections. Any other question is answered
and counted, never reported, so a workload cannot plant events about services it is not."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Protocol

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from trustmesh._proto.trustmesh.v1 import agent_pb2
from trustmesh._proto.trustmesh.v1.agent_grpc import AgentAuthorizationBase
from trustmesh.agent.workload_api import LocalCallers
from trustmesh.clock import Clock, utc_now
from trustmesh.errors import InvalidSpiffeIdError
from trustmesh.metrics import Registry
from trustmesh.policy import Decision, Policy
from trustmesh.spiffeid import SpiffeId


class CallerIdentities(Protocol):
    def spiffe_ids_for(self, selectors: Collection[str]) -> frozenset[str]:
        """The SPIFFE IDs registered for a caller with these selectors (empty: a stranger)."""
        ...


class Authorizer(AgentAuthorizationBase):
    def __init__(self, source: CallerIdentities, callers: LocalCallers, policy: Callable[[], Policy],
                 report: Callable[[SpiffeId | None, SpiffeId, int, Decision], object], metrics: Registry,
                 clock: Clock = utc_now) -> None:
        self._source, self._callers, self._policy, self._report = source, callers, policy, report
        self._clock = clock
        self._calls = metrics.counter("trustmesh_authorize_calls_total", "Authorize calls by verdict", ["verdict"])
        self._unreported = metrics.counter(
            "trustmesh_authorize_unreported_total",
            "Authorize answers not reported: neither side is an identity of the calling workload")

    async def Authorize(self, stream: Stream[Any, Any]) -> None:
        request = await self._callers.receive(stream, "Authorize")
        if not isinstance(request, agent_pb2.AuthorizeRequest):
            raise GRPCError(Status.INVALID_ARGUMENT, "the request message is missing")
        selectors = await self._callers.selectors(stream, "Authorize")
        caller_ids = self._source.spiffe_ids_for(selectors)
        if not caller_ids:
            raise GRPCError(Status.PERMISSION_DENIED, "only workloads registered on this node may ask")
        try:
            source = SpiffeId.parse(request.source_id)
            destination = SpiffeId.parse(request.destination_id)
        except InvalidSpiffeIdError as err:
            raise GRPCError(Status.INVALID_ARGUMENT, str(err)) from err
        if request.port > 65535:
            raise GRPCError(Status.INVALID_ARGUMENT, "port must be 0 to 65535")
        policy = self._policy()
        decision = policy.decide(source, destination, request.port or None, self._clock())
        if str(destination) in caller_ids or str(source) in caller_ids:
            self._report(source, destination, request.port, decision)
        else:
            self._unreported.inc()
        self._calls.inc(verdict=decision.verdict.lower())
        await stream.send_message(agent_pb2.AuthorizeResponse(
            allowed=decision.allowed, rule=decision.rule, reason=decision.reason, audit_only=decision.audit_only,
            policy_revision=policy.revision))
