"""A real ServerRuntime for domain-service tests: SQLite store, software CA, audit log, and a
clock the test moves."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.ca.authority import CAConfig, CertificateAuthority
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.config import ServerConfig
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store import AuditEvent, open_store
from trustmesh.spiffeid import TrustDomain

TD = TrustDomain("example.org")
ADMIN = "admin:local-socket"


@dataclass
class Clock:
    now: float = time.time()

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def server_runtime(tmp_path: Path, clock: Clock | None = None) -> AsyncIterator[ServerRuntime]:
    clock = clock or Clock()
    store = await open_store("sqlite", tmp_path)
    kek = KeyEncryptionKey(bytes(range(32)))
    config = ServerConfig(trust_domain=TD, data_dir=tmp_path)
    ca = await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r1"), store, kek)
    try:
        yield ServerRuntime(config=config, store=store, ca=ca, audit=AuditLog(store, kek.derive("audit-chain"), clock),
                            clock=clock)
    finally:
        await store.close()


async def audit_events(rt: ServerRuntime, kind: str) -> list[AuditEvent]:
    return [e for e in await rt.store.list_audit_events() if e.kind == kind]
