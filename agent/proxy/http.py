"""HTTP/1.1 through the agent's listeners: one decision per request, the caller's identity
handed to the backend, and kept-alive upstream connections.

Parsing is llhttp's (httptools), never ours, and strict: a request with both Content-Length
and Transfer-Encoding, two Content-Lengths, a malformed chunk size, obsolete line folding or a
bare LF is refused with 400 and the connection closed, so no request can be smuggled past the
decision. Every message is re-framed on its way through (our own Content-Length or chunking),
so the backend never sees the client's framing either.

Per request, in order: the head is read (at most MAX_HEADER_BYTES in MAX_HEADERS fields), the
path is normalised (trustmesh.policy.routes: an ambiguous one is refused with 400, never
guessed), the policy decides (a denial is a 403 with a JSON body naming the rule and a request
ID; the connection stays usable), and an allowed request goes to the backend with the path as
normalised, the hop-by-hop headers dropped, every identity header the client sent removed and
ours added. Responses come back in order (pipelined requests are answered one after another).
Protocol upgrades (WebSocket, h2c) and CONNECT are refused: after an upgrade there are no more
requests to decide, so such traffic belongs on a tcp listener.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools

from trustmesh.policy import Decision
from trustmesh.policy.routes import AmbiguousPathError, HttpRequest, normalize_path
from trustmesh.spiffeid import SpiffeId

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

MAX_HEADER_BYTES = 32 * 1024  # request line and header fields of one message, as nginx's large buffers
MAX_HEADERS = 100
DEFAULT_MAX_BODY = 10 * 1024 * 1024
DISCARD_LIMIT = 64 * 1024  # of a refused request's body read to keep its connection; more closes it
KEEPALIVE_SECONDS = 60.0  # a client connection idle between requests this long is closed
READ_SECONDS = 30.0  # one read of a request in progress (a slow client holds nothing for ever)
UPSTREAM_SECONDS = 60.0  # for the backend's response head
POOL_IDLE = 32  # idle upstream connections kept per listener
POOL_IDLE_SECONDS = 30.0
POOL_MAX_AGE = 300.0  # an upstream connection (outbound: mTLS with one SVID) is not reused after this
CHUNK = 64 * 1024

XFCC = b"x-forwarded-client-cert"
PEER_ID = b"x-trustmesh-peer-id"
IDENTITY_HEADERS = frozenset({XFCC, PEER_ID})
# Never forwarded: they describe one hop (RFC 9110 7.6.1), or we frame the message ourselves.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"content-length", b"expect", b"proxy-authorization",
                        b"proxy-authenticate"})

REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 413: "Content Too Large", 417: "Expectation Failed",
           431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


class HttpError(Exception):
    """A request this proxy answers itself with `status`, then closes the connection: after
    a malformed or refused message its framing cannot be trusted to carry another."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason


class _TooLarge(Exception):
    """Raised from a parser callback to stop a message that outgrew a limit."""


def is_identity_header(name: bytes) -> bool:
    """Ours, whatever its case or separators: a backend that reads headers as CGI variables
    (HTTP_X_TRUSTMESH_PEER_ID) cannot tell `X_Trustmesh_Peer_Id` from the real one."""
    return name.replace(b"_", b"-") in IDENTITY_HEADERS


def identity_headers(service: SpiffeId, client: SpiffeId, leaf_der: bytes) -> bytes:
    """What the backend reads the caller from: Envoy's X-Forwarded-Client-Cert (By our service,
    Hash of the client's leaf certificate, URI its SPIFFE ID; SPIFFE IDs hold no `,;="`, so
    nothing is quoted) and X-Trustmesh-Peer-Id."""
    digest = hashlib.sha256(leaf_der).hexdigest()
    return (f"X-Forwarded-Client-Cert: By={service};Hash={digest};URI={client}\r\n"
            f"X-Trustmesh-Peer-Id: {client}\r\n").encode()


@dataclass(slots=True)
class Head:
    """One message's start line and header fields, as the parser read them."""

    target: bytes = b""  # requests: the request-target
    status: int = 0  # responses
    reason: bytes = b""  # responses: the reason phrase
    method: str = ""
    version: str = "1.1"
    keep_alive: bool = True
    upgrade: bool = False
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_length: int | None = None
    chunked: bool = False
    other_coding: bool = False  # a transfer coding besides chunked (gzip, chunked): not re-framed, refused
    hosts: int = 0
    expect: bytes | None = None
    connection_tokens: frozenset[bytes] = frozenset()
    size: int = 0  # bytes of the start line and fields, for the limit


class _Sink:
    """httptools' callbacks: the messages of one connection as a queue of events in order
    ("head", Head), ("body", bytes), ("end", None), so pipelined messages keep their order."""

    __slots__ = ("parser", "events", "_head", "_done")

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None
        self.events: deque[tuple[str, object]] = deque()
        self._head = Head()
        self._done = True  # between messages: header fields after the body are trailers, dropped

    def on_message_begin(self) -> None:
        self._head = Head()
        self._done = False

    def on_url(self, url: bytes) -> None:
        head = self._head
        head.target += url
        head.size += len(url)
        if head.size > MAX_HEADER_BYTES:
            raise _TooLarge

    def on_status(self, status: bytes) -> None:
        self._head.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._done:
            return  # a trailer field of a chunked body: not forwarded
        head = self._head
        head.size += len(name) + len(value) + 4
        if head.size > MAX_HEADER_BYTES or len(head.headers) >= MAX_HEADERS:
            raise _TooLarge
        head.headers.append((name, value))

    def on_headers_complete(self) -> None:
        head, parser = self._head, self.parser
        assert parser is not None
        self._done = True
        head.version = parser.get_http_version()
        head.keep_alive = parser.should_keep_alive()
        head.upgrade = parser.should_upgrade()
        if isinstance(parser, httptools.HttpRequestParser):
            head.method = parser.get_method().decode("ascii", "replace")
        else:
            head.status = parser.get_status_code()
        tokens: set[bytes] = set()
        for name, value in head.headers:
            lower = name.lower()
            if lower == b"content-length":
                head.content_length = int(value)  # llhttp checked it: digits, one value
            elif lower == b"transfer-encoding":
                head.chunked = True  # llhttp refused a coding list that does not end in chunked
                head.other_coding = head.other_coding or value.strip().lower() != b"chunked"
            elif lower == b"host":
                head.hosts += 1
            elif lower == b"expect":
                head.expect = value.strip().lower()
            elif lower == b"connection":
                tokens.update(t.strip().lower() for t in value.split(b","))
        head.connection_tokens = frozenset(tokens)
        self.events.append(("head", head))

    def on_body(self, body: bytes) -> None:
        if body:  # httptools reports an empty piece when fed nothing; an empty chunk would end a chunked body
            self.events.append(("body", body))

    def on_message_complete(self) -> None:
        self.events.append(("end", None))


class MessageReader:
    """The messages arriving on one stream, parsed as they come; reads only when the queue
    is empty, so a client is never read further ahead than one read."""

    def __init__(self, reader: asyncio.StreamReader, *, response: bool = False) -> None:
        self._reader = reader
        self._sink = _Sink()
        self._parser = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(self._sink)
        self._sink.parser = self._parser
        self._response = response
        self._upgraded = False
        self.received = 0

    @property
    def pending(self) -> bool:
        """Parsed events are waiting (a pipelined request, or bytes past a response's end)."""
        return bool(self._sink.events)

    async def _fill(self, timeout: float) -> bool:
        """Read and parse once; False at EOF."""
        if self._upgraded:
            raise HttpError(501, "upgrade_refused", "protocol upgrades (WebSocket, h2c) are not proxied by http "
                            "listeners; use a tcp listener")
        async with asyncio.timeout(timeout):  # a timer, where wait_for would also make a task per read
            data = await self._reader.read(CHUNK)
        if not data:
            return False
        self.received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgraded = True  # the events before it stand; nothing after it is read
        except httptools.HttpParserCallbackError as err:
            if isinstance(err.__context__, _TooLarge):
                raise HttpError(431, "headers_too_large", f"the request head is above {MAX_HEADER_BYTES} bytes or "
                                f"{MAX_HEADERS} fields") from None
            raise HttpError(400, "bad_request", "the message could not be parsed") from None
        except httptools.HttpParserError as err:
            text = str(err)[:120] or type(err).__name__
            raise HttpError(400, "bad_request", f"malformed HTTP/1.1: {text}") from None
        return True

    async def head(self, timeout: float = KEEPALIVE_SECONDS) -> Head | None:
        """The next message's head; None when the stream ends cleanly before one begins."""
        events = self._sink.events
        while not events:
            if not await self._fill(timeout):
                if self._sink._done:
                    return None
                raise HttpError(400, "bad_request", "the connection ended inside a message head")
        kind, value = events.popleft()
        if kind != "head":  # cannot happen: a message's body and end follow its head
            raise HttpError(400, "bad_request", "a message without a head")
        assert isinstance(value, Head)
        if not self._response and value.content_length in (None, 0) and not value.chunked and events:
            events.popleft()  # a request without a body ends at its head: llhttp said so in the same feed
        return value

    async def body(self, timeout: float = READ_SECONDS) -> bytes | None:
        """The next piece of the current message's body; None at its end."""
        events = self._sink.events
        while not events:
            if not await self._fill(timeout):
                raise HttpError(400, "bad_request", "the connection ended inside a message body")
        kind, value = events[0]
        if kind == "body":
            events.popleft()
            assert isinstance(value, bytes)
            return value
        if kind == "end":
            events.popleft()
            return None
        raise HttpError(400, "bad_request", "a message head inside another's body")

    def finish_without_body(self) -> None:
        """The message ends at its head (the response to a HEAD request, whose Content-Length
        describes a body never sent): drop what the parser would wait for."""
        self._sink.events.clear()


def head_bytes(start: str, head: Head, extra: bytes = b"") -> bytearray:
    """A start line and the end-to-end fields of `head` (no hop-by-hop, no identity header a
    client sent), then `extra` (already CRLF-terminated fields), without the final CRLF."""
    out = bytearray(start.encode("latin-1"))
    out += b"\r\n"
    drop = head.connection_tokens
    for name, value in head.headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in drop or is_identity_header(lower):
            continue
        out += name + b": " + value + b"\r\n"
    out += extra
    return out


def _json_response(status: int, body: dict[str, str], *, close: bool) -> bytes:
    payload = json.dumps(body).encode()
    connection = "Connection: close\r\n" if close else ""
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nCache-Control: no-store\r\n{connection}\r\n").encode() + payload


_ID_PREFIX = os.urandom(4).hex()  # this process's, so IDs of two agents (or restarts) never meet
_ids = itertools.count(1)


def request_id() -> str:
    """A request's ID for its 403 and the log line: unique, not secret (a counter is cheaper
    than randomness per request)."""
    return f"{_ID_PREFIX}{next(_ids) & 0xFFFFFFFF:08x}"


@dataclass(slots=True)
class Upstream:
    """One connection to the backend (or, outbound, to the remote), reused between requests."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    created: float
    idle_since: float = 0.0
    reused: bool = False
    # Its responses' parser, kept from one response to the next (llhttp starts afresh after a
    # complete message); None after a response to HEAD, which leaves the parser inside a body.
    messages: MessageReader | None = None

    def usable(self, now: float) -> bool:
        return (not self.reader.at_eof() and not self.writer.is_closing() and now - self.created < POOL_MAX_AGE
                and now - self.idle_since < POOL_IDLE_SECONDS)

    def close(self) -> None:
        self.writer.close()


class UpstreamPool:
    """Kept-alive connections to one upstream address: a request takes an idle one (or dials),
    and gives it back only when its response ended cleanly and left nothing unread."""

    def __init__(self, dial: Callable[[], Awaitable[Streams]]) -> None:
        self._dial = dial
        self._idle: list[Upstream] = []

    async def get(self) -> Upstream:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now):
                conn.reused = True
                return conn
            conn.close()
        reader, writer = await self._dial()
        return Upstream(reader, writer, now)

    def put(self, conn: Upstream) -> None:
        conn.idle_since = time.monotonic()
        if len(self._idle) >= POOL_IDLE or not conn.usable(conn.idle_since):
            conn.close()
            return
        self._idle.append(conn)

    def clear(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


@dataclass(frozen=True, slots=True)
class Admission:
    """What the listener said about one request: its decision (None for a plaintext client of a
    permissive listener: no identity, nothing to decide), its route label, and the fields to add."""

    decision: Decision | None
    route: str
    extra_headers: bytes = b""


@dataclass(slots=True)
class Outcome:
    """One request's end, for flows and metrics."""

    admission: Admission
    status: int
    bytes_in: int
    bytes_out: int
    seconds: float
    request_id: str


class Exchange:
    """The per-listener parts of the request loop: how to decide, where to send, what to report."""

    normalize: bool = True  # inbound: the path is normalised, matched and forwarded normalised

    def admit(self, request: HttpRequest, request_id: str) -> Admission:
        raise NotImplementedError

    def refused_path(self, method: str, reason: str, request_id: str) -> Admission:
        raise NotImplementedError

    async def upstream(self) -> Upstream:
        raise NotImplementedError

    def release(self, conn: Upstream, reusable: bool) -> None:
        raise NotImplementedError

    def done(self, outcome: Outcome) -> None:
        raise NotImplementedError


def _check_request(head: Head, max_body: int) -> None:
    if head.method == "CONNECT" or head.upgrade:
        raise HttpError(501, "upgrade_refused", "CONNECT and protocol upgrades (WebSocket, h2c) are not proxied by "
                        "http listeners; use a tcp listener")
    if head.version == "1.1" and head.hosts != 1:
        raise HttpError(400, "bad_request", "an HTTP/1.1 request needs exactly one Host field")
    if head.hosts > 1:
        raise HttpError(400, "bad_request", "more than one Host field")
    if head.other_coding:
        raise HttpError(501, "bad_request", "only Transfer-Encoding: chunked is accepted")
    if head.content_length is not None and head.content_length > max_body:
        raise HttpError(413, "too_large", f"the body is above the listener's limit of {max_body} bytes")
    if head.expect is not None and head.expect != b"100-continue":
        raise HttpError(417, "bad_request", "the only expectation supported is 100-continue")


def _split_target(target: bytes) -> tuple[str, str]:
    """(path, "?query" or "") of an origin-form request-target."""
    text = target.decode("ascii")  # llhttp refuses anything else in a target
    if not text.startswith("/"):
        raise HttpError(400, "bad_request", "the request-target must be a path (origin-form), not an absolute URL "
                        "or *")
    path, mark, query = text.partition("?")
    return path, mark + query


async def serve_requests(client: Streams, exchange: Exchange, *, max_body: int = DEFAULT_MAX_BODY) -> None:
    """Answer one client connection's requests, one after another, until it closes, a request
    cannot be framed, or a response ends with the connection."""
    reader, writer = client
    messages = MessageReader(reader)
    while True:
        try:
            head = await messages.head()
        except (HttpError, asyncio.TimeoutError, ConnectionError, ssl.SSLError) as err:
            if isinstance(err, HttpError):
                await _answer(writer, err, request_id(), close=True)
            return
        if head is None:
            return
        started, rid = time.perf_counter(), request_id()
        try:
            keep = await _one_request(messages, head, writer, exchange, rid, started, max_body)
        except HttpError as err:
            await _answer(writer, err, rid, close=True)
            return
        except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            return
        if not keep:
            return


async def _answer(writer: asyncio.StreamWriter, err: HttpError, rid: str, *, close: bool) -> None:
    try:
        writer.write(_json_response(err.status, {"error": err.error, "reason": err.reason, "request_id": rid},
                                    close=close))
        await writer.drain()
    except (ConnectionError, ssl.SSLError, RuntimeError):
        pass


async def _discard_body(messages: MessageReader, head: Head) -> bool:
    """Read and drop a refused request's body; False when it is too large to be worth keeping
    the connection for (or the client waits for a 100 Continue it will not get)."""
    if head.content_length in (None, 0) and not head.chunked:
        return True
    if head.expect == b"100-continue":
        return False  # it may never send the body: close instead of waiting to find out
    if head.content_length is not None and head.content_length > DISCARD_LIMIT:
        return False
    dropped = 0
    while (piece := await messages.body()) is not None:
        dropped += len(piece)
        if dropped > DISCARD_LIMIT:
            return False
    return True


async def _one_request(messages: MessageReader, head: Head, writer: asyncio.StreamWriter, exchange: Exchange,
                       rid: str, started: float, max_body: int) -> bool:
    """Answer one request; True when the client connection may carry another."""
    _check_request(head, max_body)
    path, query = _split_target(head.target)
    if exchange.normalize:
        try:
            path = normalize_path(path)
        except AmbiguousPathError as err:
            admission = exchange.refused_path(head.method, err.reason, rid)
            keep = await _discard_body(messages, head) and head.keep_alive
            await _answer(writer, HttpError(400, "ambiguous_path", err.reason), rid, close=not keep)
            exchange.done(Outcome(admission, 400, 0, 0, time.perf_counter() - started, rid))
            return keep
    admission = exchange.admit(HttpRequest(head.method, path), rid)
    decision = admission.decision
    if decision is not None and not decision.allowed:
        keep = await _discard_body(messages, head) and head.keep_alive
        body = {"error": "denied", "rule": decision.rule, "reason": decision.reason, "request_id": rid}
        try:
            writer.write(_json_response(403, body, close=not keep))
            await writer.drain()
        finally:
            exchange.done(Outcome(admission, 403, 0, 0, time.perf_counter() - started, rid))
        return keep
    return await _forward(messages, head, path + query, writer, exchange, admission, rid, started, max_body)


async def _forward(messages: MessageReader, head: Head, target: str, writer: asyncio.StreamWriter,
                   exchange: Exchange, admission: Admission, rid: str, started: float, max_body: int) -> bool:
    """Send an allowed request to the upstream and relay its response; True when the client
    connection may carry another request."""
    has_body = head.chunked or bool(head.content_length)
    framing = (b"Transfer-Encoding: chunked\r\n" if head.chunked
               else f"Content-Length: {head.content_length}\r\n".encode() if head.content_length is not None else b"")
    request = head_bytes(f"{head.method} {target} HTTP/1.1", head, admission.extra_headers + framing)
    request += b"\r\n"
    status, sent, back = 502, 0, 0
    try:
        for attempt in (1, 2):
            conn = await exchange.upstream()  # HttpError (502, 503) when it cannot be reached
            reusable = False
            try:
                conn.writer.write(request)
                sent = len(request)
                if has_body:
                    if head.expect == b"100-continue" and head.version == "1.1":
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    sent += await _copy_body(messages, conn.writer, head.chunked, max_body)
                if conn.writer.transport.get_write_buffer_size():
                    await conn.writer.drain()  # only when the socket did not take it all at once
                status, back, keep, reusable = await _relay_response(conn, head, writer)
                return keep and head.keep_alive
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as err:
                # Nothing reached the client yet (the relay handles failures after its first
                # byte). A reused connection the backend had closed meanwhile gets one fresh try
                # when nothing of the request is lost with it.
                if attempt == 1 and conn.reused and not has_body:
                    continue
                raise HttpError(502, "upstream_failed", f"the service failed: {type(err).__name__}") from None
            except asyncio.TimeoutError:
                raise HttpError(504, "upstream_timeout", "the service did not answer in time") from None
            finally:
                exchange.release(conn, reusable)
        return False
    except HttpError as err:
        status = err.status
        raise
    finally:
        exchange.done(Outcome(admission, status, sent, back, time.perf_counter() - started, rid))


async def _copy_body(messages: MessageReader, upstream: asyncio.StreamWriter, chunked: bool, max_body: int) -> int:
    total = 0
    while (piece := await messages.body()) is not None:
        total += len(piece)
        if total > max_body:
            raise HttpError(413, "too_large", f"the body is above the listener's limit of {max_body} bytes")
        if chunked:
            upstream.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
        else:
            upstream.write(piece)
        if upstream.transport.get_write_buffer_size() > CHUNK:
            await upstream.drain()
    if chunked:
        upstream.write(b"0\r\n\r\n")
    return total


async def _relay_response(conn: Upstream, request: Head, writer: asyncio.StreamWriter) -> tuple[int, int, bool, bool]:
    """Relay the backend's response; (status, bytes, client connection may go on, upstream
    connection reusable)."""
    messages = conn.messages or MessageReader(conn.reader, response=True)
    conn.messages = messages
    before = messages.received
    while True:
        try:
            head = await messages.head(UPSTREAM_SECONDS)
        except HttpError as err:
            raise HttpError(502, "upstream_failed", f"the service's response: {err.reason}") from None
        if head is None:
            raise ConnectionResetError("the service closed the connection without a response")
        if 100 <= head.status < 200:
            if head.status == 101:
                raise HttpError(502, "upstream_failed", "the service switched protocols, which was not asked for")
            while await messages.body() is not None:  # an interim response (103 Early Hints): not passed on
                pass
            continue
        break
    no_body = request.method == "HEAD" or head.status in (204, 304)
    client_11 = request.version == "1.1"
    if no_body:
        messages.finish_without_body()
        conn.messages = None
        framing, until_close, rechunk = (f"Content-Length: {head.content_length}\r\n".encode()
                                         if head.content_length is not None else b""), False, False
    elif head.content_length is not None:
        framing, until_close, rechunk = f"Content-Length: {head.content_length}\r\n".encode(), False, False
    elif head.chunked and client_11:
        framing, until_close, rechunk = b"Transfer-Encoding: chunked\r\n", False, True
    else:
        framing, until_close, rechunk = b"", True, False  # the body ends with the connection
    close = until_close or not request.keep_alive
    if close:
        framing += b"Connection: close\r\n"
    elif not client_11:
        framing += b"Connection: keep-alive\r\n"
    reason = head.reason.decode("latin-1") or REASONS.get(head.status, "Status")
    out = _Out(writer, head_bytes(f"HTTP/1.1 {head.status} {reason}", head, framing))
    out.buffer += b"\r\n"
    try:
        if not no_body:
            await _relay_body(messages, head, out, rechunk)
        await out.flush()
    except (HttpError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.TimeoutError):
        if not out.flushed:
            raise HttpError(502, "upstream_failed", "the service's response broke off") from None
        return head.status, messages.received - before, False, False  # cut short: the client sees its end
    reusable = head.keep_alive and not until_close and not messages.pending
    return head.status, messages.received - before, not close, reusable


class _Out:
    """A response on its way to the client, written when more must be waited for (or past
    CHUNK): a small response leaves in one write, one TLS record, instead of head and body apart."""

    __slots__ = ("writer", "buffer", "flushed")

    def __init__(self, writer: asyncio.StreamWriter, buffer: bytearray) -> None:
        self.writer, self.buffer, self.flushed = writer, buffer, False

    async def flush(self, *, drain: bool = False) -> None:
        if self.buffer:
            self.writer.write(self.buffer)
            self.buffer = bytearray()
            self.flushed = True
        if drain or self.writer.transport.get_write_buffer_size() > CHUNK:
            await self.writer.drain()


async def _relay_body(messages: MessageReader, head: Head, out: _Out, rechunk: bool) -> None:
    while True:
        if not messages.pending or len(out.buffer) > CHUNK:
            await out.flush()  # about to wait for the service: what it sent so far goes on now
        try:
            piece = await messages.body(UPSTREAM_SECONDS)
        except HttpError:
            if head.content_length is None and not head.chunked:
                break  # a body delimited by the connection's end
            raise
        if piece is None:
            break
        out.buffer += b"%x\r\n" % len(piece) + piece + b"\r\n" if rechunk else piece
    if rechunk:
        out.buffer += b"0\r\n\r\n"
