"""The call layer: the table covers every method, and a real grpc.aio server refuses each
caller kind where the table says so; errors become statuses; every call is counted and timed.

The servicers are built from the generated base classes and answer empty messages, so what
is tested is only the layer around them. The caller kind comes from call metadata through an
injected authenticator (the real authenticators of each listener are tested in test_callers.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, node_pb2, node_pb2_grpc
from trustmesh.controlplane.api.calls import (
    ANYONE,
    CALLS,
    Caller,
    CallerKind,
    CallLayer,
    Method,
    Rule,
    current_caller,
)
from trustmesh.errors import NotFoundError, UnauthenticatedError, UnavailableError
from trustmesh.metrics import Registry

SERVICES: dict[str, tuple[Any, Any, Any]] = {  # service -> (pb2 module, base servicer class, add_to_server)
    "trustmesh.v1.Node": (node_pb2, node_pb2_grpc.NodeServicer, node_pb2_grpc.add_NodeServicer_to_server),
    "trustmesh.v1.Admin": (admin_pb2, admin_pb2_grpc.AdminServicer, admin_pb2_grpc.add_AdminServicer_to_server),
    "trustmesh.v1.OperatorLogin": (admin_pb2, admin_pb2_grpc.OperatorLoginServicer,
                                   admin_pb2_grpc.add_OperatorLoginServicer_to_server),
    "grpc.health.v1.Health": (health_pb2, health_pb2_grpc.HealthServicer,
                              health_pb2_grpc.add_HealthServicer_to_server),
}


def descriptor(service: str) -> ServiceDescriptor:
    pb2 = SERVICES[service][0]
    found: ServiceDescriptor = pb2.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]]
    return found


def methods() -> list[MethodDescriptor]:
    return [m for service in SERVICES for m in descriptor(service).methods]


def full_name(m: MethodDescriptor) -> str:
    return f"/{m.containing_service.full_name}/{m.name}"


def message_class(m: MethodDescriptor, which: str) -> Any:
    pb2 = SERVICES[m.containing_service.full_name][0]
    return getattr(pb2, getattr(m, which).name)


def test_the_table_lists_every_method_of_every_service_and_nothing_else() -> None:
    assert set(CALLS) == {full_name(m) for m in methods()}
    for name, rule in CALLS.items():
        # Every rule admits someone, and only health checks are open to anyone.
        assert rule.anyone or rule.kinds or rule.roles, name
        assert rule.anyone == name.startswith("/grpc.health.v1.Health/"), name


def test_the_table_says_what_todays_listeners_allow() -> None:
    assert CALLS["/trustmesh.v1.Node/Attest"].kinds == {CallerKind.ANONYMOUS}
    for m in descriptor("trustmesh.v1.Node").methods:
        if m.name != "Attest":
            assert CALLS[full_name(m)].kinds == {CallerKind.AGENT}, m.name
    for m in descriptor("trustmesh.v1.Admin").methods:
        assert CALLS[full_name(m)].kinds == {CallerKind.LOCAL_ADMIN, CallerKind.REMOTE_ADMIN}, m.name


def test_a_role_admits_callers_holding_it_whatever_their_kind() -> None:
    rule = Rule(frozenset({CallerKind.LOCAL_ADMIN}), roles=frozenset({"registry-reader"}))
    assert rule.permits(Caller(CallerKind.WORKLOAD, "op", roles=frozenset({"registry-reader", "viewer"})))
    assert not rule.permits(Caller(CallerKind.WORKLOAD, "op", roles=frozenset({"viewer"})))
    assert rule.permits(Caller(CallerKind.LOCAL_ADMIN, "admin:local-socket"))
    assert rule.describe() == "local_admin, role registry-reader"
    assert ANYONE.permits(Caller(CallerKind.ANONYMOUS, "anonymous"))


# --- a real server with servicers that answer empty messages ----------------------------------


class Served:
    """What the handlers saw: (method, caller) per call that reached a handler."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Caller]] = []
        self.release = asyncio.Event()
        self.closed: list[str] = []

    def callers(self, full: str) -> list[Caller]:
        return [c for name, c in self.calls if name == full]


def echo_servicer(service: str, served: Served) -> Any:
    """A subclass of the generated base class whose every method answers one empty message."""
    base = SERVICES[service][1]
    body: dict[str, Callable[..., Any]] = {}
    for m in descriptor(service).methods:
        out = message_class(m, "output_type")
        full = full_name(m)

        def make(m: MethodDescriptor = m, out: Any = out, full: str = full) -> Callable[..., Any]:
            if m.server_streaming:
                async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    if m.client_streaming:
                        await request.__anext__()
                    served.calls.append((full, current_caller()))
                    yield out()
                return stream

            async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
                if m.client_streaming:
                    await request.__anext__()
                served.calls.append((full, current_caller()))
                return out()
            return unary

        body[m.name] = make()
    return type(f"Echo{service.rsplit('.', 1)[1]}", (base,), body)()


async def by_metadata(context: grpc.aio.ServicerContext) -> Caller:
    """The test's authenticator: the caller kind named in the `test-caller` metadata."""
    kind = dict(context.invocation_metadata() or ()).get("test-caller")
    if kind is None:
        raise UnauthenticatedError("no test-caller metadata: say which caller kind you are")
    return Caller(CallerKind(kind), f"test:{kind}", payload=kind)


class Server:
    def __init__(self, layer: CallLayer, served: Served) -> None:
        self.layer = layer
        self.served = served
        self.server = grpc.aio.server(interceptors=[layer], options=[("grpc.so_reuseport", 0)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")

    async def call(self, m: MethodDescriptor, kind: str | None) -> grpc.StatusCode:
        code, _ = await self.call_details(m, kind)
        return code

    async def call_details(self, m: MethodDescriptor, kind: str | None) -> tuple[grpc.StatusCode, str]:
        request, response = message_class(m, "input_type"), message_class(m, "output_type")
        metadata = (("test-caller", kind),) if kind else ()
        kwargs: dict[str, Any] = {"request_serializer": request.SerializeToString,
                                  "response_deserializer": response.FromString}
        full = full_name(m)
        try:
            if m.client_streaming and m.server_streaming:
                stream = self.channel.stream_stream(full, **kwargs)(iter([request()]), metadata=metadata, timeout=10)
                assert [r async for r in stream] == [response()]
            elif m.server_streaming:
                stream = self.channel.unary_stream(full, **kwargs)(request(), metadata=metadata, timeout=10)
                assert [r async for r in stream] == [response()]
            elif m.client_streaming:
                await self.channel.stream_unary(full, **kwargs)(iter([request()]), metadata=metadata, timeout=10)
            else:
                await self.channel.unary_unary(full, **kwargs)(request(), metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""


@pytest.fixture
async def denials() -> list[tuple[Caller, Method]]:
    return []


@pytest.fixture
async def server(denials: list[tuple[Caller, Method]]) -> AsyncIterator[Server]:
    async def on_denied(caller: Caller, method: Method) -> None:
        denials.append((caller, method))

    served = Served()
    s = Server(CallLayer(by_metadata, Registry(), on_denied=on_denied), served)
    for service, (_, _, add) in SERVICES.items():
        add(echo_servicer(service, served), s.server)
    await s.server.start()
    yield s
    await s.channel.close()
    await s.server.stop(None)


async def test_each_caller_kind_is_served_or_refused_as_the_table_says(
        server: Server, denials: list[tuple[Caller, Method]]) -> None:
    for kind in CallerKind:
        caller = Caller(kind, f"test:{kind}")
        for m in methods():
            rule = CALLS[full_name(m)]
            code = await server.call(m, str(kind))
            if rule.permits(caller):
                assert code == grpc.StatusCode.OK, (kind, full_name(m))
                seen = server.served.callers(full_name(m))[-1]
                # The handler sees who called; methods open to anyone authenticate nobody.
                assert seen == (Caller(CallerKind.ANONYMOUS, "anonymous") if rule.anyone
                                else Caller(kind, f"test:{kind}", payload=str(kind))), (kind, full_name(m))
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (kind, full_name(m))
                assert denials[-1] == (Caller(kind, f"test:{kind}", payload=str(kind)), Method.parse(full_name(m)))
    refused = sum(1 for kind in CallerKind for m in methods()
                  if not CALLS[full_name(m)].permits(Caller(kind, "x")))
    assert len(denials) == refused and refused > 0
    # Each refused call stopped before its handler: every call a handler saw was permitted.
    for full, seen in server.served.calls:
        assert CALLS[full].permits(seen)


async def test_a_refusal_says_who_may_call_the_method_and_what_to_do(server: Server) -> None:
    node = {m.name: m for m in descriptor("trustmesh.v1.Node").methods}
    admin = {m.name: m for m in descriptor("trustmesh.v1.Admin").methods}
    code, details = await server.call_details(admin["CreateEntry"], "workload")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == ("test:workload may not use the admin API: register it with `trustmesh entry create … --admin` "
                       "(trustmesh.v1.Admin/CreateEntry is open to local_admin, remote_admin, role admin)")
    code, details = await server.call_details(node["BatchSignX509"], "workload")
    assert "only agents may call the Node API" in details and "open to agent" in details
    code, details = await server.call_details(node["Attest"], "agent")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "--attest-bind" in details


async def test_an_unauthenticated_caller_gets_the_authenticators_answer(server: Server) -> None:
    node = {m.name: m for m in descriptor("trustmesh.v1.Node").methods}
    code, details = await server.call_details(node["Sync"], None)
    assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("no test-caller metadata")
    assert not server.served.calls
    health_check = descriptor("grpc.health.v1.Health").methods_by_name["Check"]
    assert await server.call(health_check, None) == grpc.StatusCode.OK  # open to anyone: nobody is asked


async def test_a_method_missing_from_the_table_is_never_served(server: Server) -> None:
    ran: list[str] = []

    async def secret(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ran.append("secret")
        return b""

    server.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Hidden", {"Do": grpc.unary_unary_rpc_method_handler(secret)}),))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.channel.unary_unary("/test.Hidden/Do")(b"", metadata=(("test-caller", "local_admin"),),
                                                            timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "test.Hidden/Do is not in the server's call table, so nobody may call it"
    assert not ran
    # A method the server does not have at all stays UNIMPLEMENTED.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.channel.unary_unary("/test.Hidden/Other")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- errors and metrics ---------------------------------------------------------------------------


class Failing(admin_pb2_grpc.AdminServicer):
    async def GetEntry(self, request: admin_pb2.GetEntryRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.GetEntryResponse:
        raise NotFoundError(f"entry {request.id!r} not found; list entries with `trustmesh entry list`")

    async def ListEntries(self, request: admin_pb2.ListEntriesRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ListEntriesResponse:
        raise KeyError("secret-internal-detail")

    async def GetPolicy(self, request: admin_pb2.GetPolicyRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.GetPolicyResponse:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted by the handler itself")
        raise AssertionError("abort raises")


class FailingNode(node_pb2_grpc.NodeServicer):
    def __init__(self, served: Served) -> None:
        self.served = served

    async def Sync(self, request: node_pb2.SyncRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.SyncResponse]:
        caller = current_caller()
        try:
            yield node_pb2.SyncResponse()
            if request.since_revision == 1:
                raise UnavailableError("the agent SVID this sync stream was opened with expired; reconnect")
            if request.since_revision == 2:
                raise RuntimeError("secret-internal-detail")
            await self.served.release.wait()
            # Other calls ran meanwhile: this stream's caller is still its own.
            self.served.calls.append(("Sync", current_caller()))
            assert current_caller() is caller
            yield node_pb2.SyncResponse()
        finally:
            self.served.closed.append(caller.id)


@pytest.fixture
async def failing() -> AsyncIterator[Server]:
    served = Served()
    s = Server(CallLayer(by_metadata, Registry()), served)
    admin_pb2_grpc.add_AdminServicer_to_server(Failing(), s.server)
    node_pb2_grpc.add_NodeServicer_to_server(FailingNode(served), s.server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), s.server)
    await s.server.start()
    yield s
    await s.channel.close()
    await s.server.stop(None)


ADMIN = (("test-caller", "local_admin"),)
AGENT = (("test-caller", "agent"),)


async def test_a_trustmesh_error_becomes_its_status_with_its_message(failing: Server) -> None:
    stub = admin_pb2_grpc.AdminStub(failing.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetEntry(admin_pb2.GetEntryRequest(id="e-1"), metadata=ADMIN, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "entry 'e-1' not found; list entries with `trustmesh entry list`"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetPolicy(admin_pb2.GetPolicyRequest(), metadata=ADMIN, timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # a handler's own abort stands
    assert info.value.details() == "aborted by the handler itself"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.DeleteEntry(admin_pb2.DeleteEntryRequest(), metadata=ADMIN, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the base class's stub


async def test_an_unexpected_exception_is_internal_without_details(failing: Server,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await admin_pb2_grpc.AdminStub(failing.channel).ListEntries(admin_pb2.ListEntriesRequest(), metadata=ADMIN,
                                                                    timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error in trustmesh.v1.Admin/ListEntries; see the server log"
    assert "secret" not in (info.value.debug_error_string() or "")
    assert "secret-internal-detail" in caplog.text  # the bug is in the server log, with its traceback
    stream = node_pb2_grpc.NodeStub(failing.channel).Sync(node_pb2.SyncRequest(since_revision=2), metadata=AGENT,
                                                          timeout=10)
    assert await stream.read() == node_pb2.SyncResponse()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.read()
    assert info.value.code() == grpc.StatusCode.INTERNAL and "secret" not in (info.value.details() or "")


async def test_errors_in_a_stream_are_mapped_after_its_first_messages(failing: Server) -> None:
    stream = node_pb2_grpc.NodeStub(failing.channel).Sync(node_pb2.SyncRequest(since_revision=1), metadata=AGENT,
                                                          timeout=10)
    assert await stream.read() == node_pb2.SyncResponse()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.read()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and info.value.details().startswith("the agent SVID")
    assert failing.served.closed == ["test:agent"]


async def test_a_stream_keeps_its_caller_while_other_calls_run(failing: Server) -> None:
    stream = node_pb2_grpc.NodeStub(failing.channel).Sync(node_pb2.SyncRequest(), metadata=AGENT, timeout=10)
    assert await stream.read() == node_pb2.SyncResponse()
    with pytest.raises(grpc.aio.AioRpcError):
        await admin_pb2_grpc.AdminStub(failing.channel).GetEntry(admin_pb2.GetEntryRequest(id="x"), metadata=ADMIN,
                                                                 timeout=10)
    failing.served.release.set()
    assert await stream.read() == node_pb2.SyncResponse()
    assert await stream.code() == grpc.StatusCode.OK
    assert failing.served.calls == [("Sync", Caller(CallerKind.AGENT, "test:agent", payload="agent"))]


async def test_a_stream_the_client_cancels_is_closed_and_counted() -> None:
    served, metrics = Served(), Registry()
    s = Server(CallLayer(by_metadata, metrics), served)
    node_pb2_grpc.add_NodeServicer_to_server(FailingNode(served), s.server)
    await s.server.start()
    try:
        stream = node_pb2_grpc.NodeStub(s.channel).Sync(node_pb2.SyncRequest(), metadata=AGENT, timeout=10)
        assert await stream.read() == node_pb2.SyncResponse()
        stream.cancel()
        for _ in range(100):  # the server learns of the cancellation asynchronously
            if served.closed:
                break
            await asyncio.sleep(0.05)
        assert served.closed == ["test:agent"]  # the handler's cleanup ran
        calls = metrics.counter("trustmesh_grpc_calls_total", "", ["service", "method", "code"])
        for _ in range(100):
            if calls.value(service="trustmesh.v1.Node", method="Sync", code="CANCELLED"):
                break
            await asyncio.sleep(0.05)
        assert calls.value(service="trustmesh.v1.Node", method="Sync", code="CANCELLED") == 1
    finally:
        await s.channel.close()
        await s.server.stop(None)


async def test_every_call_is_counted_by_code_and_timed() -> None:
    served, metrics = Served(), Registry()
    s = Server(CallLayer(by_metadata, metrics), served)
    admin_pb2_grpc.add_AdminServicer_to_server(Failing(), s.server)
    await s.server.start()
    try:
        stub = admin_pb2_grpc.AdminStub(s.channel)
        for metadata in (ADMIN, ADMIN, AGENT):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetEntry(admin_pb2.GetEntryRequest(id="e"), metadata=metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetEntry(admin_pb2.GetEntryRequest(id="e"), timeout=10)
    finally:
        await s.channel.close()
        await s.server.stop(None)
    calls = metrics.counter("trustmesh_grpc_calls_total", "", ["service", "method", "code"])
    for code, n in (("NOT_FOUND", 2), ("PERMISSION_DENIED", 1), ("UNAUTHENTICATED", 1)):
        assert calls.value(service="trustmesh.v1.Admin", method="GetEntry", code=code) == n, code
    seconds = metrics.histogram("trustmesh_grpc_call_seconds", "", ["service", "method"])
    assert seconds.count(service="trustmesh.v1.Admin", method="GetEntry") == 4


async def test_health_answers_while_agents_cannot_be_authenticated() -> None:
    async def loading(context: grpc.aio.ServicerContext) -> Caller:
        raise UnavailableError("the server is still loading its registry; retry in a moment")

    s = Server(CallLayer(loading, Registry()), Served())
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, s.server)
    node_pb2_grpc.add_NodeServicer_to_server(FailingNode(Served()), s.server)
    await s.server.start()
    try:
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        stub = health_pb2_grpc.HealthStub(s.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node_pb2_grpc.NodeStub(s.channel).Sync(node_pb2.SyncRequest(), timeout=10).read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await s.channel.close()
        await s.server.stop(None)
