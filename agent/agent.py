"""The node agent's composition root.

Top to bottom: load the trust bundle, load the stored agent identity or attest once, build
the node client, the SVID cache and the sync stream, start the Workload API socket and the
metrics endpoint, log `ready`, and run the cache, the sync stream and agent-SVID renewal in
one TaskGroup until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable
from datetime import datetime, timezone

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.bundle import Bundle
from trustmesh.policy import Policy
from trustmesh.logs import log_event
from trustmesh.metrics import Registry, serve_metrics, split_host_port

from agent.attestation import (
    BUNDLE_FILE,
    AgentAttestationError,
    AgentIdentity,
    attest,
    load_identity,
    load_roots,
    renew,
    save_bundle,
    save_identity,
    trust_domain_of_roots,
)
from agent.backoff import backoff_delay, renew_at, seconds_until
from agent.authorize import Authorizer
from agent.config import AgentConfig
from agent.proxy.listeners import Flow, InboundListener, OutboundListener, ServiceConfig
from agent.proxy.reporter import FlowReporter
from agent.node_client import NodeClient
from agent.svid_cache import SvidCache
from agent.sync import SyncClient
from agent.workload_api import WorkloadAPI, WorkloadAPIServer
from agent.workload_attestor import WorkloadAttestor

log = logging.getLogger("trustmesh.agent")


class _Stopped(Exception):
    """Raised inside the TaskGroup to stop every task on SIGTERM."""


def _pem(certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


async def _obtain_identity(config: AgentConfig) -> tuple[AgentIdentity, list[x509.Certificate]]:
    stored_bundle = config.data_dir / BUNDLE_FILE
    roots = load_roots(stored_bundle if stored_bundle.exists() else config.trust_bundle)
    td = trust_domain_of_roots(roots)
    identity = load_identity(config.data_dir, roots, td)
    if identity is not None:
        log_event(log, "identity_loaded", spiffe_id=identity.spiffe_id, expires_at=identity.expires_at.isoformat())
        return identity, roots
    x509pop = None
    if config.x509pop_cert and config.x509pop_key:
        certs = x509.load_pem_x509_certificates(config.x509pop_cert.read_bytes())
        key = serialization.load_pem_private_key(config.x509pop_key.read_bytes(), password=None)
        x509pop = (certs, key)
    if config.join_token is None and x509pop is None:
        raise AgentAttestationError(
            "this agent has no identity yet: start it once with --join-token "
            "(create one with `trustmesh token create --node NAME`) or with --x509pop-cert/--x509pop-key"
        )
    identity, bundle = await attest(config.attest_addresses, _pem(roots), td, join_token=config.join_token,
                                    x509pop=x509pop)  # type: ignore[arg-type]
    save_identity(config.data_dir, identity)
    save_bundle(config.data_dir, bundle)
    log_event(log, "attested", spiffe_id=identity.spiffe_id, expires_at=identity.expires_at.isoformat())
    return identity, list(bundle.x509_authorities) or roots


async def _renewal_loop(client: NodeClient, config: AgentConfig) -> None:
    attempt = 0
    while True:
        identity = client.identity
        when = renew_at(identity.issued_at, identity.expires_at)
        await asyncio.sleep(seconds_until(when, datetime.now(timezone.utc)) if attempt == 0
                            else backoff_delay(attempt, cap=30))
        try:
            fresh = await renew(client.stub(), identity)
        except grpc.aio.AioRpcError as err:
            attempt += 1
            log_event(log, "agent_renewal_failed", level=logging.WARNING, code=err.code().name, detail=err.details())
            continue
        attempt = 0
        save_identity(config.data_dir, fresh)
        client.use_identity(fresh)
        log_event(log, "agent_renewed", expires_at=fresh.expires_at.isoformat())


async def _wait_briefly(waiting: Awaitable[None], timeout: float) -> None:
    try:
        await asyncio.wait_for(waiting, timeout)
    except asyncio.TimeoutError:
        log_event(log, "no_sync_yet", level=logging.WARNING, waited_seconds=timeout)


async def _supervise(task: asyncio.Task[None]) -> None:
    """Await a task started before the TaskGroup, cancelling it when the group stops."""
    try:
        await task
    finally:
        task.cancel()


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


async def run_agent(config: AgentConfig, stop: asyncio.Event | None = None) -> None:
    # 0711: other users may reach the Workload API socket inside by name, but cannot list the
    # directory; the agent key and state files in it are 0600 on their own.
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.data_dir.chmod(0o711)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    identity, roots = await _obtain_identity(config)
    td = identity.spiffe_id.trust_domain
    metrics = Registry()
    client = NodeClient(config.servers, _pem(roots), td, identity)
    cache = SvidCache(td, client, metrics)

    def own_bundle_changed(bundle: Bundle) -> None:
        if bundle.x509_authorities:
            save_bundle(config.data_dir, bundle)
            client.use_roots(bundle.x509_authorities_pem())

    reporter = FlowReporter(lambda req: client.stub().ReportFlows(req, timeout=30), metrics)
    inbound: list[InboundListener] = []

    def policy_changed(_policy: Policy) -> None:
        # Continuous verification: a withdrawn allow closes the connections it allowed.
        for listener in inbound:
            listener.recheck()

    sync = SyncClient(client, cache, config.data_dir, td, metrics, own_bundle_changed, on_policy=policy_changed)
    flow = Flow(cache.svid_for, cache.bundles, lambda: sync.policy, reporter.report, metrics)
    attestor = WorkloadAttestor()
    server = WorkloadAPIServer(config.socket_path, WorkloadAPI(cache, attestor, metrics),
                               Authorizer(cache, attestor, lambda: sync.policy, reporter.report, metrics))
    outbound: list[OutboundListener] = []
    sync.load_persisted()
    await server.start()
    metrics_server = None
    if config.metrics:
        host, port = split_host_port(config.metrics)
        metrics_server = await serve_metrics(metrics, host, port)
    async with asyncio.TaskGroup() as first:
        # Give the first sync a moment so `ready` means "serving what this node may have";
        # without a server (an outage at first start) it serves as soon as entries arrive.
        sync_task = asyncio.create_task(sync.run(), name="sync")
        first.create_task(_wait_briefly(cache.wait_until_synced(), 10.0))
    log_event(log, "ready", spiffe_id=identity.spiffe_id, socket=str(config.socket_path),
              servers=",".join(config.servers), metrics=config.metrics or "off")

    async def stopper() -> None:
        await stop.wait()
        raise _Stopped

    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(cache.run(), name="svid-cache")
            tasks.create_task(_supervise(sync_task), name="sync")
            tasks.create_task(_renewal_loop(client, config), name="agent-renewal")
            tasks.create_task(reporter.run(), name="flow-reports")
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
        if metrics_server is not None:
            metrics_server.close()
        await client.close()
