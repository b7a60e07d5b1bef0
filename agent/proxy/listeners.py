"""Inbound and outbound mTLS listeners that enforce the allowlist.

Inbound: terminate mTLS with the service's own SVID, verify the client's chain against its
own trust domain's bundle, decide with the policy, and only then forward bytes to the local
service. Denied connections are closed right after the handshake and reported. Open
connections are re-checked whenever the policy changes (and every second, so time-bound
access lapses by itself); those no longer allowed are closed.

Outbound: accept plaintext from the local service, dial the remote with the service's SVID,
and refuse a server whose SPIFFE ID is not the expected one.

A rotated SVID is used for the next handshake at once (the context is swapped in the SNI
callback, which runs for every ClientHello); open connections are not dropped.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from trustmesh.agent.proxy.tls import CertificateRevokedError, client_context, server_context, verify_peer
from trustmesh.bundle import BundleSet
from trustmesh.clock import Clock, utc_now
from trustmesh.errors import VerificationError
from trustmesh.hostport import split_host_port
from trustmesh.logs import log_event
from trustmesh.metrics import Registry
from trustmesh.policy import Decision, Policy
from trustmesh.spiffeid import SpiffeId
from trustmesh.x509svid import X509Svid

log = logging.getLogger("trustmesh.proxy")

HANDSHAKE_TIMEOUT = 10.0
CHUNK = 64 * 1024
RECHECK_SECONDS = 1.0


@dataclass(frozen=True)
class InboundConfig:
    listen: str
    forward: str


@dataclass(frozen=True)
class OutboundConfig:
    listen: str
    connect: str
    expect: SpiffeId


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    spiffe_id: SpiffeId
    inbound: InboundConfig | None = None
    outbound: tuple[OutboundConfig, ...] = ()
    allow_tls12: bool = False


class Flow:
    """Who the listeners ask for SVIDs, bundles, policy and where they report decisions."""

    def __init__(self, svid_for: Callable[[SpiffeId], X509Svid | None], bundles: Callable[[], BundleSet],
                 policy: Callable[[], Policy], report: Callable[[SpiffeId | None, SpiffeId, int, Decision], None],
                 metrics: Registry, clock: Clock = utc_now) -> None:
        self.svid_for, self.bundles, self.policy, self.report = svid_for, bundles, policy, report
        self.clock = clock
        self.connections = metrics.counter("trustmesh_proxy_connections_total", "proxied connections by decision",
                                           ["service", "direction", "decision"])
        self.open = metrics.gauge("trustmesh_proxy_open_connections", "open proxied connections", ["service"])


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass


async def _splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    try:
        await asyncio.gather(_pump(a[0], b[1]), _pump(b[0], a[1]))
    finally:
        for w in (a[1], b[1]):
            w.close()


@dataclass(eq=False)
class _Open:
    source: SpiffeId
    port: int
    task: asyncio.Task[None]


@dataclass
class InboundListener:
    service: ServiceConfig
    flow: Flow
    _server: asyncio.Server | None = None
    _open: set[_Open] = field(default_factory=set)
    _ctx_key: tuple[int, BundleSet] | None = None
    _ctx: ssl.SSLContext | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

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

    def _sni(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self._current_context()
        if current is not None:
            sslobj.context = current

    async def start(self) -> None:
        assert self.service.inbound is not None
        host, port = split_host_port(self.service.inbound.listen, listening=True)
        base = self._current_context()
        if base is None:
            raise VerificationError(f"no SVID for {self.service.spiffe_id} yet: is an entry registered for it "
                                    "on this node?")
        # The listening context only routes the handshake into the current one.
        listen_ctx = server_context(self.flow.svid_for(self.service.spiffe_id), self.flow.bundles(),  # type: ignore[arg-type]
                                    allow_tls12=self.service.allow_tls12)
        listen_ctx.sni_callback = self._sni
        self._server = await asyncio.start_server(self._handle, host, port, ssl=listen_ctx,
                                                  ssl_handshake_timeout=HANDSHAKE_TIMEOUT, backlog=1024)
        self._tasks.add(asyncio.create_task(self._recheck_loop(), name=f"recheck-{self.service.name}"))
        log_event(log, "inbound_listening", service=self.service.name, listen=self.service.inbound.listen,
                  forward=self.service.inbound.forward)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # asyncio keeps only a weak reference to connection handlers
        try:
            await self._serve(reader, writer, task)
        except asyncio.CancelledError:
            writer.close()  # cut by policy or shutdown: end quietly, the cut was already reported
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     task: asyncio.Task[None]) -> None:
        service = self.service
        assert service.inbound is not None
        sslobj = writer.get_extra_info("ssl_object")
        try:
            source: SpiffeId | None = verify_peer(sslobj, self.flow.bundles(), self.flow.clock,
                                                  self.flow.policy().revoked_serials)
        except CertificateRevokedError as err:
            decision = Decision(False, "revoked certificate", f"client refused: {err}")
            self.flow.report(err.spiffe_id, service.spiffe_id, self.port, decision)
            self.flow.connections.inc(service=service.name, direction="inbound", decision="refused")
            writer.close()
            return
        except VerificationError as err:
            decision = Decision(False, "peer verification", f"client refused: {err}")
            self.flow.report(None, service.spiffe_id, self.port, decision)
            self.flow.connections.inc(service=service.name, direction="inbound", decision="refused")
            writer.close()
            return
        assert source is not None
        decision = self.flow.policy().decide(source, service.spiffe_id, self.port, self.flow.clock())
        self.flow.report(source, service.spiffe_id, self.port, decision)
        if not decision.allowed:
            self.flow.connections.inc(service=service.name, direction="inbound", decision="deny")
            writer.close()
            return
        self.flow.connections.inc(service=service.name, direction="inbound", decision="allow")
        host, port = split_host_port(service.inbound.forward)
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(host, port), HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as err:
            log_event(log, "forward_failed", level=logging.WARNING, service=service.name, error=str(err))
            writer.close()
            return
        entry = _Open(source, self.port, task)
        self._open.add(entry)
        self.flow.open.inc(service=service.name)
        try:
            await _splice((reader, writer), upstream)
        except asyncio.CancelledError:
            writer.close()
            upstream[1].close()
        finally:
            self._open.discard(entry)
            self.flow.open.dec(service=service.name)

    def recheck(self) -> int:
        """Close open connections the current policy no longer allows; return how many."""
        policy, now, closed = self.flow.policy(), self.flow.clock(), 0
        for conn in list(self._open):
            decision = policy.decide(conn.source, self.service.spiffe_id, conn.port, now)
            if not decision.allowed:
                self.flow.report(conn.source, self.service.spiffe_id, conn.port, decision)
                conn.task.cancel()
                closed += 1
        if closed:
            log_event(log, "connections_cut", service=self.service.name, count=closed)
        return closed

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            self.recheck()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._open):
            conn.task.cancel()


@dataclass
class OutboundListener:
    service: ServiceConfig
    route: OutboundConfig
    flow: Flow
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        host, port = split_host_port(self.route.listen, listening=True)
        self._server = await asyncio.start_server(self._handle, host, port, backlog=1024)
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            self.flow.report(self.service.spiffe_id, self.route.expect, port,
                             Decision(False, "server verification", str(err)))
            self.flow.connections.inc(service=self.service.name, direction="outbound", decision="refused")
            up_writer.close()
            writer.close()
            return
        self.flow.connections.inc(service=self.service.name, direction="outbound", decision="allow")
        await _splice((reader, writer), (up_reader, up_writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
