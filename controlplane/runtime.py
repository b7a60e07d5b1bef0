"""What every control-plane service shares, built once by `server.py`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.ca.authority import CertificateAuthority
from trustmesh.controlplane.config import ServerConfig
from trustmesh.controlplane.store import Store
from trustmesh.metrics import Registry


@dataclass
class ServerRuntime:
    config: ServerConfig
    store: Store
    ca: CertificateAuthority
    audit: AuditLog
    metrics: Registry = field(default_factory=Registry)
    clock: Callable[[], float] = time.time
