"""What one replica knows of its own health and of the deployment's (transport-free).

Two readers: the admin API's GetStatus, which `trustmesh check` turns into its list of checks
(the rules of what passes live there, next to the operator's options; this module only
gathers facts), and the metrics listener's `/readyz`, which asks `readiness()`: the registry
is loaded, the signing CA is valid, every configured listener is bound and the store answers.

Live sync streams are per replica, so `AgentPresence` remembers when this replica last saw
each agent's stream open; it samples the open streams once a second (and at every answer),
which is what "last seen" means in `trustmesh check`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.clock import format_utc
from trustmesh.controlplane.ca_admin import Authority, CAAdmin
from trustmesh.controlplane.config import ServerConfig
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store import StoreMember
from trustmesh.errors import CAError, StoreError
from trustmesh.metrics import Readiness

# A store that takes longer than this to answer one read is "not answering" for /readyz.
STORE_PROBE_TIMEOUT = 2.0
PRESENCE_INTERVAL = 1.0


class OpenStreams(Protocol):
    """The agents' open sync streams on this replica (sync_service.SyncService)."""

    def delivered_revisions(self) -> Mapping[str, int]: ...


class ServingIdentity(Protocol):
    """This replica's own TLS identity (server.ServingCredentials)."""

    chain_pem: bytes


@dataclass(frozen=True)
class StoreHealth:
    backend: str  # "sqlite" or "etcd"
    members: tuple[StoreMember, ...]
    error: str = ""  # why the store did not answer at all


@dataclass(frozen=True)
class ServerStatus:
    trust_domain: str
    replica_id: str
    time: float
    leader: str
    ready: bool
    store: StoreHealth
    authorities: tuple[Authority, ...]
    root_ttl: float
    ca_ttl: float
    agent_ttl: float
    server_svid_chain: tuple[bytes, ...]  # DER, leaf first
    listeners: Mapping[str, str]  # name -> bound address
    bundle_endpoint_profile: str
    oidc_issuer: str
    oidc_discovery_bind: str
    oidc_serves_server_svid: bool
    policy_revision: int
    agents_last_seen: Mapping[str, float]  # agent ID -> Unix seconds


def expected_listeners(config: ServerConfig) -> frozenset[str]:
    """The listeners a replica with `config` must have bound before it is ready (pure).
    OIDC discovery is counted once its listener reports itself (`Listeners.up`)."""
    names = {"node", "attest", "admin_socket"}
    if config.admin_bind:
        names |= {"admin", "login"}
        if config.console_bind and config.login_address:
            names.add("console")
    if config.metrics:
        names.add("metrics")
    if config.bundle_endpoint:
        names.add("bundle_endpoint")
    return frozenset(names)


class Listeners:
    """The listeners this replica has bound, by name; server.py reports each as it starts."""

    def __init__(self, expected: frozenset[str]) -> None:
        self._expected = set(expected)
        self._bound: dict[str, str] = {}

    def up(self, name: str, address: str) -> None:
        self._bound[name] = address
        self._expected.add(name)

    def bound(self) -> dict[str, str]:
        return dict(self._bound)

    def missing(self) -> list[str]:
        return sorted(self._expected - set(self._bound))


class AgentPresence:
    """When this replica last saw each agent's sync stream open (in memory: since it started)."""

    def __init__(self, streams: OpenStreams, clock: Callable[[], float]) -> None:
        self._streams = streams
        self._clock = clock
        self._last: dict[str, float] = {}

    def observe(self) -> dict[str, float]:
        now = self._clock()
        for agent in self._streams.delivered_revisions():
            self._last[agent] = now
        return dict(self._last)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.observe()
            try:
                await asyncio.wait_for(stop.wait(), PRESENCE_INTERVAL)
            except asyncio.TimeoutError:
                pass


def pem_chain_der(chain_pem: bytes) -> tuple[bytes, ...]:
    if not chain_pem:
        return ()
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(chain_pem))


class StatusService:
    def __init__(self, rt: ServerRuntime, presence: AgentPresence, listeners: Listeners, serving: ServingIdentity,
                 registry_ready: Callable[[], bool]) -> None:
        self._rt = rt
        self._presence = presence
        self._listeners = listeners
        self._serving = serving
        self._registry_ready = registry_ready

    async def store_health(self) -> StoreHealth:
        backend = "sqlite" if self._rt.config.embedded else "etcd"
        try:
            members = await asyncio.wait_for(self._rt.store.members(), STORE_PROBE_TIMEOUT * 3)
        except (StoreError, asyncio.TimeoutError) as err:
            return StoreHealth(backend, (), str(err) or "did not answer in time")
        return StoreHealth(backend, tuple(members))

    async def status(self) -> ServerStatus:
        config = self._rt.config
        store = await self.store_health()
        ca = await CAAdmin(self._rt).status()
        head = await self._rt.store.get_policy_head()
        return ServerStatus(
            trust_domain=str(config.trust_domain), replica_id=config.replica_id, time=self._rt.clock(),
            leader=ca.leader, ready=self._registry_ready(), store=store, authorities=ca.authorities,
            root_ttl=config.root_ttl.total_seconds(), ca_ttl=config.ca_ttl.total_seconds(),
            agent_ttl=config.agent_ttl.total_seconds(), server_svid_chain=pem_chain_der(self._serving.chain_pem),
            listeners=self._listeners.bound(), bundle_endpoint_profile=config.bundle_endpoint_profile,
            oidc_issuer=config.oidc_issuer or "", oidc_discovery_bind=config.oidc_discovery_bind or "",
            oidc_serves_server_svid=config.oidc_discovery_cert is None, policy_revision=head.revision if head else 0,
            agents_last_seen=self._presence.observe(),
        )

    async def readiness(self) -> Readiness:
        """Ready to serve: the registry is loaded, the signing CA is valid, every configured
        listener is bound and the store answers a read (in that order; the first miss is the reason)."""
        if not self._registry_ready():
            return Readiness(False, "the registry is still loading from the store")
        try:
            expires = self._rt.ca.signing_ca.not_valid_after_utc
        except CAError as err:
            return Readiness(False, f"no signing CA: {err}")
        if expires <= datetime.fromtimestamp(self._rt.clock(), timezone.utc):
            return Readiness(False, f"the signing CA expired at {format_utc(expires.timestamp())}")
        if missing := self._listeners.missing():
            return Readiness(False, f"not listening yet: {', '.join(missing)}")
        try:
            await asyncio.wait_for(self._rt.store.current_revision(), STORE_PROBE_TIMEOUT)
        except asyncio.TimeoutError:
            return Readiness(False, f"the store did not answer within {STORE_PROBE_TIMEOUT:g}s")
        except StoreError as err:
            return Readiness(False, f"the store does not answer: {err}")
        return Readiness(True)


__all__ = ["AgentPresence", "Listeners", "ServerStatus", "StatusService", "StoreHealth", "expected_listeners"]
