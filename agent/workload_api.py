"""The SPIFFE Workload API on a unix socket, wire-compatible with the standard.

It runs on grpclib because a grpclib handler can reach the asyncio transport of its
connection, and so the socket, whose SO_PEERCRED tells who the caller is; grpcio gives a
handler no such access. Semantics follow the standard (SPIFFE_Workload_API.md):

- a request without the ``workload.spiffe.io: true`` header is INVALID_ARGUMENT;
- a caller that cannot be attested gets UNAVAILABLE (clients retry), one that matches no
  entry PERMISSION_DENIED;
- a stream sends its first message at once (or, when the caller matches entries whose
  SVIDs are still being signed, as soon as they are: waiting, not denying), then a
  complete snapshot after every change that alters the answer (what is absent is
  withdrawn), and never ends with OK: standard clients stop watching on a clean end. A
  caller whose last entry is deleted gets PERMISSION_DENIED on its open stream;
- JWT-SVIDs carry every requested audience; JWT bundles hold only keys with a ``kid``.

A slow reader never holds others up and never makes us buffer: a stream builds the
latest snapshot only when its previous one has been handed to the transport (grpclib
waits for HTTP/2 flow control and for the transport to drain), so at most one snapshot
per stream is ever pending and intermediate versions are skipped.

The socket is made connectable by every local user (mode 0777, as SPIRE does): the
caller's identity comes from the kernel, not from who could open the socket. Operators
who want fewer callers restrict the directory that holds it.

A caller is attested once, when its connection is accepted, and each request is checked to
come from that very process, alone on the connection and running the same program
(trustmesh.agent.caller_binding). Any local user can connect, so nothing a caller sends is
buffered before it is bounded (`LocalCallers`): requests of at most MAX_REQUEST_BYTES,
refused from the 5-byte gRPC length prefix before the body is read (HTTP/2 flow control
keeps the rest with the client), small HTTP/2 windows, at most MAX_STREAMS_PER_CONNECTION
streams per connection and MAX_CONNECTIONS_PER_UID connections per uid, and a connection
that sends no whole request within IDLE_SECONDS is closed. Refusals are counted and logged at most
once a minute per uid and reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from google.protobuf import struct_pb2
from google.protobuf.message import Message
from grpclib._typing import IServable
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream
from h2.settings import SettingCodes

from trustmesh._proto.spiffe.workload import workload_pb2
from trustmesh._proto.spiffe.workload.workload_grpc import SpiffeWorkloadAPIBase
from trustmesh.agent.caller_binding import BoundCaller, CallerBinder, CallerChangedError
from trustmesh.agent.identity import IdentitySource, NoIdentityError, WorkloadX509Svid
from trustmesh.agent.localpeer import UnixSocket
from trustmesh.agent.workload_attestor import WorkloadAttestationError, WorkloadAttestor, peer_credentials
from trustmesh.bundle import Bundle, BundleSet
from trustmesh.clock import Clock, utc_now
from trustmesh.errors import InvalidSpiffeIdError, TrustmeshError, VerificationError
from trustmesh.files import SocketPathError, claim_socket_path
from trustmesh.jwtsvid import validate_jwt_svid
from trustmesh.keys import private_key_to_pkcs8_der
from trustmesh.logs import RateLimitedLog, log_event
from trustmesh.metrics import Registry
from trustmesh.selectors import value_of
from trustmesh.spiffeid import SpiffeId

log = logging.getLogger("trustmesh.workload_api")

HEADER = "workload.spiffe.io"
MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 256
MAX_TOKEN_LENGTH = 16 * 1024
SOCKET_MODE = 0o777
SHUTDOWN_GRACE = 2.0  # seconds for open streams to take their UNAVAILABLE before they are cut
# Bounds for callers any local user can be (see the module docstring). Requests are a few
# hundred bytes (a JWT-SVID to validate is at most MAX_TOKEN_LENGTH).
MAX_REQUEST_BYTES = 64 * 1024
MAX_CONNECTIONS_PER_UID = 128
MAX_STREAMS_PER_CONNECTION = 16
IDLE_SECONDS = 10.0
_WINDOW = 65_535  # the smallest HTTP/2 window: what a caller may send before we read it
# Flow control covers DATA only. A header block may span any number of CONTINUATION frames,
# which the HTTP/2 library buffers whole (up to 64 frames of 16 KiB per connection); and a
# caller that never reads lets our answers (PING and SETTINGS acks included) pile up.
MAX_HEADER_BLOCK_BYTES = 16 * 1024
MAX_UNREAD_BYTES = 1 << 20
_REFUSAL_LOG_SECONDS = 60.0

_M = TypeVar("_M", bound=Message)


class WorkloadApiError(TrustmeshError):
    """The Workload API server cannot start (its socket path is taken or unusable)."""


class Binder(Protocol):
    """Who is calling, from the kernel: attested once per connection, checked per request."""

    async def bind(self, sock: UnixSocket) -> BoundCaller: ...

    async def check(self, bound: BoundCaller, sock: UnixSocket) -> list[str]: ...


def _transport(stream: Stream[Any, Any]) -> Any:
    # grpclib has no public accessor for a call's connection; its Peer wraps the asyncio
    # transport, which is also what our protocol registered the connection under.
    return stream.peer._transport  # noqa: SLF001


class _Connection:
    """One accepted connection: its caller's uid and the attestation started at accept."""

    def __init__(self, sock: UnixSocket, uid: int, pid: int, bound: asyncio.Future[BoundCaller]) -> None:
        self.sock = sock
        self.uid = uid
        self.pid = pid
        self.bound = bound
        self.idle: asyncio.TimerHandle | None = None


RefusalReport = Callable[[str, str, str, str], None]  # (kind, subject, peer, reason)


class LocalCallers:
    """The connections of the agent's socket: admitted per uid, attested at accept, checked
    per request. Shared by every service on the socket (Workload API, Authorize)."""

    def __init__(self, binder: Binder, metrics: Registry, *, max_per_uid: int = MAX_CONNECTIONS_PER_UID,
                 idle_seconds: float = IDLE_SECONDS, report: RefusalReport | None = None) -> None:
        self._binder = binder
        self._report = report
        self._max_per_uid = max_per_uid
        self._idle_seconds = idle_seconds
        self._by_transport: dict[Any, _Connection] = {}
        self._per_uid: dict[int, int] = {}
        self._open = metrics.gauge("trustmesh_workload_api_connections", "open connections to the agent's socket")
        self._refused = metrics.counter("trustmesh_workload_api_refused_total",
                                        "connections and requests refused to protect the agent, by reason",
                                        ["reason"])
        self._attest_failures = metrics.counter("trustmesh_workload_api_attestation_failures_total",
                                                "Workload API callers that could not be attested")
        self._log = RateLimitedLog(log, _REFUSAL_LOG_SECONDS)

    def refused(self, reason: str, uid: int | str, pid: int | str = "?", **fields: Any) -> None:
        self._refused.inc(reason=reason)
        self._log.log((reason, uid), "workload_api_refused", reason=reason, uid=uid, pid=pid, **fields)
        if self._report is not None and reason != "idle":
            # To the control plane's aggregated audit (FlowReporter.refused): who, from where.
            self._report("workload_api", "workload-api", f"uid={uid} pid={pid}", reason)

    def opened(self, transport: Any) -> bool:
        """Admit a new connection (False: close it) and start attesting its caller."""
        sock = transport.get_extra_info("socket")
        try:
            creds = peer_credentials(sock)
        except WorkloadAttestationError as err:
            self.refused("no_credentials", "?", error=str(err))
            return False
        if self._per_uid.get(creds.uid, 0) >= self._max_per_uid:
            self.refused("too_many_connections", creds.uid, creds.pid, limit=self._max_per_uid)
            return False
        self._per_uid[creds.uid] = self._per_uid.get(creds.uid, 0) + 1
        bound = asyncio.ensure_future(self._binder.bind(sock))
        bound.add_done_callback(_retrieve)
        connection = _Connection(sock, creds.uid, creds.pid, bound)
        connection.idle = asyncio.get_running_loop().call_later(self._idle_seconds, self._idle, transport)
        self._by_transport[transport] = connection
        self._open.inc()
        return True

    def request_received(self, transport: Any) -> None:
        """The connection sent a whole request: it is a caller, not a squatter."""
        connection = self._by_transport.get(transport)
        if connection is not None and connection.idle is not None:
            connection.idle.cancel()
            connection.idle = None

    def _idle(self, transport: Any) -> None:
        connection = self._by_transport.get(transport)
        if connection is not None:
            self.refused("idle", connection.uid, connection.pid, seconds=self._idle_seconds)
            transport.close()

    def closed(self, transport: Any) -> None:
        connection = self._by_transport.pop(transport, None)
        if connection is None:
            return
        self._open.dec()
        left = self._per_uid.get(connection.uid, 1) - 1
        if left:
            self._per_uid[connection.uid] = left
        else:
            self._per_uid.pop(connection.uid, None)
        if connection.idle is not None:
            connection.idle.cancel()
        if connection.bound.done():
            if not connection.bound.cancelled() and connection.bound.exception() is None:
                connection.bound.result().close()
        else:
            connection.bound.add_done_callback(_close_bound)
            connection.bound.cancel()

    def refused_transport(self, transport: Any, reason: str, **fields: Any) -> None:
        connection = self._by_transport.get(transport)
        uid, pid = (connection.uid, connection.pid) if connection else ("?", "?")
        self.refused(reason, uid, pid, **fields)

    async def receive(self, stream: Stream[Any, Any], method: str) -> Message | None:
        """The call's request (`recv_bounded`), a refusal counted against its caller."""
        try:
            message = await recv_bounded(stream)
        except GRPCError as err:
            if err.status == Status.RESOURCE_EXHAUSTED:
                self.refused_transport(_transport(stream), "request_too_large", method=method, error=err.message)
            raise
        self.request_received(_transport(stream))
        return message

    async def selectors(self, stream: Stream[Any, Any], method: str) -> list[str]:
        """The caller's selectors for one request, or the standard's refusal: UNAVAILABLE when
        it cannot be attested (clients retry), PERMISSION_DENIED when the connection is no
        longer only the attested process's."""
        connection = self._by_transport.get(_transport(stream))
        try:
            if connection is None:
                raise WorkloadAttestationError("the connection is not known to the agent")
            bound = await asyncio.shield(connection.bound)
            return await self._binder.check(bound, connection.sock)
        except WorkloadAttestationError as err:
            self._attest_failures.inc()
            log_event(log, "workload_attestation_failed", level=logging.WARNING, method=method, error=str(err))
            raise GRPCError(Status.UNAVAILABLE, f"could not attest the caller: {err}") from err
        except CallerChangedError as err:
            self.refused("caller_changed", connection.uid if connection else "?",
                         connection.pid if connection else "?", method=method, error=str(err))
            raise GRPCError(Status.PERMISSION_DENIED, str(err)) from err


def _retrieve(future: asyncio.Future[BoundCaller]) -> None:
    if not future.cancelled():
        future.exception()  # a failure is reported to the request that awaits it, never "never retrieved"


def _close_bound(future: asyncio.Future[BoundCaller]) -> None:
    # An attestation that finished while its connection was closing: release its pidfd.
    if not future.cancelled() and future.exception() is None:
        future.result().close()


async def recv_bounded(stream: Stream[Any, Any], limit: int = MAX_REQUEST_BYTES) -> Message | None:
    """The next request message, refused with RESOURCE_EXHAUSTED from its 5-byte gRPC prefix
    when longer than `limit`, before any of its body is read (grpclib's own recv_message reads
    the whole announced length, acknowledging it to the sender as it goes)."""
    h2_stream = stream._stream  # noqa: SLF001 - grpclib reads messages through this alone
    prefix = await h2_stream.recv_data(5)
    if not prefix:
        return None
    if prefix[0]:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed requests are not supported; send them uncompressed")
    length = int.from_bytes(prefix[1:5], "big")
    if length > limit:
        raise GRPCError(Status.RESOURCE_EXHAUSTED, f"the request is {length} bytes; at most {limit} are accepted")
    body = await h2_stream.recv_data(length)
    message: Message = stream._codec.decode(body, stream._recv_type)  # noqa: SLF001
    return message


# --- snapshots: pure functions from what the source holds to the standard's messages -----


def _own_and_federated(svids: list[WorkloadX509Svid], bundles: BundleSet, own: Bundle | None) -> dict[str, bytes]:
    federated: dict[str, bytes] = {}
    for item in svids:
        for td in item.federates_with:
            bundle = bundles.get(td)
            if bundle is not None and bundle.x509_authorities and (own is None or td != own.trust_domain):
                federated[str(td.id)] = bundle.x509_authorities_der()
    return federated


def x509_svid_response(svids: list[WorkloadX509Svid], bundles: BundleSet,
                       own: Bundle | None) -> workload_pb2.X509SVIDResponse | None:
    """None while nothing can be sent yet (no SVID signed, or our own roots unknown)."""
    # An SVID without its key cannot be used by the workload; it is not ready.
    ready = [item for item in svids if item.svid.private_key is not None]
    if not ready or own is None or not own.x509_authorities:
        return None
    own_der = own.x509_authorities_der()
    return workload_pb2.X509SVIDResponse(
        svids=[workload_pb2.X509SVID(
            spiffe_id=str(item.svid.spiffe_id),
            x509_svid=item.svid.chain_der(),
            x509_svid_key=private_key_to_pkcs8_der(item.svid.private_key),  # type: ignore[arg-type]
            bundle=own_der,
            hint=item.hint,
        ) for item in ready],
        federated_bundles=_own_and_federated(ready, bundles, own),
    )


def x509_bundles_response(bundles: BundleSet) -> workload_pb2.X509BundlesResponse | None:
    table = {str(td.id): b.x509_authorities_der() for td, b in bundles.items() if b.x509_authorities}
    return workload_pb2.X509BundlesResponse(bundles=table) if table else None


def jwt_bundles_response(bundles: BundleSet) -> workload_pb2.JWTBundlesResponse | None:
    # Only the JWT authorities, each with its kid (Bundle requires one). The X.509 roots
    # would appear in a full SPIFFE bundle as keys without a kid, which clients reject.
    table = {str(td.id): Bundle(td, (), b.jwt_authorities).to_jwks()
             for td, b in bundles.items() if b.jwt_authorities}
    return workload_pb2.JWTBundlesResponse(bundles=table) if table else None


class WorkloadAPI(SpiffeWorkloadAPIBase):
    """The five Workload API methods over an IdentitySource, for any caller the attestor names."""

    def __init__(self, source: IdentitySource, attestor: WorkloadAttestor | Binder, metrics: Registry,
                 clock: Clock = utc_now, sync_timeout: float = 30.0, report: RefusalReport | None = None,
                 idle_seconds: float = IDLE_SECONDS) -> None:
        self._source = source
        binder = CallerBinder(attestor) if isinstance(attestor, WorkloadAttestor) else attestor
        self.callers = LocalCallers(binder, metrics, report=report, idle_seconds=idle_seconds)
        self._clock = clock
        self._sync_timeout = sync_timeout
        self._streams = metrics.gauge("trustmesh_workload_api_streams", "open Workload API streams", ["method"])
        self._calls = metrics.counter("trustmesh_workload_api_calls_total",
                                      "Workload API calls by method and final gRPC code", ["method", "code"])
        self._sent = metrics.counter("trustmesh_workload_api_messages_sent_total",
                                     "snapshots sent on Workload API streams", ["method"])
        # X509-SVID snapshots built at the current source version, by the entries they hold:
        # a hundred callers of one workload share one build (and one key encoding).
        self._x509_built: dict[tuple[str, ...], workload_pb2.X509SVIDResponse | None] = {}
        self._x509_built_version = -1
        self._closing = asyncio.Event()
        self._open = 0
        self._drained = asyncio.Event()
        self._drained.set()

    async def shut_down(self, grace: float = SHUTDOWN_GRACE) -> None:
        """End every open stream with UNAVAILABLE (clients reconnect, as the standard wants
        of a server going away) and wait up to `grace` seconds for them to go."""
        self._closing.set()
        try:
            async with asyncio.timeout(grace):
                await self._drained.wait()
        except TimeoutError:
            pass  # a reader that never reads cannot take its status; the server cuts it

    # --- the edge: metadata, attestation, one mapping of outcomes to codes -------------------

    @asynccontextmanager
    async def _call(self, method: str) -> AsyncIterator[None]:
        code = "UNKNOWN"  # a bug escaping a handler; grpclib answers UNKNOWN and logs it
        try:
            yield
            code = "OK"
        except GRPCError as err:
            code = err.status.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"  # the caller hung up, or the server is closing
            raise
        finally:
            self._calls.inc(method=method, code=code)

    async def _request(self, stream: Stream[Any, Any], method: str) -> tuple[Message, list[str]]:
        """The request and the caller's selectors, or the standard's refusal."""
        if stream.metadata is None or stream.metadata.get(HEADER) != "true":
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"security header missing from request: send metadata '{HEADER}: true'")
        request = await self.callers.receive(stream, method)
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "the request message is missing")
        return request, await self.callers.selectors(stream, method)

    async def _synced(self) -> None:
        try:
            async with asyncio.timeout(self._sync_timeout):
                await self._source.wait_until_synced()
        except TimeoutError as err:
            raise GRPCError(Status.UNAVAILABLE, "the agent has not received its entries yet; try again") from err

    def _deny(self, method: str, selectors: Collection[str]) -> GRPCError:
        log_event(log, "workload_denied", method=method,
                  uid=value_of(selectors, "unix:uid") or "?")
        return GRPCError(Status.PERMISSION_DENIED, "no identity issued")

    async def _watch(self, stream: Stream[Any, Any], method: str, selectors: list[str],
                     build: Callable[[], _M | None]) -> None:
        """Send `build()` now and after every change that alters it; never return."""
        await self._synced()
        self._streams.inc(method=method)
        self._open += 1
        self._drained.clear()
        try:
            last: _M | None = None
            version = self._source.version  # read before building: a change meanwhile wakes us
            while not self._closing.is_set():
                if not self._source.entries_match(selectors):
                    raise self._deny(method, selectors)
                message = build()
                if message is not None and message != last:
                    # Blocks while the reader is slow; changes meanwhile coalesce into the
                    # next build, so nothing queues up behind it.
                    await stream.send_message(message)
                    self._sent.inc(method=method)
                    last = message
                version = await self._next_version(version)
            raise GRPCError(Status.UNAVAILABLE, "the agent is shutting down; reconnect")
        finally:
            self._streams.dec(method=method)
            self._open -= 1
            if not self._open:
                self._drained.set()

    async def _next_version(self, version: int) -> int:
        """The next version, or `version` itself once the server is shutting down."""
        change = asyncio.ensure_future(self._source.wait_for_change(version))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((change, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Both are ours alone and end here: no task outlives the call (cancelled: the
            # caller hung up; or done: the other one won).
            change.cancel()
            closing.cancel()
        return change.result() if change.done() and not change.cancelled() else version

    # --- X.509 -------------------------------------------------------------------------------

    def _x509_snapshot(self, selectors: list[str]) -> workload_pb2.X509SVIDResponse | None:
        # Which SVIDs a caller gets is decided afresh every time (expiry included); only the
        # message for that set is reused while the source's version (SVIDs, bundles) holds.
        version = self._source.version
        svids = self._source.x509_svids_for(selectors)
        if version != self._x509_built_version:
            self._x509_built.clear()
            self._x509_built_version = version
        key = tuple(item.entry_id for item in svids)
        if key in self._x509_built:
            return self._x509_built[key]
        bundles = self._source.bundles()
        message = x509_svid_response(svids, bundles, bundles.get(self._source.trust_domain))
        if len(self._x509_built) >= 1024:
            self._x509_built.clear()
        self._x509_built[key] = message
        return message

    async def FetchX509SVID(self, stream: Stream[Any, Any]) -> None:
        async with self._call("FetchX509SVID"):
            _, selectors = await self._request(stream, "FetchX509SVID")
            await self._watch(stream, "FetchX509SVID", selectors, lambda: self._x509_snapshot(selectors))

    async def FetchX509Bundles(self, stream: Stream[Any, Any]) -> None:
        async with self._call("FetchX509Bundles"):
            _, selectors = await self._request(stream, "FetchX509Bundles")
            await self._watch(stream, "FetchX509Bundles", selectors,
                              lambda: x509_bundles_response(self._source.bundles()))

    # --- JWT ---------------------------------------------------------------------------------

    async def FetchJWTSVID(self, stream: Stream[Any, Any]) -> None:
        async with self._call("FetchJWTSVID"):
            request, selectors = await self._request(stream, "FetchJWTSVID")
            assert isinstance(request, workload_pb2.JWTSVIDRequest)
            audiences = list(dict.fromkeys(request.audience))  # keep order, drop repeats
            if not audiences:
                raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
            if len(audiences) > MAX_AUDIENCES or any(not a or len(a) > MAX_AUDIENCE_LENGTH for a in audiences):
                raise GRPCError(Status.INVALID_ARGUMENT, f"give 1 to {MAX_AUDIENCES} audiences of 1 to "
                                                         f"{MAX_AUDIENCE_LENGTH} characters")
            wanted: str | None = None
            if request.spiffe_id:
                try:
                    wanted = str(SpiffeId.parse(request.spiffe_id))
                except InvalidSpiffeIdError as err:
                    raise GRPCError(Status.INVALID_ARGUMENT, str(err)) from err
            await self._synced()
            try:
                svids = await self._source.jwt_svids_for(selectors, audiences, wanted)
            except NoIdentityError:
                raise self._deny("FetchJWTSVID", selectors) from None
            except TrustmeshError as err:
                # The source's own refusal to sign now (the control plane is unreachable, say):
                # the caller is entitled and should retry. Bugs are not TrustmeshErrors and
                # still surface as UNKNOWN.
                raise GRPCError(Status.UNAVAILABLE, f"cannot issue a JWT-SVID now: {err}") from err
            if not svids:
                raise self._deny("FetchJWTSVID", selectors)
            await stream.send_message(workload_pb2.JWTSVIDResponse(
                svids=[workload_pb2.JWTSVID(spiffe_id=s.spiffe_id, svid=s.token, hint=s.hint) for s in svids]))

    async def FetchJWTBundles(self, stream: Stream[Any, Any]) -> None:
        async with self._call("FetchJWTBundles"):
            _, selectors = await self._request(stream, "FetchJWTBundles")
            await self._watch(stream, "FetchJWTBundles", selectors,
                              lambda: jwt_bundles_response(self._source.bundles()))

    async def ValidateJWTSVID(self, stream: Stream[Any, Any]) -> None:
        async with self._call("ValidateJWTSVID"):
            # Attested like every call, but not entitlement-checked: validating a token
            # against public keys reveals nothing a caller could not compute itself.
            request, _ = await self._request(stream, "ValidateJWTSVID")
            assert isinstance(request, workload_pb2.ValidateJWTSVIDRequest)
            if not request.audience:
                raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
            if not request.svid:
                raise GRPCError(Status.INVALID_ARGUMENT, "svid must be specified")
            if len(request.svid) > MAX_TOKEN_LENGTH:
                raise GRPCError(Status.INVALID_ARGUMENT, f"svid is longer than {MAX_TOKEN_LENGTH} characters")
            try:
                svid = validate_jwt_svid(request.svid, audience=request.audience,
                                         jwt_authorities=self._source.bundles().jwt_authorities(),
                                         now=self._clock())
            except VerificationError as err:
                raise GRPCError(Status.INVALID_ARGUMENT, f"the JWT-SVID is not valid: {err}") from err
            claims = struct_pb2.Struct()
            claims.update(dict(svid.claims))
            await stream.send_message(
                workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims))


class _HeaderBudget:
    """Follows the HTTP/2 frame boundaries of what a caller sends, to refuse a header block
    (HEADERS and its CONTINUATION frames) larger than MAX_HEADER_BLOCK_BYTES before the HTTP/2
    library buffers it."""

    _PREFACE = 24  # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self) -> None:
        self._skip = self._PREFACE  # bytes of the current payload (or the preface) still to pass
        self._head = b""  # a frame header split across reads
        self._block = 0  # bytes of the header block being received

    def feed(self, data: bytes) -> bool:
        """False once a header block grows past the budget."""
        view = memoryview(data)
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            need = 9 - len(self._head)
            self._head += bytes(view[:need])
            view = view[need:]
            if len(self._head) < 9:
                break
            length = int.from_bytes(self._head[:3], "big")
            kind, flags = self._head[3], self._head[4]
            self._head = b""
            self._skip = length
            if kind in (0x1, 0x9):  # HEADERS, CONTINUATION
                self._block += length
                if self._block > MAX_HEADER_BLOCK_BYTES:
                    return False
                if flags & 0x4:  # END_HEADERS
                    self._block = 0
        return True


class _Protocol(H2Protocol):
    """grpclib's connection, admitted and tracked by LocalCallers, with at most
    MAX_STREAMS_PER_CONNECTION concurrent streams."""

    callers: LocalCallers
    admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.callers.opened(transport):
            cast(asyncio.Transport, transport).abort()
            return
        self.admitted = True
        super().connection_made(transport)
        h2 = self.connection._connection  # noqa: SLF001 - settings live on the h2 connection
        h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS_PER_CONNECTION})
        self.connection.flush()
        self._transport = transport
        self._headers = _HeaderBudget()

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        if not self._headers.feed(data):
            self.callers.refused_transport(self._transport, "headers_too_large", limit=MAX_HEADER_BLOCK_BYTES)
            cast(asyncio.Transport, self._transport).abort()
            return
        if cast(asyncio.WriteTransport, self._transport).get_write_buffer_size() > MAX_UNREAD_BYTES:
            self.callers.refused_transport(self._transport, "not_reading", limit=MAX_UNREAD_BYTES)
            cast(asyncio.Transport, self._transport).abort()
            return
        super().data_received(data)

    def pause_writing(self) -> None:
        if self.admitted:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.admitted:
            self.callers.closed(self._transport)
            super().connection_lost(exc)


class _Server(Server):
    """grpclib's Server with our protocol and small HTTP/2 windows, remembering its
    connections so that closing can close them (grpclib cancels the calls but leaves idle
    connections open, and Python 3.12's wait_closed waits for every connection)."""

    def __init__(self, handlers: list[IServable], callers: LocalCallers) -> None:
        super().__init__(handlers, config=Configuration(http2_connection_window_size=4 * _WINDOW,
                                                        http2_stream_window_size=_WINDOW))
        self._callers = callers
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        plain = super()._protocol_factory()
        protocol = _Protocol(plain.handler, plain.config, plain.h2_config)
        protocol.callers = self._callers
        self._protocols.add(protocol)
        return protocol

    def close_connections(self) -> None:
        for protocol in list(self._protocols):
            connection = getattr(protocol, "connection", None)  # absent before connection_made
            if connection is not None:
                connection.close()


class WorkloadAPIServer:
    """Owns the grpclib server and its socket file: `start()`/`close()`, or `serve()` until
    cancelled. Extra servicers (the agent's Authorize call) share the socket."""

    def __init__(self, socket_path: Path, api: WorkloadAPI, *extra: IServable) -> None:
        self.socket_path = Path(socket_path)
        self._api = api
        self._handlers: list[IServable] = [api, *extra]
        self._server: _Server | None = None
        self._closed = False

    async def start(self) -> None:
        if self._server is not None or self._closed:
            # Closing shut the API's streams down for good; build a new one to serve again.
            raise WorkloadApiError("a Workload API server starts once")
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            await claim_socket_path(path, "another --socket")
        except SocketPathError as err:
            raise WorkloadApiError(str(err)) from err
        server = _Server(self._handlers, self._api.callers)
        try:
            await server.start(path=str(path))
        except OSError as err:
            raise WorkloadApiError(f"cannot listen on {path}: {err.strerror}") from err
        self._server = server
        os.chmod(path, SOCKET_MODE)  # see the module docstring: who may connect is not who is served

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._closed = True
        await self._api.shut_down()
        server.close()  # stops accepting and cancels every call still running
        server.close_connections()
        await server.wait_closed()
        self.socket_path.unlink(missing_ok=True)

    async def serve(self) -> None:
        """Serve until cancelled; the socket file is removed on the way out."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()
