"""Conversions between store records / domain values and protobuf messages.

Protobuf stops here: handlers and the domain see records and dataclasses only.
"""

from __future__ import annotations

import json

from cryptography import x509

from trustmesh._proto.trustmesh.v1 import admin_pb2, types_pb2
from trustmesh.controlplane.ca.journal import CAJournal
from trustmesh.controlplane.store.records import AttestedNode, AuditEvent, RegistrationEntry

# bundle_to_pb is the kernel's; re-exported for the callers of this module until they import it there.
from trustmesh.wire import bundle_to_pb as bundle_to_pb
from trustmesh.wire import selector_to_pb


def entry_to_pb(entry: RegistrationEntry) -> types_pb2.Entry:
    return types_pb2.Entry(
        id=entry.id, spiffe_id=entry.spiffe_id, parent_id=entry.parent_id,
        selectors=[selector_to_pb(s) for s in entry.selectors],
        x509_ttl_seconds=entry.x509_ttl, jwt_ttl_seconds=entry.jwt_ttl,
        dns_names=list(entry.dns_names), federates_with=list(entry.federates_with),
        admin=entry.admin, revision=entry.revision,
        created_at=int(entry.created_at), updated_at=int(entry.updated_at),
    )


def node_to_pb(node: AttestedNode) -> types_pb2.AttestedNode:
    return types_pb2.AttestedNode(
        spiffe_id=node.spiffe_id, node_name=node.node_name, attestation_type=node.attestation_type,
        cert_serial=node.cert_serial, cert_not_after=int(node.cert_not_after), banned=node.banned,
        created_at=int(node.created_at), updated_at=int(node.updated_at),
        selectors=[selector_to_pb(s) for s in node.selectors], revision=node.revision,
    )


def audit_event_to_pb(event: AuditEvent) -> types_pb2.AuditEvent:
    return types_pb2.AuditEvent(
        seq=event.seq, time=int(event.time), kind=event.kind, actor=event.actor, subject=event.subject,
        outcome=event.outcome, details_json=json.dumps(event.details, sort_keys=True),
        prev_hash=event.prev_hash, hash=event.hash,
    )


_STATES = {
    "prepared": admin_pb2.CA_AUTHORITY_STATE_PREPARED,
    "active": admin_pb2.CA_AUTHORITY_STATE_ACTIVE,
    "old": admin_pb2.CA_AUTHORITY_STATE_OLD,
}


def ca_authorities_pb(journal: CAJournal) -> list[admin_pb2.CAAuthority]:
    """Roots, then the replicas' signing CAs, then JWT keys; each in journal order."""
    out: list[admin_pb2.CAAuthority] = []
    for root in journal.roots:
        cert = x509.load_der_x509_certificate(root.cert_der)
        out.append(admin_pb2.CAAuthority(
            kind=admin_pb2.CA_AUTHORITY_KIND_X509_ROOT, state=_STATES[root.status], certificate=root.cert_der,
            serial=f"{cert.serial_number:x}", not_before=int(cert.not_valid_before_utc.timestamp()),
            not_after=int(root.not_after), prepared_at=int(root.created_at), activated_at=int(root.activated_at),
            retired_at=int(root.demoted_at), key_id=root.id,
        ))
    # A replica's newest signing CA is the one it signs with; earlier ones only linger
    # in the record until they expire.
    newest = {s.replica_id: s for s in journal.signing_cas}
    for signing in journal.signing_cas:
        cert = x509.load_der_x509_certificate(signing.cert_der)
        state = "active" if newest[signing.replica_id] is signing else "old"
        out.append(admin_pb2.CAAuthority(
            kind=admin_pb2.CA_AUTHORITY_KIND_X509_SIGNING, state=_STATES[state], certificate=signing.cert_der,
            serial=f"{cert.serial_number:x}", not_before=int(cert.not_valid_before_utc.timestamp()),
            not_after=int(signing.not_after), activated_at=int(signing.created_at), replica=signing.replica_id,
            key_id=signing.root_id,
        ))
    for key in journal.jwt_keys:
        out.append(admin_pb2.CAAuthority(
            kind=admin_pb2.CA_AUTHORITY_KIND_JWT_KEY, state=_STATES[key.status], key_id=key.kid,
            not_before=int(key.created_at), not_after=int(key.not_after), prepared_at=int(key.created_at),
            activated_at=int(key.activated_at), retired_at=int(key.demoted_at),
        ))
    return out
