"""Conversions between store records / domain values and protobuf messages.

Protobuf stops here: handlers and the domain see records and dataclasses only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from trustmesh._proto.trustmesh.v1 import admin_pb2, types_pb2
from trustmesh.controlplane.access import AccessGrant, AccessState
from trustmesh.controlplane.audit_query import AuditEvent
from trustmesh.controlplane.ca_admin import Authority
from trustmesh.controlplane.federation_admin import Relationship, RelationshipSpec
from trustmesh.controlplane.operators import OperatorRecord, operator_id
from trustmesh.controlplane.policy_store import PolicyRevision
from trustmesh.controlplane.quarantine import Quarantine
from trustmesh.controlplane.registration import AttestedNode, EntrySpec, NodeStatus, RegistrationEntry
from trustmesh.flows import Flow
from trustmesh.policy.ownership import Ownership
from trustmesh.spiffeid import TrustDomain
from trustmesh.wire import bundle_to_pb as bundle_to_pb
from trustmesh.wire import selector_to_pb


def selector_text(sel: types_pb2.Selector) -> str:
    return f"{sel.type}:{sel.value}"


def entry_to_pb(entry: RegistrationEntry) -> types_pb2.Entry:
    return types_pb2.Entry(
        id=entry.id, spiffe_id=str(entry.spiffe_id), parent_id=str(entry.parent_id),
        selectors=[selector_to_pb(s) for s in entry.selectors],
        x509_ttl_seconds=entry.x509_ttl, jwt_ttl_seconds=entry.jwt_ttl,
        dns_names=list(entry.dns_names), federates_with=[td.name for td in entry.federates_with],
        admin=entry.admin, revision=entry.revision,
        created_at=int(entry.created_at), updated_at=int(entry.updated_at),
        node_selector=dict(entry.node_selector),
    )


def node_to_pb(node: AttestedNode, delivered_revision: int | None = None) -> types_pb2.AttestedNode:
    """`delivered_revision`: the policy revision on the agent's open sync stream here, None
    when it holds none (live state, not part of the record)."""
    return types_pb2.AttestedNode(
        spiffe_id=str(node.spiffe_id), node_name=node.node_name, attestation_type=node.attestation_type,
        cert_serial=node.cert_serial, cert_not_after=int(node.cert_not_after), banned=node.banned,
        created_at=int(node.created_at), updated_at=int(node.updated_at),
        selectors=[selector_to_pb(s) for s in node.selectors], revision=node.revision,
        status=_NODE_STATUSES[node.status], status_reason=node.status_reason,
        status_changed_at=int(node.status_at), renewed_from=node.renewed_from,
        permissive_listeners=list(node.permissive_listeners),
        connected=delivered_revision is not None, policy_revision=delivered_revision or 0,
        labels=node.effective_labels,
    )


_NODE_STATUSES = {
    NodeStatus.ACTIVE: types_pb2.AGENT_STATUS_ACTIVE,
    NodeStatus.SUSPECTED_CLONE: types_pb2.AGENT_STATUS_SUSPECTED_CLONE,
}


def audit_event_to_pb(event: AuditEvent) -> types_pb2.AuditEvent:
    return types_pb2.AuditEvent(
        seq=event.seq, time=int(event.time), kind=event.kind, actor=event.actor, subject=event.subject,
        outcome=event.outcome, details_json=json.dumps(event.details, sort_keys=True),
        prev_hash=event.prev_hash, hash=event.hash,
    )


_KINDS = {
    "x509_root": admin_pb2.CA_AUTHORITY_KIND_X509_ROOT,
    "x509_signing": admin_pb2.CA_AUTHORITY_KIND_X509_SIGNING,
    "jwt_key": admin_pb2.CA_AUTHORITY_KIND_JWT_KEY,
}
_STATES = {
    "prepared": admin_pb2.CA_AUTHORITY_STATE_PREPARED,
    "active": admin_pb2.CA_AUTHORITY_STATE_ACTIVE,
    "old": admin_pb2.CA_AUTHORITY_STATE_OLD,
}


def ca_authorities_pb(authorities: Iterable[Authority]) -> list[admin_pb2.CAAuthority]:
    return [admin_pb2.CAAuthority(
        kind=_KINDS[a.kind], state=_STATES[a.state], certificate=a.certificate, serial=a.serial, key_id=a.key_id,
        not_before=int(a.not_before), not_after=int(a.not_after), prepared_at=int(a.prepared_at),
        activated_at=int(a.activated_at), retired_at=int(a.retired_at), replica=a.replica, key_store=a.key_store,
        issuer=a.issuer,
    ) for a in authorities]


# --- admin requests and answers ----------------------------------------------------------------

# Unknown enum values pass through as their number, which the domain refuses by name.
_STEPS: dict[int, str] = {
    admin_pb2.ROOT_ROTATION_STEP_UNSPECIFIED: "next",
    admin_pb2.ROOT_ROTATION_STEP_PREPARE: "prepare",
    admin_pb2.ROOT_ROTATION_STEP_ACTIVATE: "activate",
    admin_pb2.ROOT_ROTATION_STEP_RETIRE: "retire",
}
_PROFILES: dict[int, str] = {
    admin_pb2.BUNDLE_ENDPOINT_PROFILE_UNSPECIFIED: "",
    admin_pb2.BUNDLE_ENDPOINT_PROFILE_HTTPS_WEB: "https_web",
    admin_pb2.BUNDLE_ENDPOINT_PROFILE_HTTPS_SPIFFE: "https_spiffe",
}
_PROFILE_PB = {
    "https_web": admin_pb2.BUNDLE_ENDPOINT_PROFILE_HTTPS_WEB,
    "https_spiffe": admin_pb2.BUNDLE_ENDPOINT_PROFILE_HTTPS_SPIFFE,
}


def root_step_from_pb(step: int) -> str:
    return _STEPS.get(step, str(step))


def entry_spec_from_pb(entry: types_pb2.Entry) -> EntrySpec:
    return EntrySpec(
        spiffe_id=entry.spiffe_id, parent_id=entry.parent_id,
        selectors=[selector_text(s) for s in entry.selectors],
        x509_ttl=entry.x509_ttl_seconds, jwt_ttl=entry.jwt_ttl_seconds,
        dns_names=list(entry.dns_names), federates_with=list(entry.federates_with), admin=entry.admin,
        node_selector=tuple(f"{k}={v}" for k, v in sorted(entry.node_selector.items())),
    )


def relationship_spec_from_pb(request: admin_pb2.CreateFederationRelationshipRequest) -> RelationshipSpec:
    return RelationshipSpec(
        trust_domain=request.trust_domain, endpoint_url=request.bundle_endpoint_url,
        profile=_PROFILES.get(request.profile, str(request.profile)),
        endpoint_spiffe_id=request.endpoint_spiffe_id, bundle=request.bundle)


def relationship_to_pb(rel: Relationship) -> admin_pb2.FederationRelationship:
    record = rel.record
    return admin_pb2.FederationRelationship(
        trust_domain=str(record.trust_domain), bundle_endpoint_url=record.endpoint_url,
        profile=_PROFILE_PB.get(record.profile, admin_pb2.BUNDLE_ENDPOINT_PROFILE_UNSPECIFIED),
        endpoint_spiffe_id=str(record.endpoint_spiffe_id),
        bundle_sequence_number=(rel.bundle.sequence_number or 0) if rel.bundle is not None else 0,
        last_refreshed_at=int(record.last_refreshed_at), last_error=record.last_error,
    )


def revision_to_pb(record: PolicyRevision) -> admin_pb2.PolicyRevision:
    return admin_pb2.PolicyRevision(revision=record.revision, documents=record.documents, author=record.author,
                                    comment=record.comment, created_at=int(record.created_at), sha256=record.sha256)


def operator_to_pb(record: OperatorRecord, td: TrustDomain) -> admin_pb2.Operator:
    return admin_pb2.Operator(
        name=record.name, spiffe_id=str(operator_id(td, record.name)), roles=list(record.roles), team=record.team,
        state=str(record.state), created_at=int(record.created_at), created_by=record.created_by,
        locked_until=int(record.locked_until), enrolled_at=int(record.enrolled_at))


def access_to_pb(grant: AccessGrant, state: AccessState) -> admin_pb2.AccessGrant:
    """`state`: the grant's state now (a pending or active grant expires by time alone)."""
    return admin_pb2.AccessGrant(
        id=grant.id, source=str(grant.source), destination=str(grant.destination), port=grant.port,
        duration_seconds=int(grant.duration), reason=grant.reason, requester=grant.requester,
        created_at=int(grant.created_at), approve_by=int(grant.approve_by), state=str(state),
        approvals=list(grant.approvals), required_approvals=grant.required_approvals,
        starts_at=int(grant.starts_at), expires_at=int(grant.expires_at), decided_by=grant.decided_by,
        decision_reason=grant.decision_reason, break_glass=grant.break_glass, reviewed_by=grant.reviewed_by,
        reviewed_at=int(grant.reviewed_at))


def quarantine_to_pb(q: Quarantine) -> admin_pb2.Quarantine:
    return admin_pb2.Quarantine(target=q.target, kind=q.kind, reason=q.reason, evidence=list(q.evidence),
                                detector=q.detector, score=q.score, created_by=q.created_by,
                                created_at=int(q.created_at), node=q.node)


def ownership_to_pb(ownership: Ownership) -> list[admin_pb2.TeamOwnership]:
    return [admin_pb2.TeamOwnership(team=team, destinations=patterns) for team, patterns in ownership.teams.items()]


def flow_to_pb(flow: Flow) -> admin_pb2.FlowEdge:
    return admin_pb2.FlowEdge(
        source=flow.source, destination=flow.destination, port=flow.port, decision=flow.decision, rule=flow.rule,
        connections=flow.connections, bytes_in=flow.bytes_in, bytes_out=flow.bytes_out,
        first_seen=int(flow.first_seen), last_seen=int(flow.last_seen), source_address=flow.source_address,
        route=flow.route)
