"""The agent's configuration, as one frozen value built by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.proxy.listeners import ServiceConfig


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
    services: tuple[ServiceConfig, ...] = ()

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
