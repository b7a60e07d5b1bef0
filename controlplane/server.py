"""The control-plane server's composition root: build the store, the KEK and the CA, then
run until told to stop.

Reads top to bottom like the flow it starts: open the store, load the key-encryption key,
load or create the CA (never silently a new one), publish the trust bundle agents bootstrap
from, announce `ready`, and wait for SIGTERM/SIGINT. The gRPC services join this list in
the control-plane issue; each is a task in one TaskGroup so the first failure stops all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from controlplane.ca.authority import CAConfig, CertificateAuthority
from controlplane.ca.kek import KeyEncryptionKey
from controlplane.store import Store, open_store
from trustmesh.errors import KeyEncryptionError
from trustmesh.logs import log_event
from trustmesh.spiffeid import TrustDomain

log = logging.getLogger("trustmesh.server")

KEK_ENV = "TRUSTMESH_KEK"


@dataclass(frozen=True)
class ServerConfig:
    trust_domain: TrustDomain
    data_dir: Path
    store_url: str = "sqlite"
    kek_file: Path | None = None
    bind: str = "127.0.0.1:8081"
    admin_socket: Path | None = None
    default_x509_ttl: timedelta = timedelta(hours=1)
    default_jwt_ttl: timedelta = timedelta(minutes=5)
    ca_ttl: timedelta = timedelta(hours=24)
    root_ttl: timedelta = timedelta(days=365)
    metrics: str | None = None
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    @property
    def bundle_path(self) -> Path:
        return self.data_dir / "bundle.pem"

    @property
    def embedded(self) -> bool:
        return not self.store_url.startswith("etcd://")


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


async def open_ca(config: ServerConfig, store: Store, kek: KeyEncryptionKey) -> CertificateAuthority:
    ca_config = CAConfig(
        trust_domain=config.trust_domain,
        root_ttl=config.root_ttl,
        ca_ttl=config.ca_ttl,
        replica_id=config.replica_id,
    )
    return await CertificateAuthority.load_or_create(ca_config, store, kek)


async def run_server(config: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set or SIGTERM/SIGINT arrives."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    kek = load_kek(config)
    store = await open_store(config.store_url, config.data_dir)
    try:
        ca = await open_ca(config, store, kek)
        ca.write_bundle_pem(config.bundle_path)
        log_event(
            log,
            "ready",
            trust_domain=config.trust_domain,
            store=config.store_url.split("://", 1)[0],
            bundle=str(config.bundle_path),
            root_sha256=ca.root.fingerprint(hashes.SHA256()).hex(),
        )
        await stop.wait()
        log_event(log, "stopping")
    finally:
        await store.close()
