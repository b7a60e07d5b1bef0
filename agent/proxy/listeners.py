"""Inbound and outbound mTLS listeners that enforce the allowlist.

Inbound: accept plain TCP, run the TLS handshake ourselves (so a refused handshake is seen:
no client certificate, unknown CA, expired: classified, counted, logged rate-limited per
source address and reason, and reported), terminate mTLS with the service's own SVID, verify
the client's chain against its own trust domain's bundle, decide with the policy, and only
then forward bytes to the local service. Denied connections are closed right after the
handshake and reported. Open connections are re-checked whenever the policy changes (and
every second, so time-bound access lapses by itself); those no longer allowed, or whose
client presented a certificate revoked since, are closed. Quarantine (an ID in the policy's
`quarantined`) is part of the decision: a quarantined source or service is refused and cut,
and when this agent's own ID is there (its node is in quarantine) every listener refuses and
cuts everything, plaintext clients of a permissive listener included. Every forwarded
connection is metered: its bytes each way are reported under its decision's flow key when it
closes, and every TRAFFIC_SECONDS while it stays open (deltas, so nothing is counted twice).

A permissive inbound listener (`mtls: permissive`, for a migration) peeks at each client's
first byte without consuming it: a TLS handshake record goes the way above; anything else, or
silence for PEEK_SECONDS, is a plaintext client, forwarded as it is with no identity and no
policy decision, and reported as an `unverified` flow with its host address and its bytes.

Outbound: accept plaintext from a local process, on loopback TCP or on a unix socket
(`listen: unix:/path`), and first find out who it is (trustmesh.agent.localpeer): every
process holding the client's end of the connection must match the selectors of a
registration entry of the service's SPIFFE ID on this node, i.e. must be a process the
Workload API would hand that very SVID to. Several holders (a caller that forked) must all
match; a caller that cannot be tied to a process is refused. A refused caller is closed
before anything is dialled, so not a byte of it leaves the node; the refusal is counted,
logged (rate-limited, with uid and pid) and reported. Admitted callers are dialled to the
remote with the service's SVID, and a server whose SPIFFE ID is not the expected one is refused.
Nothing is dialled while the service, the destination or this node is in quarantine, and open
connections are cut when one of them is put there.

A rotated SVID is used for the next handshake at once (each handshake takes the current
context); open connections are not dropped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trustmesh.agent.identity import WorkloadX509Svid
from trustmesh.agent.localpeer import LocalPeer, LocalPeerError, PeerResolver, PinnedHolder, UnixSocket
from trustmesh.agent.proxy.http import (
    DEFAULT_MAX_BODY,
    Admission,
    Exchange,
    HttpError,
    Outcome,
    Upstream,
    UpstreamPool,
    identity_headers,
    serve_requests,
)
from trustmesh.agent.proxy.reporter import FlowKey, kind_of
from trustmesh.agent.proxy.tls import (
    CertificateRevokedError,
    chain_serials,
    client_context,
    handshake_failure,
    server_context,
    verify_peer,
)
from trustmesh.agent.workload_attestor import WorkloadAttestationError, WorkloadAttestor
from trustmesh.bundle import BundleSet
from trustmesh.clock import Clock, utc_now
from trustmesh.errors import TrustmeshError, VerificationError
from trustmesh.files import SocketPathError, claim_socket_path
from trustmesh.hostport import join_host_port, split_host_port
from trustmesh.logs import RateLimitedLog, log_event
from trustmesh.metrics import Registry
from trustmesh.policy import Decision, HttpRequest, Policy, route_label
from trustmesh.selectors import value_of
from trustmesh.spiffeid import SpiffeId
from trustmesh.x509svid import X509Svid

log = logging.getLogger("trustmesh.proxy")

HANDSHAKE_TIMEOUT = 10.0
CHUNK = 64 * 1024
RECHECK_SECONDS = 1.0
HALF_CLOSE_SECONDS = 10.0  # after an EOF that cannot be passed on (see _splice)
UNIX_PREFIX = "unix:"
UNIX_SOCKET_MODE = 0o666  # who may connect is not who is admitted: every caller is checked
MAX_HOLDERS = 16  # a socket shared by more processes is refused rather than checked at length
REFUSAL_LOG_SECONDS = 60.0
TRAFFIC_SECONDS = 60.0  # bytes of long-lived connections are reported at least this often
# A permissive listener waits this long for a client's first byte: a TLS client always speaks
# first (its ClientHello), so silence means a plaintext protocol whose server speaks first.
PEEK_SECONDS = 3.0
TLS_HANDSHAKE_RECORD = 0x16  # the first byte of every TLS record carrying a handshake message
MTLS_MODES = ("strict", "permissive")
AMBIGUOUS_PATH = "ambiguous path"  # the rule of a request refused before any decision: its path is ambiguous
PROTOCOLS = ("tcp", "http")
# Request latency through an http listener, from the request's head to its response's end.
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ListenerError(TrustmeshError):
    """A listener cannot start (its address is taken or malformed)."""


def unix_listen_path(listen: str) -> str | None:
    """The socket path of a `unix:/abs/path` listen address; None for host:port."""
    if not listen.startswith(UNIX_PREFIX):
        return None
    path = listen[len(UNIX_PREFIX):]
    if not path.startswith("/") or "\x00" in path or len(path) > 107:
        raise ValueError(f"invalid address {listen!r}: use unix:/absolute/path.sock (at most 107 bytes)")
    return path


def check_listen(listen: str, *, unix: bool = False) -> None:
    """ValueError when `listen` is no address to listen on (`unix:` only where `unix`)."""
    if unix and unix_listen_path(listen) is not None:
        return
    split_host_port(listen, listening=True)


class Report(Protocol):
    """FlowReporter.report: count one connection's (or HTTP request's) decision, with the
    client's host (inbound) and an HTTP request's route and ID."""

    def __call__(self, source: SpiffeId | None, destination: SpiffeId, port: int, decision: Decision,
                 client_host: str = "", route: str = "", request_id: str = "") -> FlowKey: ...


class Unverified(Protocol):
    """FlowReporter.unverified: count a plaintext client's connection (or HTTP request)."""

    def __call__(self, destination: SpiffeId, port: int, client_host: str, route: str = "") -> FlowKey: ...


def _host(address: str) -> str:
    """The host of a `host:port` peer address ("unknown" stays as it is)."""
    return split_host_port(address)[0] if address != "unknown" else address


@dataclass(frozen=True)
class InboundConfig:
    listen: str
    forward: str
    # strict: mTLS only. permissive (migration): plaintext clients are forwarded too, without an
    # identity, and reported as `unverified` flows with their address.
    mtls: str = "strict"
    # tcp: one decision per connection, bytes spliced. http: HTTP/1.1, one decision per request
    # (route rules), the caller's identity in headers for the service (trustmesh.agent.proxy.http).
    protocol: str = "tcp"
    max_body: int = DEFAULT_MAX_BODY  # http: the largest request body forwarded


@dataclass(frozen=True)
class OutboundConfig:
    listen: str  # host:port (loopback), or unix:/path
    connect: str
    expect: SpiffeId
    mode: int | None = None  # a unix socket's file mode (default UNIX_SOCKET_MODE)
    protocol: str = "tcp"  # http: plaintext HTTP/1.1 in, requests sent over pooled mTLS connections


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    spiffe_id: SpiffeId
    inbound: InboundConfig | None = None
    outbound: tuple[OutboundConfig, ...] = ()
    allow_tls12: bool = False


class Identities(Protocol):
    """What the caller check needs of the SVID cache: the SVIDs the Workload API would hand
    a process with these selectors (so an outbound listener admits exactly those processes)."""

    def x509_svids_for(self, selectors: Collection[str]) -> list[WorkloadX509Svid]: ...


Refused = Callable[[str, str, str, str], None]  # (kind, subject, peer, reason), aggregated upstream


@dataclass(frozen=True)
class CallerRefusal:
    reason: str  # a short, fixed label (metric label, aggregated audit)
    detail: str
    uid: int | None = None
    pid: int | None = None
    exe: str | None = None

    @property
    def peer(self) -> str:
        return f"uid={self.uid if self.uid is not None else '?'} pid={self.pid if self.pid is not None else '?'}"


class CallerCheck:
    """Who may use a service's outbound listener: only processes the Workload API would give
    the service's SVID to (their selectors match an entry of that SPIFFE ID on this node).

    Every process holding the caller's end of the connection must match: a socket shared by
    several processes (a caller that forked and exec'd, or passed it on) is admitted only when
    all of them would receive the SVID themselves, and one held by more than MAX_HOLDERS
    processes is refused outright. `proc` is where /proc is read."""

    def __init__(self, resolver: PeerResolver, attestor: WorkloadAttestor, identities: Identities,
                 proc: str = "/proc") -> None:
        self._resolver = resolver
        self._attestor = attestor
        self._identities = identities
        self._proc = proc

    async def tcp(self, service: SpiffeId, peer: tuple[str, int], ours: tuple[str, int]) -> CallerRefusal | None:
        try:
            local = await self._resolver.tcp(peer, ours)
        except LocalPeerError as err:
            return CallerRefusal(err.reason, str(err))
        return await self._judge(service, local)

    async def unix(self, service: SpiffeId, sock: UnixSocket) -> CallerRefusal | None:
        try:
            local, creds = await self._resolver.unix(sock)
        except LocalPeerError as err:
            return CallerRefusal(err.reason, str(err))
        return await self._judge(service, local, creds.pid)

    async def _judge(self, service: SpiffeId, local: LocalPeer, connector: int | None = None) -> CallerRefusal | None:
        first = connector if connector is not None else local.holders[0].pid
        if len(local.holders) > MAX_HOLDERS:
            return CallerRefusal("too_many_holders", f"{len(local.holders)} processes hold the caller's socket",
                                 local.uid, first)
        for holder in local.holders:
            try:
                with PinnedHolder(local, holder, self._proc) as pinned:
                    selectors = await self._attestor.selectors_for(pinned.credentials)
                    pinned.confirm()
            except LocalPeerError as err:
                return CallerRefusal(err.reason, str(err), local.uid, holder.pid)
            except WorkloadAttestationError as err:
                return CallerRefusal("attestation_failed", str(err), local.uid, holder.pid)
            if not any(s.svid.spiffe_id == service for s in self._identities.x509_svids_for(selectors)):
                count = len(local.holders)
                others = f" (one of {count} processes holding the socket)" if count > 1 else ""
                return CallerRefusal("no_match", f"process {holder.pid}{others} matches no entry of {service} "
                                     "on this node", pinned.credentials.uid, holder.pid,
                                     value_of(selectors, "unix:path"))
        return None


def _unverified_key(destination: SpiffeId, port: int, client_host: str, route: str = "") -> FlowKey:
    """The flow key of a plaintext client, when nobody counts them (tests)."""
    return ("", str(destination), port, "unverified", "", client_host, route)


class Flow:
    """Who the listeners ask for SVIDs, bundles, policy, callers' identities, and where they
    report decisions and refusals."""

    def __init__(self, svid_for: Callable[[SpiffeId], X509Svid | None], bundles: Callable[[], BundleSet],
                 policy: Callable[[], Policy], report: Report,
                 metrics: Registry, clock: Clock = utc_now, *, identities: Identities, refused: Refused,
                 attestor: WorkloadAttestor | None = None, resolver: PeerResolver | None = None,
                 traffic: Callable[[FlowKey, int, int], None] = lambda key, bytes_in, bytes_out: None,
                 unverified: Unverified | None = None,
                 node: SpiffeId | None = None) -> None:
        self.svid_for, self.bundles, self.policy, self.report = svid_for, bundles, policy, report
        self.node = node  # this agent's own ID: when it is in quarantine, its node is
        self.traffic = traffic
        self.unverified: Unverified = unverified or _unverified_key
        self.clock = clock
        self.identities = identities
        self.refused = refused
        self.callers = CallerCheck(resolver or PeerResolver(skip=os.getpid()), attestor or WorkloadAttestor(),
                                   self.identities)
        self.connections = metrics.counter("trustmesh_proxy_connections_total", "proxied connections by decision",
                                           ["service", "direction", "decision"])
        self.open = metrics.gauge("trustmesh_proxy_open_connections", "open proxied connections", ["service"])
        self.refusals = metrics.counter(
            "trustmesh_proxy_refusals_total",
            "connections refused before any policy decision: kind=handshake (inbound TLS) or outbound_caller "
            "(a local process that is not the service)", ["service", "kind", "reason"])
        self.http_requests = metrics.counter(
            "trustmesh_http_requests_total", "requests through http inbound listeners, by decision (allow, deny, "
            "audit, unverified, refused: malformed or ambiguous) and route (method and the rule's path pattern)",
            ["destination", "decision", "route"])
        self.http_seconds = metrics.histogram(
            "trustmesh_http_request_duration_seconds", "time from a request's head to its response's end through "
            "an http inbound listener", ["destination"], buckets=HTTP_BUCKETS)
        self._refusal_log = RateLimitedLog(log, REFUSAL_LOG_SECONDS)

    def decide(self, policy: Policy, source: SpiffeId, destination: SpiffeId, port: int | None,
               request: HttpRequest | None = None) -> Decision:
        """The policy's decision for a connection (or an HTTP request) through this node's listeners (now)."""
        return policy.decide(source, destination, port, self.clock(), node=self.node, request=request)

    def quarantined(self, *ids: SpiffeId) -> Decision | None:
        """The refusal when one of `ids` or this node is in quarantine, else None."""
        return self.policy().in_quarantine(*ids, self.node)

    def refuse(self, kind: str, service: ServiceConfig, peer: str, reason: str, key: str, **fields: Any) -> None:
        """Count, log (one line per service, `key` and reason a minute) and report a refusal."""
        self.refusals.inc(service=service.name, kind=kind, reason=reason)
        self._refusal_log.log((kind, service.name, key, reason), f"{kind}_refused", service=service.name,
                              peer=peer, reason=reason, **fields)
        self.refused(kind, str(service.spiffe_id), peer, reason)


class Meter:
    """Bytes a proxied connection moved each way; `take` returns what was not yet reported."""

    __slots__ = ("key", "forward", "back", "_reported")

    def __init__(self, key: FlowKey) -> None:
        self.key = key
        self.forward = 0  # from the client to the service: the flow's bytes_in
        self.back = 0
        self._reported = (0, 0)

    def take(self) -> tuple[int, int]:
        then = self._reported
        self._reported = (self.forward, self.back)
        return self.forward - then[0], self.back - then[1]


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, meter: Meter | None = None,
                forward: bool = True) -> str:
    """Copy until EOF. "passed": the EOF was passed on (a TCP writer can half-close); "held":
    it could not be (asyncio's TLS transports cannot half-close); "failed": the copy broke."""
    try:
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            if meter is not None:
                if forward:
                    meter.forward += len(chunk)
                else:
                    meter.back += len(chunk)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        return "failed"
    try:
        if writer.can_write_eof():
            writer.write_eof()
            return "passed"
    except (OSError, RuntimeError):
        return "failed"
    return "held"


async def _splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  b: tuple[asyncio.StreamReader, asyncio.StreamWriter], meter: Meter | None = None) -> None:
    """Copy both ways until done; `meter` counts a -> b as forward."""
    pumps = {asyncio.ensure_future(_pump(a[0], b[1], meter, True)),
             asyncio.ensure_future(_pump(b[0], a[1], meter, False))}
    try:
        done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        outcomes = {task.result() for task in done}
        if pending and outcomes == {"passed"}:
            await asyncio.wait(pending)  # the other side knows and will finish
        elif pending and "failed" not in outcomes:
            # One side ended and the other cannot be told (no half-close over TLS): give the
            # answer in flight a moment, then close, or both connections stay open for ever.
            await asyncio.wait(pending, timeout=HALF_CLOSE_SECONDS)
    finally:
        for task in pumps:
            task.cancel()
        for w in (a[1], b[1]):
            w.close()


class _Unread(asyncio.Protocol):
    """Holds an accepted TCP connection unread until its handler starts TLS on it, so not a
    byte of the ClientHello is consumed before the TLS layer is in place."""

    def __init__(self, start: Callable[[asyncio.Transport], Awaitable[None]], tasks: set[asyncio.Task[None]]) -> None:
        self._start = start
        self._tasks = tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        task = asyncio.ensure_future(self._start(transport))
        self._tasks.add(task)  # held until done: asyncio keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # before TLS: the handshake that follows sees the closed transport


@dataclass(eq=False)
class _Open:
    source: SpiffeId
    port: int
    serials: frozenset[str]  # of the chain the client presented, for revocations made later
    task: asyncio.Task[None]
    http: bool = False  # its requests are decided one by one: only quarantine and revocation cut it


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return join_host_port(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else "unknown"


@dataclass
class InboundListener:
    service: ServiceConfig
    flow: Flow
    _server: asyncio.Server | None = None
    _open: set[_Open] = field(default_factory=set)
    _ctx_key: tuple[int, BundleSet] | None = None
    _ctx: ssl.SSLContext | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _meters: set[Meter] = field(default_factory=set)  # of the open forwarded connections
    _plaintext: set[asyncio.Task[None]] = field(default_factory=set)  # a permissive listener's plaintext clients
    _pool: UpstreamPool | None = None  # http: kept-alive connections to the service
    traffic_seconds: float = TRAFFIC_SECONDS

    @property
    def permissive(self) -> bool:
        return self.service.inbound is not None and self.service.inbound.mtls == "permissive"

    @property
    def http(self) -> bool:
        return self.service.inbound is not None and self.service.inbound.protocol == "http"

    @property
    def port(self) -> int:
        return split_host_port(self.service.inbound.listen, listening=True)[1] if self.service.inbound else 0

    def _current_context(self) -> ssl.SSLContext | None:
        svid = self.flow.svid_for(self.service.spiffe_id)
        if svid is None:
            return None
        bundles = self.flow.bundles()
        key = (svid.leaf.serial_number, bundles)
        if key != self._ctx_key:
            self._ctx = server_context(svid, bundles, allow_tls12=self.service.allow_tls12,
                                       alpn=("http/1.1",) if self.http else ())
            self._ctx_key = key
        return self._ctx

    async def start(self) -> None:
        assert self.service.inbound is not None
        host, port = split_host_port(self.service.inbound.listen, listening=True)
        if self._current_context() is None:
            raise VerificationError(f"no SVID for {self.service.spiffe_id} yet: is an entry registered for it "
                                    "on this node?")
        loop = asyncio.get_running_loop()
        if self.http:
            self._pool = UpstreamPool(self._dial_backend)
        self._server = await loop.create_server(lambda: _Unread(self._handle, self._tasks), host, port,
                                                backlog=1024)
        self._tasks.add(asyncio.create_task(self._recheck_loop(), name=f"recheck-{self.service.name}"))
        self._tasks.add(asyncio.create_task(self._traffic_loop(), name=f"traffic-{self.service.name}"))
        log_event(log, "inbound_listening", service=self.service.name, listen=self.service.inbound.listen,
                  forward=self.service.inbound.forward, mtls=self.service.inbound.mtls,
                  protocol=self.service.inbound.protocol)
        if not _loopback(split_host_port(self.service.inbound.forward)[0]):
            # The service gets plaintext, and (http) trusts the identity headers: only the agent
            # may be able to reach it.
            log_event(log, "forward_not_loopback", level=logging.WARNING, service=self.service.name,
                      forward=self.service.inbound.forward,
                      hint="forward to 127.0.0.1 and make the service listen on loopback only: anyone who can reach "
                           "it directly bypasses the allowlist" + (" and can forge X-Forwarded-Client-Cert"
                                                                   if self.http else ""))
        if self.permissive:
            log_event(log, "permissive_listener", level=logging.WARNING, service=self.service.name,
                      listen=self.service.inbound.listen,
                      hint="plaintext clients are forwarded without an identity (reported as unverified flows: "
                           "`trustmesh flows --decision unverified`); set mtls: strict once they are gone")

    async def _handle(self, transport: asyncio.Transport) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if self.permissive:
                first = await _first_byte(transport, PEEK_SECONDS)
                if first == b"":
                    self._handshake_refused(_address(transport), "closed", "the client closed the connection")
                    transport.abort()
                    return
                if first is None or first[0] != TLS_HANDSHAKE_RECORD:
                    await self._serve_plaintext(transport, task)
                    return
            streams = await self._handshake(transport)
            if streams is not None:
                await self._serve(*streams, task)
        except asyncio.CancelledError:
            transport.abort()  # cut by policy or shutdown: end quietly, the cut was already reported

    async def _handshake(self, transport: asyncio.Transport) -> tuple[asyncio.StreamReader,
                                                                      asyncio.StreamWriter] | None:
        """TLS on the accepted connection; None (and the refusal counted and reported) when it fails."""
        loop = asyncio.get_running_loop()
        source = _address(transport)
        ctx = self._current_context()
        if ctx is None:  # our SVID expired (the server out of reach for too long): nothing to present
            self._handshake_refused(source, "no_svid", f"no current SVID for {self.service.spiffe_id}")
            transport.abort()
            return None
        if transport.is_closing():
            self._handshake_refused(source, "closed", "the client closed the connection before the handshake")
            return None
        reader = asyncio.StreamReader(limit=CHUNK, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            tls = await loop.start_tls(transport, protocol, ctx, server_side=True,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as err:  # ssl.SSLError is an OSError
            self._handshake_refused(source, handshake_failure(err), str(err))
            transport.abort()
            return None
        if tls is None:  # the client went away mid-handshake without an error
            self._handshake_refused(source, "closed", "the client closed the connection during the handshake")
            transport.abort()
            return None
        # loop.start_tls never calls connection_made on the protocol it is given: without this
        # the reader has no transport to pause, and a client could fill our memory.
        protocol.connection_made(tls)
        return reader, asyncio.StreamWriter(tls, protocol, reader, loop)

    def _handshake_refused(self, source: str, reason: str, detail: str) -> None:
        host = _host(source)
        if reason == "closed":
            # A client that hung up (a port probe, a health check) refused nothing: counted only.
            self.flow.refusals.inc(service=self.service.name, kind="handshake", reason=reason)
            return
        self.flow.refuse("handshake", self.service, source, reason, host, detail=detail)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     task: asyncio.Task[None]) -> None:
        service = self.service
        assert service.inbound is not None
        sslobj = writer.get_extra_info("ssl_object")
        source_address = _address(writer.transport)
        try:
            source: SpiffeId | None = verify_peer(sslobj, self.flow.bundles(), self.flow.clock,
                                                  self.flow.policy().revoked_serials)
        except CertificateRevokedError as err:
            # Both: the flow record names the identity, the handshake refusal the address.
            decision = Decision(False, "revoked certificate", f"client refused: {err}")
            self.flow.report(err.spiffe_id, service.spiffe_id, self.port, decision, _host(source_address))
            self.flow.connections.inc(service=service.name, direction="inbound", decision="refused")
            self._handshake_refused(source_address, "revoked", str(err))
            writer.close()
            return
        except VerificationError as err:
            self.flow.connections.inc(service=service.name, direction="inbound", decision="refused")
            self._handshake_refused(source_address, "untrusted_chain", str(err))
            writer.close()
            return
        assert source is not None
        if self.http:
            await self._serve_http(reader, writer, source, sslobj, source_address, task)
            return
        # Per connection, before a byte is forwarded: quarantine (of the source, this service or
        # this node) refuses here, whatever the allowlists say.
        decision = self.flow.decide(self.flow.policy(), source, service.spiffe_id, self.port)
        # With the client's host: the server tells from it which node the source ran on (a
        # credential presented from a host that is none of its nodes is what replay looks like).
        key = self.flow.report(source, service.spiffe_id, self.port, decision, _host(source_address))
        if not decision.allowed:
            self.flow.connections.inc(service=service.name, direction="inbound", decision="deny")
            writer.close()
            return
        self.flow.connections.inc(service=service.name, direction="inbound", decision="allow")
        upstream = await self._dial_service(writer)
        if upstream is None:
            return
        entry = _Open(source, self.port, chain_serials(sslobj), task)
        self._open.add(entry)
        try:
            await self._forward((reader, writer), upstream, Meter(key))
        finally:
            self._open.discard(entry)

    async def _forward(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                       upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter], meter: Meter) -> None:
        """Splice client and service, metering the bytes; what was not yet reported is at the end."""
        self._meters.add(meter)
        self.flow.open.inc(service=self.service.name)
        try:
            await _splice(client, upstream, meter)
        except asyncio.CancelledError:
            client[1].close()
            upstream[1].close()
        finally:
            self._meters.discard(meter)
            self.flow.open.dec(service=self.service.name)
            self.flow.traffic(meter.key, *meter.take())

    async def _serve_plaintext(self, transport: asyncio.Transport, task: asyncio.Task[None]) -> None:
        """A permissive listener's plaintext client: forwarded as it is, with no identity and
        no policy decision (there is nobody to decide about), and reported as unverified with
        the client's host so that someone finds and fixes it."""
        service = self.service
        assert service.inbound is not None
        if transport.is_closing():  # its reader would never see the end: nothing to forward
            self._handshake_refused(_address(transport), "closed", "the client closed the connection")
            return
        quarantine = self.flow.quarantined(service.spiffe_id)
        if quarantine is not None:  # no identity to decide about, but nothing reaches a quarantined service
            self.flow.connections.inc(service=service.name, direction="inbound", decision="deny")
            self._handshake_refused(_address(transport), "quarantine", quarantine.reason)
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CHUNK, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        transport.resume_reading()
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        source = _address(transport)
        host = split_host_port(source)[0] if source != "unknown" else source
        if self.http:  # parsed too: a plaintext client must not hand the service forged identity headers
            self.flow.connections.inc(service=service.name, direction="inbound", decision="unverified")
            self._plaintext.add(task)
            try:
                await serve_requests((reader, writer), _InboundExchange(self, None, host),
                                     max_body=service.inbound.max_body)
            finally:
                self._plaintext.discard(task)
                writer.close()
            return
        key = self.flow.unverified(service.spiffe_id, self.port, host)
        self.flow.connections.inc(service=service.name, direction="inbound", decision="unverified")
        upstream = await self._dial_service(writer)
        if upstream is not None:
            self._plaintext.add(task)
            try:
                await self._forward((reader, writer), upstream, Meter(key))
            finally:
                self._plaintext.discard(task)

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: SpiffeId,
                          sslobj: ssl.SSLObject, source_address: str, task: asyncio.Task[None]) -> None:
        """A verified client of an http listener: each of its requests is decided by itself
        (trustmesh.agent.proxy.http), so the connection is refused here only for quarantine."""
        service = self.service
        assert service.inbound is not None
        host = _host(source_address)
        quarantine = self.flow.quarantined(source, service.spiffe_id)
        if quarantine is not None:
            self.flow.report(source, service.spiffe_id, self.port, quarantine, host)
            self.flow.connections.inc(service=service.name, direction="inbound", decision="deny")
            writer.close()
            return
        self.flow.connections.inc(service=service.name, direction="inbound", decision="http")
        leaf = sslobj.getpeercert(binary_form=True) or b""
        exchange = _InboundExchange(self, source, host, identity_headers(service.spiffe_id, source, leaf))
        entry = _Open(source, self.port, chain_serials(sslobj), task, http=True)
        self._open.add(entry)
        self.flow.open.inc(service=service.name)
        try:
            await serve_requests((reader, writer), exchange, max_body=service.inbound.max_body)
        finally:
            self._open.discard(entry)
            self.flow.open.dec(service=service.name)
            writer.close()

    async def _dial_backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection to the local service (the http listener pools them); HttpError, logged, when it is down."""
        assert self.service.inbound is not None
        host, port = split_host_port(self.service.inbound.forward)
        try:
            return await asyncio.wait_for(asyncio.open_connection(host, port), HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as err:
            log_event(log, "forward_failed", level=logging.WARNING, service=self.service.name, error=str(err))
            raise HttpError(502, "service_unavailable", f"{self.service.name} is not reachable at "
                            f"{self.service.inbound.forward}") from None

    async def _dial_service(self, client: asyncio.StreamWriter) -> tuple[asyncio.StreamReader,
                                                                         asyncio.StreamWriter] | None:
        """Connect to the local service; None (the client closed, the failure logged) when it is down."""
        try:
            return await self._dial_backend()
        except HttpError:
            client.close()
            return None

    def report_traffic(self) -> None:
        """Report the bytes open connections moved since their last report."""
        for meter in list(self._meters):
            self.flow.traffic(meter.key, *meter.take())

    async def _traffic_loop(self) -> None:
        while True:
            await asyncio.sleep(self.traffic_seconds)
            self.report_traffic()

    def recheck(self) -> int:
        """Close open connections the current policy no longer allows, or whose client's
        certificate has been revoked since; return how many."""
        policy, now, closed = self.flow.policy(), self.flow.clock(), 0
        for conn in list(self._open):
            revoked = conn.serials & policy.revoked_serials
            decision: Decision | None
            if revoked:
                decision = Decision(False, "revoked certificate",
                                    f"{conn.source} presented certificate {min(revoked)}, which was revoked")
            elif conn.http:  # the allowlists decide its next request; quarantine cuts it now
                decision = policy.in_quarantine(conn.source, self.service.spiffe_id, self.flow.node)
            else:
                decision = policy.decide(conn.source, self.service.spiffe_id, conn.port, now, node=self.flow.node)
            if decision is not None and not decision.allowed:
                self.flow.report(conn.source, self.service.spiffe_id, conn.port, decision)
                conn.task.cancel()
                self._open.discard(conn)  # reported once, even if the next recheck comes before the cut
                closed += 1
        if self._plaintext and policy.in_quarantine(self.service.spiffe_id, self.flow.node) is not None:
            for task in list(self._plaintext):
                task.cancel()
            closed += len(self._plaintext)
            self._plaintext.clear()
        if closed:
            log_event(log, "connections_cut", service=self.service.name, count=closed)
        return closed

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            self.recheck()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._open):
            conn.task.cancel()
        if self._pool is not None:
            self._pool.clear()


class _InboundExchange(Exchange):
    """One client connection of an http inbound listener: every request decided with the
    policy as it is now (a change applies to the next request), counted under its route, and
    sent to the service over the listener's pool with the caller's identity headers."""

    def __init__(self, listener: InboundListener, source: SpiffeId | None, host: str, identity: bytes = b"") -> None:
        self._listener = listener
        self._flow = listener.flow
        self._service = listener.service.spiffe_id
        self._source = source  # None: a plaintext client of a permissive listener
        self._host = host
        self._identity = identity

    def admit(self, request: HttpRequest, request_id: str) -> Admission:
        policy = self._flow.policy()
        if self._source is None:
            refused = policy.in_quarantine(self._service, self._flow.node)
            return Admission(refused, route_label(request.method, None, policy.route_methods))
        decision = self._flow.decide(policy, self._source, self._service, self._listener.port, request)
        return Admission(decision, decision.route, self._identity if decision.allowed else b"")

    def refused_path(self, method: str, reason: str, request_id: str) -> Admission:
        return Admission(Decision(False, AMBIGUOUS_PATH, reason),
                         route_label(method, None, self._flow.policy().route_methods))

    async def upstream(self) -> Upstream:
        assert self._listener._pool is not None
        return await self._listener._pool.get()

    def release(self, conn: Upstream, reusable: bool) -> None:
        assert self._listener._pool is not None
        if reusable:
            self._listener._pool.put(conn)
        else:
            conn.close()

    def done(self, outcome: Outcome) -> None:
        admission, flow = outcome.admission, self._flow
        decision = admission.decision
        if self._source is None and (decision is None or decision.allowed):
            kind = "unverified"
            key = flow.unverified(self._service, self._listener.port, self._host, admission.route)
        else:
            assert decision is not None
            kind = "refused" if decision.rule == AMBIGUOUS_PATH else kind_of(decision)
            key = flow.report(self._source, self._service, self._listener.port, decision, self._host,
                              admission.route, outcome.request_id)
        flow.traffic(key, outcome.bytes_in, outcome.bytes_out)
        destination = str(self._service)
        flow.http_requests.inc(destination=destination, decision=kind, route=admission.route)
        flow.http_seconds.observe(outcome.seconds, destination=destination)


async def _first_byte(transport: asyncio.Transport, timeout: float) -> bytes | None:
    """The client's first byte, left unread for whoever reads next (MSG_PEEK on a duplicate of
    the socket's descriptor: the transport's own is paused and stays untouched); b"" when the
    client closed, None when it sent nothing within `timeout`."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    loop = asyncio.get_running_loop()
    peek = socket.socket(fileno=os.dup(sock.fileno()))
    peek.setblocking(False)
    got: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        if got.done():
            return
        try:
            got.set_result(peek.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return
        except OSError:
            got.set_result(b"")

    loop.add_reader(peek.fileno(), readable)
    try:
        return await asyncio.wait_for(got, timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        loop.remove_reader(peek.fileno())
        peek.close()  # the duplicate only: the connection stays open


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _bind_unix(path: Path, mode: int) -> socket.socket:
    """A unix socket at `path` with `mode` from its first instant: bound and chmod'ed in a
    private directory, then renamed into place, so nobody can swap the file for a symlink
    between bind and chmod (and have us chmod what it points to)."""
    private = tempfile.mkdtemp(prefix=".trustmesh-", dir=path.parent)  # 0700, ours alone
    staged = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(staged)
        os.chmod(staged, mode)
        os.rename(staged, path)
    except BaseException:
        sock.close()
        Path(staged).unlink(missing_ok=True)
        raise
    finally:
        os.rmdir(private)
    return sock


@dataclass
class OutboundListener:
    service: ServiceConfig
    route: OutboundConfig
    flow: Flow
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _unix_path: Path | None = None
    _open: set[asyncio.Task[None]] = field(default_factory=set)  # connections spliced to the remote
    pool: UpstreamPool = field(init=False)  # http: kept-alive mTLS connections to the remote

    def __post_init__(self) -> None:
        self.pool = UpstreamPool(self.dial)

    @property
    def port(self) -> int:
        """The remote port this route dials."""
        return split_host_port(self.route.connect)[1]

    async def start(self) -> None:
        unix_path = unix_listen_path(self.route.listen)
        if unix_path is None:
            host, port = split_host_port(self.route.listen, listening=True)
            if not _loopback(host):
                # Callers from other hosts are never admitted (their sockets are not this node's).
                log_event(log, "outbound_not_loopback", level=logging.WARNING, service=self.service.name,
                          listen=self.route.listen, hint="listen on 127.0.0.1 or a unix: socket")
            self._server = await asyncio.start_server(self._handle, host, port, backlog=1024)
        else:
            path = Path(unix_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                await claim_socket_path(path, "another listen path")
            except SocketPathError as err:
                raise ListenerError(str(err)) from err
            sock = _bind_unix(path, self.route.mode if self.route.mode is not None else UNIX_SOCKET_MODE)
            self._server = await asyncio.start_unix_server(self._handle, sock=sock, backlog=1024)
            self._unix_path = path
        log_event(log, "outbound_listening", service=self.service.name, listen=self.route.listen,
                  connect=self.route.connect, expect=self.route.expect)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.close()
        finally:
            self._tasks.discard(task)

    async def _caller_refusal(self, writer: asyncio.StreamWriter) -> CallerRefusal | None:
        if self._unix_path is not None:
            return await self.flow.callers.unix(self.service.spiffe_id, writer.get_extra_info("socket"))
        peer, ours = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        return await self.flow.callers.tcp(self.service.spiffe_id, (peer[0], peer[1]), (ours[0], ours[1]))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Who connected, before anything is dialled: a refused caller sends no byte off the node.
        refusal = await self._caller_refusal(writer)
        if refusal is not None:
            self.flow.connections.inc(service=self.service.name, direction="outbound", decision="caller_refused")
            self.flow.refuse("outbound_caller", self.service, refusal.peer, refusal.reason,
                             str(refusal.uid), listen=self.route.listen, uid=refusal.uid, pid=refusal.pid,
                             exe=refusal.exe or "", detail=refusal.detail)
            writer.transport.abort()  # what it sent is dropped unread
            return
        if self.route.protocol == "http":
            self.flow.connections.inc(service=self.service.name, direction="outbound", decision="http")
            task = asyncio.current_task()
            assert task is not None
            self._open.add(task)
            try:
                await serve_requests((reader, writer), _OutboundExchange(self))
            finally:
                self._open.discard(task)
                writer.close()
            return
        quarantine = self.flow.quarantined(self.service.spiffe_id, self.route.expect)
        if quarantine is not None:
            # Refused here, not a byte sent: reported, since the destination's agent never sees it.
            self.flow.report(self.service.spiffe_id, self.route.expect, self.port, quarantine)
            self.flow.connections.inc(service=self.service.name, direction="outbound", decision="deny")
            writer.close()
            return
        try:
            up_reader, up_writer = await self.dial()
        except HttpError:
            writer.close()
            return
        self.flow.connections.inc(service=self.service.name, direction="outbound", decision="allow")
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        try:
            await _splice((reader, writer), (up_reader, up_writer))  # not metered: the inbound side meters it
        finally:
            self._open.discard(task)

    async def dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An mTLS connection to the remote with the service's SVID, its server verified to be
        the expected SPIFFE ID; HttpError (logged, and reported when the server is not the one
        expected) when there is none."""
        svid = self.flow.svid_for(self.service.spiffe_id)
        if svid is None:
            raise HttpError(503, "no_svid", f"no current SVID for {self.service.spiffe_id} on this node")
        host, port = split_host_port(self.route.connect)
        bundles = self.flow.bundles()
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=client_context(svid, bundles), server_hostname=host,
                                        ssl_handshake_timeout=HANDSHAKE_TIMEOUT), HANDSHAKE_TIMEOUT * 1.5)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as err:
            log_event(log, "outbound_connect_failed", level=logging.WARNING, service=self.service.name,
                      connect=self.route.connect, error=str(err))
            raise HttpError(502, "upstream_unavailable", f"{self.route.connect} is not reachable") from None
        try:
            peer = verify_peer(up_writer.get_extra_info("ssl_object"), bundles, self.flow.clock)
            if peer != self.route.expect:
                raise VerificationError(f"the server is {peer}, not the expected {self.route.expect}")
        except VerificationError as err:
            # The only flow an outbound listener reports: one that never reached a decision. A
            # connection that reaches the destination's inbound listener is counted there (its
            # decision and its bytes), by the destination's agent, so counting it here too would
            # report every edge twice.
            self.flow.report(self.service.spiffe_id, self.route.expect, port,
                             Decision(False, "server verification", str(err)))
            self.flow.connections.inc(service=self.service.name, direction="outbound", decision="refused")
            up_writer.close()
            raise HttpError(502, "upstream_refused", str(err)) from None
        return up_reader, up_writer

    def recheck(self) -> int:
        """Cut the open connections when the service, the destination or this node has been put
        in quarantine since (the allowlists are the destination's agent's to enforce); return how many."""
        if not self._open:
            return 0
        quarantine = self.flow.quarantined(self.service.spiffe_id, self.route.expect)
        if quarantine is None:
            return 0
        cut = list(self._open)
        for task in cut:
            self.flow.report(self.service.spiffe_id, self.route.expect, self.port, quarantine)
            task.cancel()
        self._open.clear()  # reported once, even if the next recheck comes before the cut
        log_event(log, "connections_cut", service=self.service.name, count=len(cut), route=self.route.connect)
        return len(cut)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        self.pool.clear()
        if self._unix_path is not None:
            self._unix_path.unlink(missing_ok=True)


class _OutboundExchange(Exchange):
    """A local caller's requests on an http outbound listener (the caller already checked):
    sent over pooled mTLS connections to the remote, which decides them. Nothing is sent while
    the service, the destination or this node is in quarantine."""

    normalize = False  # the remote's listener normalises and decides; the request goes as it was written

    def __init__(self, listener: OutboundListener) -> None:
        self._listener = listener

    def admit(self, request: HttpRequest, request_id: str) -> Admission:
        listener = self._listener
        quarantine = listener.flow.quarantined(listener.service.spiffe_id, listener.route.expect)
        return Admission(quarantine, route_label(request.method, None, listener.flow.policy().route_methods))

    def refused_path(self, method: str, reason: str, request_id: str) -> Admission:  # never: not normalised
        return Admission(Decision(False, AMBIGUOUS_PATH, reason), route_label(method, None))

    async def upstream(self) -> Upstream:
        return await self._listener.pool.get()

    def release(self, conn: Upstream, reusable: bool) -> None:
        if reusable:
            self._listener.pool.put(conn)
        else:
            conn.close()

    def done(self, outcome: Outcome) -> None:
        decision = outcome.admission.decision
        if decision is not None and not decision.allowed:
            # Refused here, not a byte sent: reported, since the destination's agent never sees it.
            listener = self._listener
            listener.flow.report(listener.service.spiffe_id, listener.route.expect, listener.port, decision,
                                 route=outcome.admission.route, request_id=outcome.request_id)
