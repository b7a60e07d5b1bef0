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
from trustmesh.agent.proxy.reporter import FlowKey
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
from trustmesh.policy import Decision, Policy
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
    """FlowReporter.report: count one connection's decision (with the client's host, inbound)."""

    def __call__(self, source: SpiffeId | None, destination: SpiffeId, port: int, decision: Decision,
                 client_host: str = "") -> FlowKey: ...


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


@dataclass(frozen=True)
class OutboundConfig:
    listen: str  # host:port (loopback), or unix:/path
    connect: str
    expect: SpiffeId
    mode: int | None = None  # a unix socket's file mode (default UNIX_SOCKET_MODE)


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


class Flow:
    """Who the listeners ask for SVIDs, bundles, policy, callers' identities, and where they
    report decisions and refusals."""

    def __init__(self, svid_for: Callable[[SpiffeId], X509Svid | None], bundles: Callable[[], BundleSet],
                 policy: Callable[[], Policy], report: Report,
                 metrics: Registry, clock: Clock = utc_now, *, identities: Identities, refused: Refused,
                 attestor: WorkloadAttestor | None = None, resolver: PeerResolver | None = None,
                 traffic: Callable[[FlowKey, int, int], None] = lambda key, bytes_in, bytes_out: None,
                 unverified: Callable[[SpiffeId, int, str], FlowKey] | None = None,
                 node: SpiffeId | None = None) -> None:
        self.svid_for, self.bundles, self.policy, self.report = svid_for, bundles, policy, report
        self.node = node  # this agent's own ID: when it is in quarantine, its node is
        self.traffic = traffic
        self.unverified = unverified or (lambda destination, port, host: ("", str(destination), port,
                                                                          "unverified", "", host))
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
        self._refusal_log = RateLimitedLog(log, REFUSAL_LOG_SECONDS)

    def decide(self, policy: Policy, source: SpiffeId, destination: SpiffeId, port: int | None) -> Decision:
        """The policy's decision for a connection through this node's listeners (now)."""
        return policy.decide(source, destination, port, self.clock(), node=self.node)

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
    traffic_seconds: float = TRAFFIC_SECONDS

    @property
    def permissive(self) -> bool:
        return self.service.inbound is not None and self.service.inbound.mtls == "permissive"

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
            self._ctx = server_context(svid, bundles, allow_tls12=self.service.allow_tls12)
            self._ctx_key = key
        return self._ctx

    async def start(self) -> None:
        assert self.service.inbound is not None
        host, port = split_host_port(self.service.inbound.listen, listening=True)
        if self._current_context() is None:
            raise VerificationError(f"no SVID for {self.service.spiffe_id} yet: is an entry registered for it "
                                    "on this node?")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Unread(self._handle, self._tasks), host, port,
                                                backlog=1024)
        self._tasks.add(asyncio.create_task(self._recheck_loop(), name=f"recheck-{self.service.name}"))
        self._tasks.add(asyncio.create_task(self._traffic_loop(), name=f"traffic-{self.service.name}"))
        log_event(log, "inbound_listening", service=self.service.name, listen=self.service.inbound.listen,
                  forward=self.service.inbound.forward, mtls=self.service.inbound.mtls)
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
        key = self.flow.unverified(service.spiffe_id, self.port, host)
        self.flow.connections.inc(service=service.name, direction="inbound", decision="unverified")
        upstream = await self._dial_service(writer)
        if upstream is not None:
            self._plaintext.add(task)
            try:
                await self._forward((reader, writer), upstream, Meter(key))
            finally:
                self._plaintext.discard(task)

    async def _dial_service(self, client: asyncio.StreamWriter) -> tuple[asyncio.StreamReader,
                                                                         asyncio.StreamWriter] | None:
        """Connect to the local service; None (the client closed, the failure logged) when it is down."""
        assert self.service.inbound is not None
        host, port = split_host_port(self.service.inbound.forward)
        try:
            return await asyncio.wait_for(asyncio.open_connection(host, port), HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as err:
            log_event(log, "forward_failed", level=logging.WARNING, service=self.service.name, error=str(err))
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
            if revoked:
                decision = Decision(False, "revoked certificate",
                                    f"{conn.source} presented certificate {min(revoked)}, which was revoked")
            else:
                decision = policy.decide(conn.source, self.service.spiffe_id, conn.port, now, node=self.flow.node)
            if not decision.allowed:
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
        quarantine = self.flow.quarantined(self.service.spiffe_id, self.route.expect)
        if quarantine is not None:
            # Refused here, not a byte sent: reported, since the destination's agent never sees it.
            self.flow.report(self.service.spiffe_id, self.route.expect, self.port, quarantine)
            self.flow.connections.inc(service=self.service.name, direction="outbound", decision="deny")
            writer.close()
            return
        svid = self.flow.svid_for(self.service.spiffe_id)
        if svid is None:
            writer.close()
            return
        host, port = split_host_port(self.route.connect)
        bundles = self.flow.bundles()
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=client_context(svid, bundles), server_hostname=host,
                                        ssl_handshake_timeout=HANDSHAKE_TIMEOUT), HANDSHAKE_TIMEOUT * 1.5)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as err:
            log_event(log, "outbound_connect_failed", level=logging.WARNING, service=self.service.name,
                      connect=self.route.connect, error=str(err))
            writer.close()
            return
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
        if self._unix_path is not None:
            self._unix_path.unlink(missing_ok=True)
