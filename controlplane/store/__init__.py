"""Storage for the control plane: one typed ``Store`` over SQLite (embedded) or etcd.

No module outside this package knows which backend runs; open one with ``open_store``.
"""

from trustmesh.controlplane.store.kv import CompactedError, StoreMember
from trustmesh.controlplane.store.open import open_store
from trustmesh.controlplane.store.records import (
    AttestedNode,
    AuditAppended,
    AuditEvent,
    BundleChanged,
    BundleRecord,
    CaChanged,
    Change,
    EntryChanged,
    FederationChanged,
    FederationRecord,
    JoinToken,
    NodeChanged,
    PartnerCertificate,
    PartnerChanged,
    PolicyChanged,
    PolicyRevision,
    RecordFormatError,
    RegistrationEntry,
    TokenChanged,
)
from trustmesh.controlplane.store.store import InvalidRecordError, Store

__all__ = [
    "AttestedNode",
    "AuditAppended",
    "AuditEvent",
    "BundleChanged",
    "BundleRecord",
    "CaChanged",
    "Change",
    "CompactedError",
    "EntryChanged",
    "FederationChanged",
    "FederationRecord",
    "InvalidRecordError",
    "JoinToken",
    "NodeChanged",
    "PartnerCertificate",
    "PartnerChanged",
    "PolicyChanged",
    "PolicyRevision",
    "RecordFormatError",
    "RegistrationEntry",
    "TokenChanged",
    "Store",
    "StoreMember",
    "open_store",
]
