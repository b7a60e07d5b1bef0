"""The node agent's composition root.

Top to bottom: hold the data directory (one agent per directory: a second exits at once,
naming the first's pid), serve the metrics endpoint, load the trust bundle, load the stored
agent identity or attest once, build the node client, the SVID cache and the sync stream,
start the Workload API socket, then run every component in one TaskGroup (the first failure
stops the rest) until SIGTERM/SIGINT; `ready` is logged once the socket serves and the first
sync (from the server, or the state kept on disk) is in, or after a short wait without one.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import resource
import signal
from collections.abc import Awaitable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.agent.attestation import (
    BUNDLE_FILE,
    NO_IDENTITY_HINT,
    SVID_FILE,
    AgentAttestationError,
    AgentIdentity,
    AgentRenewer,
    AttestServerUnreachableError,
    RenewerConfig,
    TokenRefusedError,
    attest,
    has_spiffe_id,
    inspect_identity,
    load_roots,
    load_x509pop,
    save_bundle,
    save_identity,
    trust_domain_of_roots,
)
from trustmesh.agent.authorize import Authorizer
from trustmesh.agent.caller_binding import CallerBinder
from trustmesh.agent.config import AgentConfig
from trustmesh.agent.localpeer import PeerResolver
from trustmesh.agent.node_client import NodeClient, ServerState, server_untrusted, untrusted_message
from trustmesh.agent.proxy.listeners import Flow, InboundListener, OutboundListener, ServiceConfig
from trustmesh.agent.proxy.reporter import FlowReporter
from trustmesh.agent.svid_cache import SvidCache
from trustmesh.agent.sync import SyncClient
from trustmesh.agent.workload_api import WorkloadAPI, WorkloadAPIServer
from trustmesh.agent.workload_attestor import WorkloadAttestor
from trustmesh.backoff import backoff_delay
from trustmesh.bundle import Bundle
from trustmesh.clock import format_utc
from trustmesh.errors import TrustmeshError
from trustmesh.files import ensure_directory
from trustmesh.hostport import split_host_port
from trustmesh.logs import RateLimitedLog, log_event
from trustmesh.metrics import Readiness, Registry, serve_metrics
from trustmesh.policy import Policy
from trustmesh.spiffeid import TrustDomain

log = logging.getLogger("trustmesh.agent")

FIRST_SYNC_WAIT = 10.0
LOCK_FILE = "agent.lock"


class DataDirInUseError(TrustmeshError):
    """Another agent process runs on this data directory."""


class _Stopped(Exception):
    """Raised inside the TaskGroup to stop every task on SIGTERM."""


def _pem(certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _trust_domain(config: AgentConfig, roots: list[x509.Certificate]) -> TrustDomain:
    if config.trust_domain is not None and not any(has_spiffe_id(root) for root in roots):
        # The bank's own root above the mesh (an upstream authority) names no trust domain.
        return config.trust_domain
    found = trust_domain_of_roots(roots)
    if config.trust_domain is not None and config.trust_domain != found:
        raise AgentAttestationError(f"--trust-domain {config.trust_domain} does not match the trust bundle, whose "
                                    f"root is of {found}; pass the bundle.pem of the right server")
    return found


def _bundle_source(config: AgentConfig) -> Path:
    """Where the agent's roots come from: the bundle kept from the server is newer than the
    bootstrap one given with --trust-bundle (it follows root rotations)."""
    stored = config.data_dir / BUNDLE_FILE
    return stored if stored.exists() else config.trust_bundle


async def _obtain_identity(config: AgentConfig, stop: asyncio.Event, metrics: Registry | None = None,
                           state: ServerState | None = None) -> tuple[AgentIdentity, list[x509.Certificate]]:
    """The stored identity, or a new one from attestation (retried while no server answers)."""
    metrics = metrics or Registry()
    state = state or ServerState(metrics)
    bundle_path = _bundle_source(config)
    roots = load_roots(bundle_path)
    td = _trust_domain(config, roots)
    identity, why_not = inspect_identity(config.data_dir, roots, td)
    if identity is not None:
        log_event(log, "identity_loaded", spiffe_id=identity.spiffe_id, expires_at=identity.expires_at.isoformat())
        return identity, roots
    x509pop = None
    if config.x509pop_cert is not None and config.x509pop_key is not None:
        x509pop = load_x509pop(config.x509pop_cert, config.x509pop_key)
    if config.join_token is None and x509pop is None:
        raise AgentAttestationError(f"{why_not}: {NO_IDENTITY_HINT}")
    rotation = config.rotation
    failures = metrics.counter("trustmesh_agent_attest_failures_total", "attestation attempts that reached no "
                               "server, or only one the trust bundle does not trust", ["reason"])
    attempt = 0
    while True:
        try:
            identity, bundle = await attest(config.attest_addresses, _pem(roots), td, join_token=config.join_token,
                                            x509pop=x509pop)
            break
        except TokenRefusedError as err:
            log_event(log, "token_refused", level=logging.ERROR, reason="token_refused", detail=str(err))
            raise
        except AttestServerUnreachableError as err:
            # The token is not spent: wait for the server rather than make the operator retry.
            delay = backoff_delay(attempt, base=rotation.backoff_base, cap=rotation.backoff_cap)
            reason = await _attest_failed(config, roots, td, bundle_path, state, err, attempt, delay)
            failures.inc(reason=reason)
            attempt += 1
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                continue
            raise AgentAttestationError("stopped before the agent could attest") from err
    save_identity(config.data_dir, identity)
    save_bundle(config.data_dir, bundle)
    log_event(log, "attested", spiffe_id=identity.spiffe_id, expires_at=identity.expires_at.isoformat())
    return identity, list(bundle.x509_authorities) or roots


async def _attest_failed(config: AgentConfig, roots: list[x509.Certificate], td: TrustDomain, bundle_path: Path,
                         state: ServerState, err: AttestServerUnreachableError, attempt: int, delay: float) -> str:
    """Say why attestation failed: a server that answers with a certificate our bundle does not
    trust (once, at ERROR: retrying cannot fix it), or no server at all (each attempt)."""
    for address in config.attest_addresses:
        why = await server_untrusted(address, _pem(roots), td)
        if why is None:
            continue
        if state.set("untrusted"):
            log_event(log, "server_untrusted", level=logging.ERROR, server=address,
                      error=untrusted_message(bundle_path, bundle_path != config.trust_bundle), detail=why)
        else:
            log_event(log, "server_untrusted", level=logging.DEBUG, server=address, detail=why, attempt=attempt)
        return "untrusted"
    state.set("unreachable")
    log_event(log, "server_unreachable", level=logging.WARNING, call="Attest", detail=str(err),
              attempt=attempt, retry_in=round(delay, 1))
    return "unreachable"


async def _wait_briefly(waiting: Awaitable[None], timeout: float) -> None:
    try:
        await asyncio.wait_for(waiting, timeout)
    except asyncio.TimeoutError:
        log_event(log, "no_sync_yet", level=logging.WARNING, waited_seconds=timeout)


async def _start_service(service: ServiceConfig, cache: SvidCache, flow: Flow,
                         inbound: list[InboundListener], outbound: list[OutboundListener]) -> None:
    """Start a service's listeners once the agent holds its SVID (it may take a sync)."""
    version = cache.version
    while cache.svid_for(service.spiffe_id) is None:
        try:
            version = await asyncio.wait_for(cache.wait_for_change(version), 30)
        except asyncio.TimeoutError:
            log_event(log, "service_waiting_for_svid", level=logging.WARNING, service=service.name,
                      spiffe_id=service.spiffe_id,
                      hint="register an entry for this SPIFFE ID on this node (parent: this agent)")
    if service.inbound is not None:
        listener = InboundListener(service, flow)
        await listener.start()
        inbound.append(listener)
    for route in service.outbound:
        out = OutboundListener(service, route, flow)
        await out.start()
        outbound.append(out)


async def _announce_ready(cache: SvidCache, identity: AgentIdentity, config: AgentConfig) -> None:
    # `ready` means "serving what this node may have": give the first sync a moment; in an
    # outage at first start it serves as soon as entries arrive.
    await _wait_briefly(cache.wait_until_synced(), FIRST_SYNC_WAIT)
    log_event(log, "ready", spiffe_id=identity.spiffe_id, socket=str(config.socket_path),
              servers=",".join(config.server), metrics=config.metrics or "off")


def hold_data_dir(data_dir: Path) -> int:
    """Lock the data directory for this process (the lock goes with the process, however it
    ends), or raise naming the pid of the agent that holds it: two agents on one directory
    would both run as the same node, on the same key and socket."""
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise TrustmeshError(f"cannot open the lock file {path}: {err.strerror}; check --data-dir and its "
                             "permissions") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirInUseError(f"another agent (pid {holder}) is running on the data directory {data_dir}; "
                                "stop it first, or give this agent its own --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def raise_descriptor_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (every local user may
    connect to the agent; the systemd unit sets LimitNOFILE=65536). Returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep what we have; the log line below says how much that is
    return soft


def quiet_resource_errors(loop: asyncio.AbstractEventLoop, metrics: Registry) -> None:
    """asyncio logs every failed accept() (out of descriptors: many lines a second under a
    flood); count them and log each kind at most once a minute instead."""
    errors = metrics.counter("trustmesh_agent_loop_errors_total",
                             "errors asyncio reported outside any handler, by errno", ["error"])
    limited = RateLimitedLog(log, 60.0)

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        err = context.get("exception")
        if isinstance(err, OSError) and err.errno in _RESOURCE_ERRNOS:
            name = errno.errorcode.get(err.errno or 0, "OSError")
            errors.inc(error=name)
            limited.log(("loop", name), "resource_exhausted", level=logging.ERROR,
                        error=f"{context.get('message', '')}: {err.strerror}")
            return
        _loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def run_agent(config: AgentConfig, stop: asyncio.Event | None = None) -> None:
    # 0711: other users may reach the Workload API socket inside by name, but cannot list the
    # directory; the agent key and state files in it are 0600 on their own.
    ensure_directory(config.data_dir, "--data-dir")
    lock = hold_data_dir(config.data_dir)
    try:
        config.data_dir.chmod(0o711)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        descriptors = raise_descriptor_limit()
        if descriptors < 4096:
            log_event(log, "descriptor_limit_low", level=logging.WARNING, limit=descriptors,
                      hint="raise it (LimitNOFILE=65536 in the systemd unit, ulimit -n)")
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            await _run(config, stop)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
    finally:
        os.close(lock)


class AgentReadiness:
    """What the agent's /readyz answers: attested, its agent SVID unexpired, its sync stream
    connected. Workloads keep being served from the cache without the stream; readiness says
    the node is not getting changes (new entries, policy, revocations) until it is back."""

    def __init__(self, server_state: ServerState) -> None:
        self.server_state = server_state
        self.client: NodeClient | None = None  # set once the agent holds an identity

    def check(self) -> Readiness:
        state = self.server_state.state
        if self.client is None:
            return Readiness(False, f"not attested yet (control plane {state})")
        expires = self.client.identity.expires_at
        if expires <= datetime.now(timezone.utc):
            return Readiness(False, f"the agent SVID expired at {format_utc(expires)} (control plane {state})")
        if state != "connected":
            return Readiness(False, f"the sync stream to the control plane is not connected ({state})")
        return Readiness(True)


async def _run(config: AgentConfig, stop: asyncio.Event) -> None:
    metrics = Registry()
    quiet_resource_errors(asyncio.get_running_loop(), metrics)
    readiness = AgentReadiness(ServerState(metrics))
    # Served from the start, so an agent that cannot attest yet is seen, and seen why.
    metrics_server = None
    if config.metrics:
        host, port = split_host_port(config.metrics, listening=True)
        metrics_server = await serve_metrics(metrics, host, port, ready=readiness.check)
    try:
        await _serve(config, stop, metrics, readiness)
    finally:
        if metrics_server is not None:
            metrics_server.close()


async def _serve(config: AgentConfig, stop: asyncio.Event, metrics: Registry, readiness: AgentReadiness) -> None:
    server_state = readiness.server_state
    identity, roots = await _obtain_identity(config, stop, metrics, server_state)
    td = identity.spiffe_id.trust_domain
    bundle_path = _bundle_source(config)
    client = NodeClient(config.server, _pem(roots), td, identity, bundle_path=bundle_path,
                        bundle_from_server=bundle_path != config.trust_bundle)
    readiness.client = client
    cache = SvidCache(td, client, metrics, rotation=config.rotation)
    # The SVID file was written when the identity arrived (attested just now, or renewed
    # before a restart): renewal is timed from then, not from the back-dated NotBefore.
    received_at = datetime.fromtimestamp((config.data_dir / SVID_FILE).stat().st_mtime, timezone.utc)
    renewer = AgentRenewer(RenewerConfig(config.data_dir, config.rotation), client, metrics, received_at=received_at)

    def own_bundle_changed(bundle: Bundle) -> None:
        if bundle.x509_authorities:
            save_bundle(config.data_dir, bundle)
            client.use_roots(bundle.x509_authorities_pem())

    reporter = FlowReporter(lambda req: client.stub().ReportFlows(req, timeout=30), metrics)
    inbound: list[InboundListener] = []
    outbound: list[OutboundListener] = []

    quarantined: list[frozenset[str]] = [frozenset()]

    def policy_changed(policy: Policy) -> None:
        # Continuous verification: a withdrawn allow closes the connections it allowed, and a
        # quarantine (of a source, a service, a destination or this node) cuts both directions.
        for listener in inbound:
            listener.recheck()
        for route in outbound:
            route.recheck()
        if quarantined[0] - policy.quarantined:
            cache.retry_refused()  # released: its SVIDs were refused while it was in quarantine
        quarantined[0] = policy.quarantined

    sync = SyncClient(client, cache, config.data_dir, td, metrics, own_bundle_changed, on_policy=policy_changed,
                      rotation=config.rotation, server_state=server_state,
                      permissive_listeners=[f"{s.name} {s.inbound.listen}" for s in config.services
                                            if s.inbound is not None and s.inbound.mtls == "permissive"])
    # One attestor (its hash cache) and one resolver (its batched /proc scans) for every local
    # caller: Workload API, Authorize and the outbound listeners. The agent never holds a
    # caller's end of a socket, so its own descriptor table is not scanned.
    attestor, resolver = WorkloadAttestor(), PeerResolver(skip=os.getpid())
    flow = Flow(cache.svid_for, cache.bundles, lambda: sync.policy, reporter.report, metrics,
                identities=cache, refused=reporter.refused, attestor=attestor, resolver=resolver,
                traffic=reporter.traffic, unverified=reporter.unverified, node=identity.spiffe_id)
    api = WorkloadAPI(cache, CallerBinder(attestor, resolver), metrics, report=reporter.refused)
    server = WorkloadAPIServer(config.socket_path, api,
                               Authorizer(cache, api.callers, lambda: sync.policy, reporter.report, metrics))
    # The state kept on disk first: a restart during an outage serves at once.
    sync.load_persisted()

    async def stopper() -> None:
        await stop.wait()
        raise _Stopped

    try:
        await server.start()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(sync.run(), name="sync")
            tasks.create_task(cache.run(), name="svid-cache")
            tasks.create_task(renewer.run(), name="agent-renewal")
            tasks.create_task(client.run(), name="node-channels")
            tasks.create_task(reporter.run(), name="flow-reports")
            tasks.create_task(_announce_ready(cache, identity, config), name="ready")
            for service in config.services:
                tasks.create_task(_start_service(service, cache, flow, inbound, outbound), name=f"svc-{service.name}")
            tasks.create_task(stopper(), name="stop")
    except* _Stopped:
        log_event(log, "stopping")
    finally:
        for listener in inbound:
            await listener.close()
        for route in outbound:
            await route.close()
        await reporter.flush()
        await server.close()
        await client.close()
