"""The server's configuration, as one frozen value built by the CLI."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from trustmesh.spiffeid import TrustDomain

# Bounds an entry's TTLs must fall within; outside them is INVALID_ARGUMENT.
MIN_X509_TTL = timedelta(seconds=1)
MAX_X509_TTL = timedelta(days=30)
MIN_JWT_TTL = timedelta(seconds=1)
MAX_JWT_TTL = timedelta(days=1)


@dataclass(frozen=True)
class ServerConfig:
    trust_domain: TrustDomain
    data_dir: Path
    store_url: str = "sqlite"
    kek_file: Path | None = None
    bind: str = "127.0.0.1:8081"
    attest_bind: str = "127.0.0.1:8082"
    admin_socket: Path | None = None
    admin_bind: str | None = None  # optional remote admin API, mTLS with admin-entry SVIDs
    default_x509_ttl: timedelta = timedelta(hours=1)
    default_jwt_ttl: timedelta = timedelta(minutes=5)
    agent_ttl: timedelta = timedelta(hours=1)
    ca_ttl: timedelta = timedelta(hours=24)
    root_ttl: timedelta = timedelta(days=365)
    metrics: str | None = None
    x509pop_ca: Path | None = None  # PEM roots that node certificates for x509pop chain to
    prune_nodes_after: timedelta = timedelta(days=1)  # forget agents whose SVID expired this long ago
    bundle_endpoint: str | None = None  # host:port serving our SPIFFE bundle to federated partners
    bundle_endpoint_profile: str = "https_spiffe"  # or "https_web" with the two files below
    bundle_endpoint_cert: Path | None = None
    bundle_endpoint_key: Path | None = None
    bundle_refresh_hint: timedelta = timedelta(minutes=5)  # spiffe_refresh_hint we publish
    leader_ttl: int = 5  # seconds; a dead leader's duties move to another replica after about this
    # processes signing X509-SVID batches (0: a thread of the server process, as before)
    signing_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    @property
    def bundle_path(self) -> Path:
        return self.data_dir / "bundle.pem"

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.data_dir / "admin.sock"

    @property
    def embedded(self) -> bool:
        return not self.store_url.startswith("etcd://")
