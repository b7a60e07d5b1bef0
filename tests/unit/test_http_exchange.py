"""The http listeners' request loop (trustmesh.agent.proxy.http) on loopback sockets, with a
scripted backend: framing each way, refusals that keep or close the connection, pooling.

The policy is stood in for by a decision per method (the real one is tested in
test_policy_routes.py and, end to end, in tests/integration/test_http_proxy.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh.agent.proxy.http import (
    Admission,
    Exchange,
    Outcome,
    Upstream,
    UpstreamPool,
    is_identity_header,
    serve_requests,
)
from trustmesh.policy import Decision
from trustmesh.policy.routes import HttpRequest

Backend = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Methods(Exchange):
    """Allows GET, HEAD and PUT; denies the rest."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.outcomes: list[Outcome] = []
        self.seen: list[HttpRequest] = []

    def admit(self, request: HttpRequest, request_id: str) -> Admission:
        self.seen.append(request)
        allowed = request.method in ("GET", "HEAD", "PUT")
        return Admission(Decision(allowed, "r allow[0]" if allowed else "default deny", "because"), request.method,
                         b"X-Trustmesh-Peer-Id: spiffe://example.org/caller\r\n")

    def refused_path(self, method: str, reason: str, request_id: str) -> Admission:
        return Admission(Decision(False, "ambiguous path", reason), method)

    async def upstream(self) -> Upstream:
        return await self.pool.get()

    def release(self, conn: Upstream, reusable: bool) -> None:
        if reusable:
            self.pool.put(conn)
        else:
            conn.close()

    def done(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


async def _serve(exchange: Exchange, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_body: int = 1000) -> None:
    try:
        await serve_requests((reader, writer), exchange, max_body=max_body)
    finally:
        writer.close()  # as the listeners do


async def _run(backend: Backend, client_bytes: bytes, *, read_until_close: bool = True) -> tuple[bytes, Methods,
                                                                                                  list[bytes]]:
    """Send `client_bytes` through the loop to `backend`; what the client got back, the
    exchange, and what the backend received per connection."""
    received: list[bytes] = []

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(b"")
        index = len(received) - 1

        async def readuntil(separator: bytes = b"\n") -> bytes:
            data = await original(separator)
            received[index] += data
            return data

        original = reader.readuntil
        reader.readuntil = readuntil  # type: ignore[method-assign]
        await backend(reader, writer)

    upstream = await asyncio.start_server(recording, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    pool = UpstreamPool(lambda: asyncio.open_connection("127.0.0.1", port))
    exchange = Methods(pool)
    proxy = await asyncio.start_server(lambda r, w: _serve(exchange, r, w), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    writer.write(client_bytes)
    await writer.drain()
    try:
        if read_until_close:
            writer.write_eof()  # the client says no more: an unfinished request must not be waited for
            got = await asyncio.wait_for(reader.read(-1), 10)
        else:
            await asyncio.sleep(0.3)
            got = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
        proxy.close()
        upstream.close()
        pool.clear()
    return got, exchange, received


async def _reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, responses: list[bytes]) -> None:
    """A backend that answers each request head (bodies are not expected) with the next response."""
    for response in responses:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        writer.write(response)
        await writer.drain()
    writer.close()


def _backend(*responses: bytes) -> Backend:
    return lambda r, w: _reply(r, w, list(responses))


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_identity_headers_are_recognised_in_every_spelling() -> None:
    for name in (b"x-forwarded-client-cert", b"x_forwarded_client_cert", b"x-trustmesh-peer-id",
                 b"x_trustmesh-peer_id"):
        assert is_identity_header(name)
    assert not is_identity_header(b"x-forwarded-for")


@pytest.mark.asyncio
async def test_a_denied_request_keeps_the_connection_and_its_body_is_skipped() -> None:
    got, exchange, received = await _run(_backend(OK, OK), (
        b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /b HTTP/1.1\r\nHost: h\r\nX-Trustmesh-Peer-Id: forged\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"))
    assert got.count(b"HTTP/1.1 403 Forbidden") == 1 and got.count(b"HTTP/1.1 200 OK") == 2
    assert got.index(b"403") < got.index(b"200")  # in order
    assert [o.status for o in exchange.outcomes] == [403, 200, 200]
    upstream = b"".join(received)
    assert b"hello" not in upstream and b"forged" not in upstream and b"POST" not in upstream
    assert upstream.count(b"X-Trustmesh-Peer-Id: spiffe://example.org/caller") == 2
    assert len(received) == 1  # both allowed requests went over one pooled connection


@pytest.mark.asyncio
async def test_a_denied_request_with_a_large_body_closes_the_connection() -> None:
    got, exchange, _ = await _run(_backend(OK), b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  + b"11170\r\n" + b"x" * 70_000 + b"\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 403") and b"Connection: close" in got and b"200 OK" not in got


@pytest.mark.asyncio
async def test_response_to_head_ends_at_its_head() -> None:
    got, exchange, _ = await _run(_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", OK),
                                  b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n"
                                  b"Connection: close\r\n\r\n")
    assert got.count(b"HTTP/1.1 200") == 2 and b"Content-Length: 1234" in got and got.endswith(b"ok")


@pytest.mark.asyncio
async def test_chunked_and_close_delimited_responses_are_reframed() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
    got, _, _ = await _run(_backend(chunked), b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    head, body = got.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head and body == b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"  # no trailer
    # HTTP/1.0 client: no chunking for it; the body ends with the connection.
    got, _, _ = await _run(_backend(chunked), b"GET /a HTTP/1.0\r\n\r\n")
    assert got.endswith(b"\r\n\r\nabcde") and b"Connection: close" in got
    # A body delimited by the backend closing: passed on, then the client's connection closes.
    got, _, _ = await _run(_backend(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"),
                           b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert got.endswith(b"until the end") and got.count(b"HTTP/1.1") == 1 and b"Connection: close" in got


@pytest.mark.asyncio
async def test_interim_responses_are_not_passed_on() -> None:
    got, _, _ = await _run(_backend(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK),
                           b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 OK") and b"103" not in got


@pytest.mark.asyncio
async def test_a_pooled_connection_the_backend_drops_is_retried_once_on_a_new_one() -> None:
    # The backend's first connection answers one request, then drops the next unanswered (as a
    # keep-alive timeout racing the request would); its second connection answers.
    connections: list[int] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
        if len(connections) == 1:
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.abort()

    upstream = await asyncio.start_server(backend, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    exchange = Methods(UpstreamPool(lambda: asyncio.open_connection("127.0.0.1", port)))
    proxy = await asyncio.start_server(lambda r, w: _serve(exchange, r, w), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    try:
        for _ in range(2):
            writer.write(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"ok"
    finally:
        writer.close()
        proxy.close()
        upstream.close()
    assert len(connections) == 2 and [o.status for o in exchange.outcomes] == [200, 200]


@pytest.mark.asyncio
async def test_limits() -> None:
    got, _, received = await _run(_backend(OK), b"GET /a HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * 101 + b"\r\n")
    assert got.startswith(b"HTTP/1.1 431") and not received
    got, _, received = await _run(_backend(OK), b"PUT /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 413") and not received
    got, _, _ = await _run(_backend(OK), b"PUT /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + b"3e8\r\n" + b"x" * 1000 + b"\r\n1\r\nx\r\n0\r\n\r\n")
    assert b"HTTP/1.1 413" in got
    got, _, received = await _run(_backend(OK), b"GET /a HTTP/1.1\r\nHost: h\r\nExpect: magic\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 417") and not received


@pytest.mark.asyncio
async def test_the_backend_down_is_a_502() -> None:
    async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", 1)

    from trustmesh.agent.proxy.http import HttpError

    async def refusing() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await dial()
        except OSError:
            raise HttpError(502, "service_unavailable", "down") from None

    exchange = Methods(UpstreamPool(refusing))
    proxy = await asyncio.start_server(lambda r, w: _serve(exchange, r, w), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
    writer.write(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    got = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    proxy.close()
    assert got.startswith(b"HTTP/1.1 502") and b"service_unavailable" in got
    assert [o.status for o in exchange.outcomes] == [502]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_any_bytes_end_in_an_answer_or_a_close_never_a_crash(data: bytes) -> None:
    got, exchange, received = asyncio.run(_run(_backend(OK, OK, OK), b"GET /a HTTP/1.1\r\nHost: h\r\n" + data))
    assert got == b"" or got.startswith(b"HTTP/1.1 ")
