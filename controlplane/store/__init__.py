"""Storage for the control plane: one typed ``Store`` over SQLite (embedded) or etcd.

No module outside this package knows which backend runs; open one with ``open_store``.
"""

from trustmesh.controlplane.store.kv import CompactedError
from trustmesh.controlplane.store.open import open_store
from trustmesh.controlplane.store.records import (
    AttestedNode,
    AuditEvent,
    BundleRecord,
    Change,
    JoinToken,
    PolicyRevision,
    RecordFormatError,
    RegistrationEntry,
)
from trustmesh.controlplane.store.store import InvalidRecordError, Store

__all__ = [
    "AttestedNode",
    "AuditEvent",
    "BundleRecord",
    "Change",
    "CompactedError",
    "InvalidRecordError",
    "JoinToken",
    "PolicyRevision",
    "RecordFormatError",
    "RegistrationEntry",
    "Store",
    "open_store",
]
