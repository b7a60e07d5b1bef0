"""The control-plane server's composition root.

Reads top to bottom like the flow it starts: open the store, load the key-encryption key,
load or create the CA (never silently a new one), publish the trust bundle agents bootstrap
from, build the registry view (the in-memory registry every API reads, kept current by the
store's change feed) with its subscribers and the domain services the servicers call (sign:
NodeServicer -> issuance.py -> the CA; push: the view -> sync_service.py -> sync_delta.py),
start the agent-facing gRPC server (TLS, the server's own SVID, rotated in place),
the admin server on a unix socket (mode 0600: file permissions are the access control),
the remote admin and operator login listeners, the web console (an HTTPS client of those two:
console/), metrics, and the background loops, then announce `ready`. Every gRPC listener puts each call
through one CallLayer (api/calls.py): who is calling, the per-method table of who may call
what, error mapping and call metrics. Everything runs in one
TaskGroup: the first failure stops all; SIGTERM stops all cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from datetime import datetime, timedelta
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from trustmesh.clock import utc_now
from trustmesh.controlplane import integrity
from trustmesh.controlplane.api import callers
from trustmesh.controlplane.api.admin import AdminServicer, AdminServices
from trustmesh.controlplane.api.calls import CallLayer
from trustmesh.controlplane.api.local_socket import AdminSocket
from trustmesh.controlplane.api.login import OperatorLoginServicer
from trustmesh.controlplane.api.node import NodeServicer
from trustmesh.controlplane.attestation import NodeAttestor
from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.audit_anchor import AuditAnchor
from trustmesh.controlplane.bundle_endpoint import BundleEndpoint, serve_bundle_endpoint
from trustmesh.controlplane.ca.authority import CAConfig, CertificateAuthority, needs_rotation
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.ca.keymanager import KeyManager
from trustmesh.controlplane.ca.pkcs11 import Pkcs11Token, read_pin
from trustmesh.controlplane.ca.upstream import UpstreamAuthority
from trustmesh.controlplane.clones import CloneGuard
from trustmesh.controlplane.config import ServerConfig
from trustmesh.controlplane.console import Console, ConsoleSettings, Upstream, serve_console, static_dir
from trustmesh.controlplane.detection import DetectionService
from trustmesh.controlplane.duties import leader_duties
from trustmesh.controlplane.flow_store import FlowRollups
from trustmesh.controlplane.issuance import IssuanceService
from trustmesh.controlplane.leader import LeaderElection
from trustmesh.controlplane.oidc_discovery import OidcDiscovery, serve_oidc_discovery
from trustmesh.controlplane.operators import Operators
from trustmesh.controlplane.quarantine import QuarantineService
from trustmesh.controlplane.registry_view import CAJournalChanged, RegistryEvent, RegistrySubscriber, RegistryView
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.status import AgentPresence, Listeners, StatusService, expected_listeners
from trustmesh.controlplane.store import Store, open_store
from trustmesh.controlplane.sync_service import SyncService
from trustmesh.controlplane.trace_log import SUBDIRECTORY as TRACE_DIRECTORY
from trustmesh.controlplane.trace_log import TraceLog
from trustmesh.errors import KeyEncryptionError, StoreError, UnavailableError
from trustmesh.files import ensure_directory
from trustmesh.hostport import cannot_listen, join_host_port, split_host_port
from trustmesh.httpserver import HttpServer
from trustmesh.keys import generate_private_key
from trustmesh.logs import log_event
from trustmesh.metrics import serve_metrics
from trustmesh.naming import server_dns_name, server_id
from trustmesh.tls import rotating_server_context, server_context_from_files

log = logging.getLogger("trustmesh.server")

KEK_ENV = "TRUSTMESH_KEK"
SERVER_SVID_TTL = timedelta(hours=1)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def load_kek(config: ServerConfig) -> KeyEncryptionKey:
    """The KEK comes from --kek-file, else $TRUSTMESH_KEK, else (embedded store only) a file
    generated into the data directory on first start. Replicas on etcd must share one KEK,
    so generating one there would split the CA: that is an error instead."""
    if config.kek_file is not None:
        return KeyEncryptionKey.from_file(config.kek_file)
    if os.environ.get(KEK_ENV):
        return KeyEncryptionKey.from_env(KEK_ENV)
    if not config.embedded:
        raise KeyEncryptionError(
            "a shared key-encryption key is required with an etcd store: "
            f"pass --kek-file FILE (32 random bytes, mode 0600) or set {KEK_ENV}; "
            "create one with `head -c 32 /dev/urandom > kek.bin && chmod 600 kek.bin`"
        )
    path = config.data_dir / "kek.bin"
    if not path.exists():
        KeyEncryptionKey.generate_into(path)
        log_event(log, "kek_generated", path=str(path))
    return KeyEncryptionKey.from_file(path)


def load_ca_keys(config: ServerConfig, kek: KeyEncryptionKey) -> tuple[KeyManager, UpstreamAuthority | None]:
    """Where the CA keys live (the KEK, or an HSM token) and the upstream CA, if any, as the
    options say; a token that cannot be opened is an error at start, never software keys."""
    token: Pkcs11Token | None = None
    if config.pkcs11_module and config.pkcs11_token_label and config.pkcs11_pin_file:
        token = Pkcs11Token(config.pkcs11_module, config.pkcs11_token_label, read_pin(config.pkcs11_pin_file))
    try:
        keys = KeyManager(kek, token if config.key_manager == "pkcs11" else None,
                          signing_keys_in_token=config.pkcs11_signing_ca)
        upstream = None
        if config.upstream_ca_cert and config.upstream_ca_key:
            upstream = UpstreamAuthority.load(config.upstream_ca_cert, config.upstream_ca_key, token, utc_now())
    except BaseException:
        if token is not None:
            token.close()
        raise
    if token is not None:
        log_event(log, "hsm_ready", module=str(token.module), token=token.label, key_manager=config.key_manager,
                  signing_ca_in_hsm=config.pkcs11_signing_ca)
    return keys, upstream


class ServingCredentials:
    """The server's own TLS identity, re-read by gRPC at every handshake so a rotated SVID
    (or a new root in the bundle) takes effect without a restart."""

    def __init__(self, ca: CertificateAuthority, config: ServerConfig) -> None:
        self._ca = ca
        self._config = config
        self._current: grpc.ServerCertificateConfiguration | None = None
        self._changed = False
        self.not_before: datetime | None = None
        self.not_after: datetime | None = None
        self.roots: frozenset[bytes] = frozenset()  # fingerprints of the client-certificate roots in use
        # The current SVID for other TLS listeners (the bundle endpoint, the console); version
        # counts renewals. roots_pem: the roots it chains to, for clients of our own listeners.
        self.version = 0
        self.chain_pem = b""
        self.key_pem = b""
        self.roots_pem = b""

    def roots_changed(self) -> bool:
        return self.roots != frozenset(c.fingerprint(hashes.SHA256()) for c in self._ca.x509_authorities())

    async def renew(self) -> None:
        key = generate_private_key("ec-p256")
        host = split_host_port(self._config.bind, listening=True)[0]
        dns = [server_dns_name(self._config.trust_domain), "localhost"]
        if host and host not in dns and not host.replace(".", "").isdigit() and ":" not in host:
            dns.append(host)
        svid = await self._ca.sign_public_key(key.public_key(), server_id(self._config.trust_domain),
                                              SERVER_SVID_TTL, dns)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        authorities = self._ca.x509_authorities()
        self.roots = frozenset(c.fingerprint(hashes.SHA256()) for c in authorities)
        roots = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in authorities)
        self._current = grpc.ssl_server_certificate_configuration([(key_pem, svid.chain_pem())], roots)
        self.chain_pem, self.key_pem, self.roots_pem = svid.chain_pem(), key_pem, roots
        self.version += 1
        self._changed = True
        self.not_before, self.not_after = svid.issued_at, svid.expires_at
        log_event(log, "server_svid_issued", spiffe_id=svid.spiffe_id, expires_at=svid.expires_at.isoformat())

    def initial(self) -> grpc.ServerCertificateConfiguration:
        assert self._current is not None
        self._changed = False
        return self._current

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC per handshake: None means "keep the current configuration".
        if not self._changed:
            return None
        self._changed = False
        return self._current

    def credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        # grpcio offers "require and verify" or "do not ask" for client certificates, nothing
        # in between; so the Node API (agents present their SVID, verified against our roots)
        # and first-time attestation (no client certificate yet) listen on separate ports.
        return grpc.dynamic_ssl_server_credentials(self.initial(), self.fetch,
                                                   require_client_authentication=require_client_cert)


async def _rotation_loop(rt: ServerRuntime, creds: ServingCredentials, stop: asyncio.Event) -> None:
    """Keep this replica's signing CA and serving SVID current.

    Wakes every 5 s, and at once when the CA journal changes: a new root prepared anywhere
    must reach the roots this server checks client certificates against before anything
    chains to it, and a root activated by another replica means this replica's signing CA
    must move under it.
    """
    ca = rt.ca
    while not stop.is_set():
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(ca.changed.wait())}
        _, pending = await asyncio.wait(waiters, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        if stop.is_set():
            return
        ca.changed.clear()
        now = ca._clock()  # noqa: SLF001 - one clock for the CA and its rotation
        try:
            if ca.needs_signing_ca_rotation(now) or ca.signing_root_id != ca.journal.active_root().id:
                await ca.rotate_signing_ca()
                log_event(log, "signing_ca_rotated", root=ca.signing_root_id,
                          not_after=ca.signing_ca.not_valid_after_utc.isoformat())
                await creds.renew()
            elif creds.roots_changed() or (creds.not_before and creds.not_after
                                           and needs_rotation(creds.not_before, creds.not_after, now)):
                await creds.renew()
        except (StoreError, UnavailableError) as err:
            # The store or the HSM is briefly unreachable (an etcd member died, a token was
            # reconnected): the current signing CA and SVID stay valid for hours; try again
            # at the next tick.
            log_event(log, "rotation_deferred", level=logging.WARNING, error=str(err))


def republish_ca(ca: CertificateAuthority, bundle_path: Path) -> RegistrySubscriber:
    """The registry view's subscriber for CA journal changes: another replica (or our own
    rotation) moved the journal, so pick up the new roots and keys and rewrite bundle.pem.
    The view awaits it before it wakes every agent to receive the new bundle."""

    async def on_event(event: RegistryEvent) -> None:
        if isinstance(event, CAJournalChanged):
            await ca.reload()
            ca.write_bundle_pem(bundle_path)

    return on_event


def _dial(bound: str, port: int) -> str:
    """Where this process reaches one of its own listeners bound at `bound` (its port was
    `port`): the same host, or loopback for every interface."""
    host = split_host_port(bound, listening=True)[0]
    return join_host_port({"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port)


def _listen(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials, flag: str) -> int:
    try:
        # gRPC reads `host:port` only; `:8081` (every interface) is spelled out for it.
        port: int = server.add_secure_port(join_host_port(*split_host_port(address, listening=True)), creds)
        return port
    except RuntimeError as err:
        raise cannot_listen(address, flag) from err


def _add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def _grpc_server(layer: CallLayer, max_receive: int = MAX_MESSAGE_BYTES) -> grpc.aio.Server:
    """A gRPC server whose every call goes through `layer`: authentication, the per-method
    authorization table, error mapping and call metrics (controlplane/api/calls.py)."""
    return grpc.aio.server(interceptors=[layer], options=[
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # grpc sets SO_REUSEPORT by default: a second server (another trust domain, say) could
        # then bind our port too and take a share of our agents' connections. Ours alone.
        ("grpc.so_reuseport", 0),
    ])


async def _start_admin_server(rt: ServerRuntime, admin: AdminServicer, sock: AdminSocket) -> grpc.aio.Server:
    """The admin API on the unix socket (mode 0600), each caller named by its uid (local_socket.py)."""
    server = _grpc_server(CallLayer(callers.local_admins(sock), rt.metrics))
    admin.register(server)
    _add_health(server)
    await sock.start(server)
    return server


async def run_server(config: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set or SIGTERM/SIGINT arrives."""
    ensure_directory(config.data_dir, "--data-dir")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    kek = load_kek(config)
    keys, upstream_ca = await asyncio.to_thread(load_ca_keys, config, kek)
    store: Store = await open_store(config.store, config.data_dir, etcd_security=config.etcd_security)
    node_server: grpc.aio.Server | None = None
    attest_server: grpc.aio.Server | None = None
    remote_admin: grpc.aio.Server | None = None
    login_server: grpc.aio.Server | None = None
    admin_server: grpc.aio.Server | None = None
    admin_socket: AdminSocket | None = None
    metrics_server: HttpServer | None = None
    bundle_server: HttpServer | None = None
    oidc_server: HttpServer | None = None
    console: Console | None = None
    console_server: HttpServer | None = None
    ca: CertificateAuthority | None = None
    anchor: AuditAnchor | None = None
    try:
        ca = await CertificateAuthority.load_or_create(
            CAConfig(trust_domain=config.trust_domain, replica_id=config.replica_id,
                     root_ttl=config.root_ttl, ca_ttl=config.ca_ttl,
                     # A signing CA key in the token is used by this process only.
                     signing_workers=0 if config.pkcs11_signing_ca else config.signing_workers,
                     jwt_issuer=config.oidc_issuer),
            store, keys, upstream=upstream_ca,
        )
        ca.write_bundle_pem(config.bundle_path)
        rt = ServerRuntime(config=config, store=store, ca=ca, audit=AuditLog(store, kek.derive("audit-chain")))
        anchor = await integrity.protect(rt, kek.derive)
        store_ops = rt.metrics.counter("trustmesh_store_operations_total", "requests this replica sent to the store",
                                       ["operation"])
        store.observe(lambda op: store_ops.inc(operation=op))

        creds = ServingCredentials(ca, config)
        await creds.renew()
        # The registry view follows the store's change feed and is what every API reads;
        # its subscribers: the CA reload (first, so agents are woken with the new bundle)
        # and the open sync streams.
        view = RegistryView(store, config.trust_domain, rt.metrics, rt.clock)
        view.subscribe(republish_ca(ca, config.bundle_path))
        # One agent identity, one place: the guard authenticates every agent call against the
        # node records and the agent's live streams, and marks suspected clones.
        guard = CloneGuard(view, store, rt.audit, rt.metrics, rt.clock)
        sync = SyncService(view, ca.bundle, rt.metrics, rt.clock, guard)
        view.subscribe(sync.on_registry_event)
        # Agents: attestation, then signing (issuance) and the push of what they may use (sync).
        rollups = FlowRollups(rt, view, config.replica_id)
        # Quarantine: stored and audited here, enforced through the view (every agent's policy,
        # and issuance refuses SVIDs); the admin API and the detectors put identities in it.
        quarantines = QuarantineService(rt, view)
        # The per-minute flow trace (`flows export --format jsonl`, `detect replay`) on this replica's
        # disk; the detection service adds every accepted report to it.
        trace_log = TraceLog(config.data_dir / TRACE_DIRECTORY, config.flow_retention.total_seconds(), rt.metrics,
                             rt.clock)
        issuance = IssuanceService(rt, view, rollups=rollups)
        # Continuous verification: every accepted flow report through the detectors; their
        # response rules alert or quarantine. Baselines survive restarts, sealed with the KEK.
        detection = DetectionService(rt, view, quarantines, trace_log, learn=config.learn.total_seconds(),
                                     dry_run=config.detect_dry_run == "on", webhooks=config.alert_webhook,
                                     state_dir=config.data_dir, sealer=kek)
        detection.load()
        issuance.detection = detection
        attestor = NodeAttestor(rt)
        node = NodeServicer(view, attestor, issuance, sync, guard)
        operators = Operators(rt, kek)
        # Health facts for `trustmesh check` (GetStatus) and /readyz: listeners report as they bind.
        presence = AgentPresence(sync, rt.clock)
        listening = Listeners(expected_listeners(config))
        status = StatusService(rt, presence, listening, creds, view.ready.is_set)
        admin = AdminServicer(AdminServices.of(rt, operators, rollups, quarantines, trace_log, sync, status))
        td = config.trust_domain
        node_server = _grpc_server(CallLayer(callers.agents(td, guard), rt.metrics))
        node.register(node_server)
        health_servicer = _add_health(node_server)
        attest_server = _grpc_server(CallLayer(callers.anonymous, rt.metrics), max_receive=64 * 1024)
        node.register_attestation(attest_server)
        attest_health = _add_health(attest_server)
        port = _listen(node_server, config.bind, creds.credentials(require_client_cert=True), "--bind")
        attest_port = _listen(attest_server, config.attest_address, creds.credentials(require_client_cert=False),
                              "--attest-bind")
        await node_server.start()
        await attest_server.start()
        listening.up("node", _dial(config.bind, port))
        listening.up("attest", _dial(config.attest_address, attest_port))
        admin_socket = AdminSocket(config.admin_socket_path)
        admin_server = await _start_admin_server(rt, admin, admin_socket)
        listening.up("admin_socket", str(config.admin_socket_path))
        remote_admin_port = login_port = 0
        if config.admin_bind:
            remote_admin = _grpc_server(CallLayer(callers.remote_admins(td, view, operators), rt.metrics,
                                                  on_denied=callers.audit_admin_denials(rt.audit),
                                                  step_up=callers.operator_step_up(operators)))
            admin.register(remote_admin)
            remote_admin_port = _listen(remote_admin, config.admin_bind, creds.credentials(require_client_cert=True),
                                        "--admin-bind")
            # Operators enroll and log in without a certificate: a listener of its own that
            # serves only that (grpcio cannot ask for an optional client certificate).
            login_server = _grpc_server(CallLayer(callers.anonymous, rt.metrics), max_receive=64 * 1024)
            OperatorLoginServicer(operators).register(login_server)
            login_port = _listen(login_server, config.login_address or "", creds.credentials(require_client_cert=False),
                                 "--login-bind")
            await remote_admin.start()
            await login_server.start()
            listening.up("admin", _dial(config.admin_bind, remote_admin_port))
            listening.up("login", _dial(config.login_address or "", login_port))
        console_address = "off"
        if config.console_bind and config.admin_bind and config.login_address:
            # The console is a client of the two listeners just started, by their bound ports:
            # operators log in there and every call is theirs (console/admin.py).
            console_upstream = Upstream(admin_address=_dial(config.admin_bind, remote_admin_port),
                                login_address=_dial(config.login_address, login_port),
                                server_name=server_dns_name(td), roots=lambda: creds.roots_pem)
            console = Console(ConsoleSettings(console_upstream, static_dir(), config.console_session_ttl))
            console_ctx = (server_context_from_files(config.console_cert, config.console_key,
                                                     "--console-cert/--console-key")
                           if config.console_cert and config.console_key else rotating_server_context(creds))
            console_server = await serve_console(console, config.console_bind, console_ctx)
            console_address = console_server.address
            listening.up("console", console_address)
        if config.metrics:
            host, mport = split_host_port(config.metrics, listening=True)
            metrics_server = await serve_metrics(rt.metrics, host, mport, ready=status.readiness)
            listening.up("metrics", metrics_server.address)
        bundle_address = "off"
        if config.bundle_endpoint:
            endpoint = BundleEndpoint(ca.bundle, config.bundle_refresh_hint, rt.metrics)
            ctx = (rotating_server_context(creds) if config.bundle_endpoint_profile == "https_spiffe"
                   else server_context_from_files(config.bundle_endpoint_cert, config.bundle_endpoint_key,  # type: ignore[arg-type]
                                                  "--bundle-endpoint-cert/--bundle-endpoint-key"))
            try:
                bundle_server = await serve_bundle_endpoint(endpoint, config.bundle_endpoint, ctx)
            except OSError as err:
                raise cannot_listen(config.bundle_endpoint, "--bundle-endpoint", err) from err
            bound = bundle_server.sockets[0].getsockname()
            bundle_address = f"{bound[0]}:{bound[1]}"
            listening.up("bundle_endpoint", _dial(config.bundle_endpoint, bound[1]))
        oidc_address = "off"
        if config.oidc_discovery_bind and config.oidc_issuer:
            # OIDC discovery for relying parties of JWT-SVIDs (cloud IAM, Vault): the JWT keys
            # from the same bundle, so they follow rotation (oidc_discovery.py).
            discovery = OidcDiscovery(config.oidc_issuer, ca.bundle, rt.metrics)
            oidc_ctx = (server_context_from_files(config.oidc_discovery_cert, config.oidc_discovery_key,
                                                  "--oidc-discovery-cert/--oidc-discovery-key")
                        if config.oidc_discovery_cert and config.oidc_discovery_key else rotating_server_context(creds))
            oidc_server = await serve_oidc_discovery(discovery, config.oidc_discovery_bind, oidc_ctx)
            oidc_address = oidc_server.address
            listening.up("oidc_discovery", _dial(config.oidc_discovery_bind, oidc_server.port))
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(view.run(stop), name="registry-view")
            tasks.create_task(_rotation_loop(rt, creds, stop), name="rotation")
            tasks.create_task(issuance.flows.run(stop), name="flow-audit")
            tasks.create_task(issuance.quarantine_refusals.run(stop), name="quarantine-refusals-audit")
            tasks.create_task(rollups.run(stop), name="flow-rollups")
            tasks.create_task(trace_log.run(stop), name="flow-trace")
            tasks.create_task(detection.run(stop), name="detection")
            tasks.create_task(anchor.run(stop), name="audit-anchor")
            tasks.create_task(attestor.failures.run(stop), name="attestation-failures-audit")
            tasks.create_task(guard.run(stop), name="clone-guard")
            tasks.create_task(presence.run(stop), name="agent-presence")
            if console is not None:
                tasks.create_task(console.run(stop), name="console-sessions")
            election = LeaderElection(store, config.replica_id, rt.metrics, ttl=config.leader_ttl)
            tasks.create_task(election.run(stop, lambda: leader_duties(rt, flows=rollups)), name="leader-election")
            # `ready` (and SERVING) only once the registry is loaded: before that every agent
            # call would be answered "still loading, retry".
            loaded = asyncio.create_task(view.ready.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({loaded, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if loaded.done():
                await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
                await attest_health.set("", health_pb2.HealthCheckResponse.SERVING)
                bind_host = split_host_port(config.bind, listening=True)[0]
                log_event(
                    log, "ready",
                    trust_domain=config.trust_domain, bind=f"{bind_host}:{port}",
                    attest_bind=f"{split_host_port(config.attest_address, listening=True)[0]}:{attest_port}",
                    admin_socket=str(config.admin_socket_path),
                    admin_bind=(f"{split_host_port(config.admin_bind, listening=True)[0]}:{remote_admin_port}"
                                if config.admin_bind else "off"),
                    login_bind=(f"{split_host_port(config.login_address, listening=True)[0]}:{login_port}"
                                if config.login_address else "off"),
                    store=config.store.split("://", 1)[0],
                    bundle=str(config.bundle_path), root_sha256=ca.root.fingerprint(hashes.SHA256()).hex(),
                    metrics=config.metrics or "off", replica=config.replica_id, bundle_endpoint=bundle_address,
                    console_bind=console_address, oidc_discovery=oidc_address,
                )
            loaded.cancel()
            await stopping
        log_event(log, "stopping")
    finally:
        if console is not None:
            await console.close()  # every session ends: live streams close, operator keys are dropped
        if console_server is not None:
            await console_server.wait_closed()
        for grpc_server in (node_server, attest_server, remote_admin, login_server):
            if grpc_server is not None:
                await grpc_server.stop(grace=1)
        if admin_server is not None:
            await admin_server.stop(grace=1)
        if admin_socket is not None:
            await admin_socket.close()
        for plain in (metrics_server, bundle_server, oidc_server):
            if plain is not None:
                plain.close()
        if ca is not None:
            ca.close()  # the signing workers exit with the server
        keys.close()
        if anchor is not None:
            await anchor.flush()  # the events of the last moments, once nothing appends any more
        await store.close()
