"""The call layer: what happens around every gRPC call the server answers.

One interceptor per listener does, for every call and in this order: look the method up in
`CALLS` (a method that is not there is refused, never served), authenticate the caller with
the listener's authenticator, check the caller against the method's rule, hand the caller to
the handler (`current_caller()`), map what the handler raises to a gRPC status (status.py),
and count the call and time it. Handlers do none of this themselves.

`CALLS` is the single answer to "who may call what" (the model is SPIRE's
pkg/server/authpolicy/policy_data.json). Each rule names caller kinds, and can name roles
for callers that carry some (operators, later): a role listed by a method admits any caller
holding it, whatever its kind.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import aclosing, suppress
from contextvars import ContextVar, Token
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeVar

import grpc

from trustmesh.controlplane.api.status import status_for
from trustmesh.controlplane.call_source import call_role, call_source
from trustmesh.errors import PermissionDeniedError
from trustmesh.logs import log_event
from trustmesh.metrics import Registry
from trustmesh.naming import OTP_HEADER

log = logging.getLogger("trustmesh.api")

T = TypeVar("T")


class CallerKind(StrEnum):
    """Who a listener's authenticator found at the other end of a call."""

    ANONYMOUS = "anonymous"  # proved nothing (the attestation listener asks for no certificate)
    AGENT = "agent"  # an attested agent with its current agent SVID, not banned or evicted
    WORKLOAD = "workload"  # a valid X509-SVID that gives no standing on this listener
    LOCAL_ADMIN = "local_admin"  # the admin unix socket: its file permissions are the access control
    REMOTE_ADMIN = "remote_admin"  # the SVID of an entry marked admin, on the remote admin listener
    OPERATOR = "operator"  # a person's certificate from `trustmesh login`, with the roles of its record


@dataclass(frozen=True)
class Caller:
    kind: CallerKind
    id: str  # the actor that audit records name, e.g. an agent's SPIFFE ID or "local-root (uid 0)"
    payload: object = None  # what the authenticator learnt and the handler needs (e.g. the node record)
    roles: frozenset[str] = frozenset()
    # Where the call comes from, for the audit log (every event of the call names it):
    # "127.0.0.1:50412" for a network peer, "pid 4242" on the admin socket; "" for none.
    source: str = ""

    def payload_as(self, cls: type[T]) -> T:
        if not isinstance(self.payload, cls):
            raise RuntimeError(f"caller {self.id} ({self.kind}) carries {type(self.payload).__name__}, "
                               f"not {cls.__name__}: this handler is served on the wrong listener")
        return self.payload


ANONYMOUS_CALLER = Caller(CallerKind.ANONYMOUS, "anonymous")


@dataclass(frozen=True)
class Rule:
    """Who may call one method: callers of these kinds, or holding one of these roles."""

    kinds: frozenset[CallerKind] = frozenset()
    roles: frozenset[str] = frozenset()
    # Open to anyone without authenticating: health checks must answer even while the
    # registry that agents are authenticated against is still loading.
    anyone: bool = False
    # What a refused caller reads after its own id; says what to do instead.
    refusal: str = "may not call this method"
    # Operators must also present a current one-time code (metadata OTP_HEADER): privileged
    # calls are not open to a stolen certificate alone.
    step_up: bool = False

    def permits(self, caller: Caller) -> bool:
        return self.anyone or caller.kind in self.kinds or not self.roles.isdisjoint(caller.roles)

    def describe(self) -> str:
        if self.anyone:
            return "anyone"
        parts = [str(k) for k in sorted(self.kinds)] + [f"role {r}" for r in sorted(self.roles)]
        return ", ".join(parts) or "nobody"


    def role_used(self, caller: Caller) -> str:
        """What admitted `caller`, for the audit log: the first of its roles the rule lists."""
        if caller.kind is CallerKind.LOCAL_ADMIN:
            return "admin-socket"
        if caller.kind is CallerKind.REMOTE_ADMIN:
            return "admin"
        return next((r for r in caller.roles if r in self.roles), "")


def allow(*kinds: CallerKind, roles: Iterable[str] = (), refusal: str, step_up: bool = False) -> Rule:
    return Rule(frozenset(kinds), frozenset(roles), refusal=refusal, step_up=step_up)


ADMIN_REFUSAL = "may not use the admin API: register it with `trustmesh entry create … --admin`"
ROLE_REFUSAL = "does not hold a role that may call this method; `trustmesh whoami` shows yours, an admin can add one"


def admins(*roles: str, step_up: bool = False) -> Rule:
    """An admin method: the admin socket, admin SVIDs, and operators holding `admin` or one of `roles`."""
    return Rule(frozenset({CallerKind.LOCAL_ADMIN, CallerKind.REMOTE_ADMIN}), frozenset({"admin", *roles}),
                refusal=ADMIN_REFUSAL, step_up=step_up)


ANYONE = Rule(anyone=True)
ATTESTING = allow(CallerKind.ANONYMOUS, refusal="may not attest over this connection: attest on the attestation "
                  "listener (--attest-bind), which asks for no client certificate")
AGENTS = allow(CallerKind.AGENT, refusal="is not an agent of this trust domain; only agents may call the Node API")
# The roles (issue: operators). Listings are open to every role; changes to the roles that own them.
READERS = ("security-officer", "policy-author", "auditor", "viewer")
ADMINS = admins()
LISTINGS = admins(*READERS)
POLICY_READ = admins("security-officer", "policy-author", "auditor")
POLICY_WRITE = admins("policy-author")
AUDIT = admins("auditor", "security-officer")
SECURITY = admins("security-officer")
SECURITY_STEP_UP = admins("security-officer", step_up=True)
ADMIN_STEP_UP = admins(step_up=True)
ANY_OPERATOR = admins(*READERS)
# The login listener: nobody is known yet; the handlers check the factors.
ATTESTING_OPERATORS = allow(CallerKind.ANONYMOUS, refusal="may not log in over this connection: log in on the "
                            "login listener (--login-bind), which asks for no client certificate")

# Every method of every service the server registers, keyed as gRPC names it. A new method
# is refused until it is listed here (tests/unit/test_calls.py checks this against the
# service descriptors).
CALLS: Mapping[str, Rule] = MappingProxyType({
    "/grpc.health.v1.Health/Check": ANYONE,
    "/grpc.health.v1.Health/List": ANYONE,
    "/grpc.health.v1.Health/Watch": ANYONE,

    "/trustmesh.v1.Node/Attest": ATTESTING,
    "/trustmesh.v1.Node/RenewAgent": AGENTS,
    "/trustmesh.v1.Node/Sync": AGENTS,
    "/trustmesh.v1.Node/BatchSignX509": AGENTS,
    "/trustmesh.v1.Node/SignJWT": AGENTS,
    "/trustmesh.v1.Node/ReportFlows": AGENTS,

    "/trustmesh.v1.Admin/CreateEntry": ADMINS,
    "/trustmesh.v1.Admin/GetEntry": LISTINGS,
    "/trustmesh.v1.Admin/ListEntries": LISTINGS,
    "/trustmesh.v1.Admin/UpdateEntry": ADMINS,
    "/trustmesh.v1.Admin/DeleteEntry": ADMINS,
    "/trustmesh.v1.Admin/CreateJoinToken": ADMINS,
    "/trustmesh.v1.Admin/ListAgents": LISTINGS,
    "/trustmesh.v1.Admin/BanAgent": SECURITY_STEP_UP,
    "/trustmesh.v1.Admin/EvictAgent": SECURITY,
    "/trustmesh.v1.Admin/ClearAgent": SECURITY,
    # Labels decide where node-selector entries are issued: the same power as creating entries.
    "/trustmesh.v1.Admin/LabelAgent": ADMINS,
    "/trustmesh.v1.Admin/GetBundle": LISTINGS,
    "/trustmesh.v1.Admin/ListFederationRelationships": LISTINGS,
    "/trustmesh.v1.Admin/CreateFederationRelationship": ADMINS,
    "/trustmesh.v1.Admin/DeleteFederationRelationship": ADMINS,
    "/trustmesh.v1.Admin/RefreshFederatedBundle": ADMINS,
    "/trustmesh.v1.Admin/ApplyPolicy": POLICY_WRITE,
    "/trustmesh.v1.Admin/DiffPolicy": POLICY_WRITE,
    "/trustmesh.v1.Admin/GetPolicy": POLICY_READ,
    "/trustmesh.v1.Admin/ListPolicyRevisions": POLICY_READ,
    "/trustmesh.v1.Admin/RollbackPolicy": POLICY_WRITE,
    "/trustmesh.v1.Admin/GetCAJournal": AUDIT,
    "/trustmesh.v1.Admin/RotateRoot": SECURITY_STEP_UP,
    "/trustmesh.v1.Admin/IssuePartnerCertificate": SECURITY_STEP_UP,
    "/trustmesh.v1.Admin/RevokePartnerCertificate": SECURITY,
    "/trustmesh.v1.Admin/ListAuditEvents": AUDIT,
    "/trustmesh.v1.Admin/VerifyAudit": AUDIT,
    "/trustmesh.v1.Admin/AddOperator": ADMIN_STEP_UP,
    "/trustmesh.v1.Admin/ListOperators": admins("security-officer", "auditor"),
    "/trustmesh.v1.Admin/DisableOperator": admins("security-officer"),
    "/trustmesh.v1.Admin/RemoveOperator": ADMINS,
    "/trustmesh.v1.Admin/ResetOperator": ADMIN_STEP_UP,
    "/trustmesh.v1.Admin/WhoAmI": ANY_OPERATOR,
    "/trustmesh.v1.Admin/GetPolicyOwners": LISTINGS,
    # The map of who talks to whom: what `policy suggest` and `policy simulate` read in CI.
    "/trustmesh.v1.Admin/ListFlows": LISTINGS,
    "/trustmesh.v1.Admin/ExportTrace": LISTINGS,  # the same flows, per minute and node
    "/trustmesh.v1.Admin/SetPolicyOwners": ADMIN_STEP_UP,
    # Anyone may ask for just-in-time access; never the requester approves (access.py).
    "/trustmesh.v1.Admin/RequestAccess": ANY_OPERATOR,
    "/trustmesh.v1.Admin/ApproveAccess": SECURITY_STEP_UP,
    "/trustmesh.v1.Admin/DenyAccess": SECURITY,
    "/trustmesh.v1.Admin/ListAccess": LISTINGS,
    "/trustmesh.v1.Admin/RevokeAccess": SECURITY,
    "/trustmesh.v1.Admin/BreakGlass": ADMIN_STEP_UP,
    "/trustmesh.v1.Admin/ReviewAccess": admins("security-officer", "auditor"),
    # Quarantine (continuous verification): seen by every role, put by security officers at once
    # (an incident does not wait for a code), released only with step-up (quarantine.py).
    "/trustmesh.v1.Admin/ListQuarantines": LISTINGS,
    "/trustmesh.v1.Admin/AddQuarantine": SECURITY,
    "/trustmesh.v1.Admin/ReleaseQuarantine": SECURITY_STEP_UP,
    # `trustmesh check`: health facts only (no key, no policy text), for every role that reads.
    "/trustmesh.v1.Admin/GetStatus": LISTINGS,

    "/trustmesh.v1.OperatorLogin/Enroll": ATTESTING_OPERATORS,
    "/trustmesh.v1.OperatorLogin/Login": ATTESTING_OPERATORS,
})


@dataclass(frozen=True)
class Method:
    service: str  # e.g. trustmesh.v1.Node
    name: str  # e.g. Sync

    @classmethod
    def parse(cls, full: str) -> Method:
        service, _, name = full.lstrip("/").rpartition("/")
        return cls(service, name)

    @property
    def full(self) -> str:
        return f"/{self.service}/{self.name}"

    def __str__(self) -> str:
        return f"{self.service}/{self.name}"


# The caller of the call this task serves. grpc.aio runs every call in a task of its own,
# so a value set here is seen by that call's handler only (async generators included).
_caller: ContextVar[Caller] = ContextVar("trustmesh_caller")


def current_caller() -> Caller:
    """The authenticated caller of the call being handled."""
    try:
        return _caller.get()
    except LookupError:
        raise RuntimeError("no caller: this handler runs outside the call layer; pass a CallLayer to "
                           "grpc.aio.server(interceptors=...)") from None


Authenticator = Callable[[grpc.aio.ServicerContext], Awaitable[Caller]]
DenialHook = Callable[[Caller, Method], Awaitable[None]]
# Checks the one-time code (or "" when none was sent) an operator sent with a step-up call;
# raises PermissionDeniedError when it is not a current, unused code of that operator.
StepUpHook = Callable[[Caller, str, Method], Awaitable[None]]
Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]

_HANDLER_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


@dataclass
class _Call:
    """One call's bookkeeping: its method, status so far and start time."""

    method: Method
    started: float
    code: grpc.StatusCode = grpc.StatusCode.OK
    token: Token[Caller] | None = None
    source_token: Token[str] | None = None
    role_token: Token[str] | None = None


class CallLayer(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """The interceptor of one listener: `authenticate` says who calls on that listener.

    `on_denied` runs for every caller the table refuses (the remote admin listener audits
    them); `clock` times calls.
    """

    def __init__(self, authenticate: Authenticator, metrics: Registry, *, table: Mapping[str, Rule] = CALLS,
                 on_denied: DenialHook | None = None, step_up: StepUpHook | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._authenticate = authenticate
        self._step_up = step_up
        self._table = table
        self._on_denied = on_denied
        self._clock = clock
        self._calls = metrics.counter("trustmesh_grpc_calls_total", "gRPC calls answered, by method and status code",
                                      ["service", "method", "code"])
        self._seconds = metrics.histogram("trustmesh_grpc_call_seconds",
                                          "time from a gRPC call's start to its status (streams: their lifetime)",
                                          ["service", "method"])
        # Wrapped once per registered handler, not per call: at most one entry per method served.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method on this server: gRPC answers UNIMPLEMENTED
        full: str = handler_call_details.method
        cached = self._wrapped.get(full)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, Method.parse(full), self._table.get(full))
        self._wrapped[full] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: Method, rule: Rule | None) -> grpc.RpcMethodHandler:
        attribute, factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
        inner: Behaviour = getattr(handler, attribute)
        if inspect.isgeneratorfunction(inner):
            raise TypeError(f"{method}: the call layer serves async handlers only, not a sync generator")
        wrapped = (self._streaming(inner, method, rule) if inspect.isasyncgenfunction(inner)
                   else self._awaiting(inner, method, rule))
        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _awaiting(self, inner: Behaviour, method: Method, rule: Rule | None) -> Behaviour:
        """For handlers that return (an answer, or None after writing a stream to `context`)."""

        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, self._clock())
            try:
                call.token = _caller.set(await self._admit(call, rule, context))
                answer = inner(request, context)
                if inspect.isawaitable(answer):
                    answer = await answer
                call.code = _code_set(context, grpc.StatusCode.OK)
                return answer
            except BaseException as err:
                await self._fail(call, err, context)
                raise
            finally:
                self._done(call)

        return behaviour

    def _streaming(self, inner: Behaviour, method: Method, rule: Rule | None) -> Behaviour:
        """For async-generator handlers, which yield their answers."""

        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(method, self._clock())
            try:
                call.token = _caller.set(await self._admit(call, rule, context))
                # aclosing: if the client goes away mid-stream, the handler's own cleanup
                # (finally blocks) runs now, not whenever the generator is collected.
                async with aclosing(inner(request, context)) as answers:
                    async for answer in answers:
                        yield answer
                call.code = _code_set(context, grpc.StatusCode.OK)
            except GeneratorExit:
                call.code = grpc.StatusCode.CANCELLED  # closed before its end: the client went away
                raise
            except BaseException as err:
                await self._fail(call, err, context)
                raise
            finally:
                self._done(call)

        return behaviour

    async def _admit(self, call: _Call, rule: Rule | None, context: grpc.aio.ServicerContext) -> Caller:
        method = call.method
        if rule is None:
            log_event(log, "call_not_in_table", level=logging.ERROR, method=str(method))
            raise PermissionDeniedError(f"{method} is not in the server's call table, so nobody may call it")
        if rule.anyone:
            return ANONYMOUS_CALLER
        caller = await self._authenticate(context)
        if caller.source:
            call.source_token = call_source.set(caller.source)
        if rule.permits(caller):
            call.role_token = call_role.set(rule.role_used(caller))
            if rule.step_up and caller.kind is CallerKind.OPERATOR:
                if self._step_up is None:
                    raise PermissionDeniedError(f"{method} needs a one-time code, which this listener cannot check")
                await self._step_up(caller, _metadata(context, OTP_HEADER), method)
            return caller
        log_event(log, "call_denied", method=str(method), caller=caller.id, kind=str(caller.kind), source=caller.source)
        if self._on_denied is not None:
            await self._on_denied(caller, method)
        refusal = ROLE_REFUSAL if caller.kind is CallerKind.OPERATOR else rule.refusal
        raise PermissionDeniedError(f"{caller.id} {refusal} ({method} is open to {rule.describe()})")

    async def _fail(self, call: _Call, err: BaseException, context: grpc.aio.ServicerContext) -> None:
        """Record why the call ended; answer errors with their status (raises AbortError then)."""
        if isinstance(err, grpc.aio.AbortError):  # the handler aborted with a status of its own
            call.code = _code_set(context, grpc.StatusCode.UNKNOWN)
        elif isinstance(err, asyncio.CancelledError):
            call.code = grpc.StatusCode.CANCELLED
        elif isinstance(err, Exception):
            call.code, message = status_for(err, str(call.method))
            await context.abort(call.code, message)
        else:
            call.code = grpc.StatusCode.UNKNOWN

    def _done(self, call: _Call) -> None:
        if call.token is not None:
            # A stream closed from another task runs this in another context: nothing to undo there.
            with suppress(ValueError):
                _caller.reset(call.token)
        if call.source_token is not None:
            with suppress(ValueError):
                call_source.reset(call.source_token)
        if call.role_token is not None:
            with suppress(ValueError):
                call_role.reset(call.role_token)
        service, name = call.method.service, call.method.name
        self._calls.inc(service=service, method=name, code=call.code.name)
        self._seconds.observe(self._clock() - call.started, service=service, method=name)


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name and isinstance(value, str):
            return value[:64]
    return ""


def _code_set(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else default
