"""Storage for the control plane: one typed ``Store`` over SQLite (embedded) or etcd.

No module outside this package knows which backend runs; open one with ``open_store``.
"""

from controlplane.store.kv import CompactedError
from controlplane.store.open import open_store
from controlplane.store.records import (
    AttestedNode,
    AuditEvent,
    BundleRecord,
    Change,
    JoinToken,
    PolicyRevision,
    RecordFormatError,
    RegistrationEntry,
)
from controlplane.store.store import InvalidRecordError, Store

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
