"""The agent's configuration, as one frozen value built by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trustmesh.agent.proxy.listeners import ServiceConfig
from trustmesh.spiffeid import TrustDomain


@dataclass(frozen=True)
class RotationConfig:
    """When to renew and how to retry; the defaults suit production, tests shorten them."""

    # Renew each SVID (the agent's own and every workload's) at a random point in this
    # fraction of its lifetime: around half-life, spread so a fleet does not renew in step.
    renew_low: float = 0.45
    renew_high: float = 0.55
    # Reconnects and failed requests: capped exponential backoff with full jitter.
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    # A banned or evicted agent asks again this rarely: an operator must act first, and a
    # fleet of refused agents must not hammer the server.
    refused_retry: float = 60.0
    # An item the server refused (e.g. an entry deleted meanwhile) is asked for again after this.
    item_retry: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.renew_low <= self.renew_high < 1:
            raise ValueError("renew_low and renew_high must satisfy 0 < low <= high < 1")
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ValueError("backoff_base must be positive and at most backoff_cap")


@dataclass(frozen=True)
class AgentConfig:
    servers: tuple[str, ...]  # Node API addresses (mTLS), tried in turn
    trust_bundle: Path  # bootstrap trust bundle (PEM roots of the trust domain)
    data_dir: Path = Path("./.trustmesh/agent")
    join_token: str | None = None
    attest_servers: tuple[str, ...] = ()  # default: each server's host with port + 1
    socket: Path | None = None
    metrics: str | None = None
    x509pop_cert: Path | None = None
    x509pop_key: Path | None = None
    # None: taken from the SPIFFE ID of the bundle's root; when given, it must agree.
    trust_domain: TrustDomain | None = None
    services: tuple[ServiceConfig, ...] = ()
    rotation: RotationConfig = field(default_factory=RotationConfig)

    @property
    def socket_path(self) -> Path:
        return self.socket or self.data_dir / "workload.sock"

    @property
    def attest_addresses(self) -> tuple[str, ...]:
        if self.attest_servers:
            return self.attest_servers
        out = []
        for server in self.servers:
            host, _, port = server.rpartition(":")
            out.append(f"{host}:{int(port) + 1}")
        return tuple(out)
