"""The Admin service, on the admin unix socket (file permissions are the access control) and,
optionally, over mTLS to admin SVIDs. Thin: converts protobuf to the typed inputs of the domain
services (registration, policy_store, federation_admin, partners, ca_admin, audit_query) and
their answers back; every rule, store write, CA call and audit record lives there.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc
from cryptography.hazmat.primitives import serialization

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc
from trustmesh.controlplane.access import AccessGrant, AccessRequests
from trustmesh.controlplane.api.callers import AuthenticatedOperator, policy_scope
from trustmesh.controlplane.api.calls import current_caller
from trustmesh.controlplane.api.convert import (
    access_to_pb,
    audit_event_to_pb,
    bundle_to_pb,
    ca_authorities_pb,
    entry_spec_from_pb,
    entry_to_pb,
    flow_to_pb,
    node_to_pb,
    operator_to_pb,
    ownership_to_pb,
    quarantine_to_pb,
    relationship_spec_from_pb,
    relationship_to_pb,
    revision_to_pb,
    root_step_from_pb,
)
from trustmesh.controlplane.audit_query import AuditQueries, AuditQuery
from trustmesh.controlplane.ca_admin import CAAdmin
from trustmesh.controlplane.federation_admin import FederationAdmin
from trustmesh.controlplane.flow_store import FlowQuery, FlowRollups
from trustmesh.controlplane.operators import Operators
from trustmesh.controlplane.partners import PartnerCertificates, PartnerRequest
from trustmesh.controlplane.policy_store import PolicyService
from trustmesh.controlplane.quarantine import IDENTITY, QuarantineService
from trustmesh.controlplane.registration import EntryQuery, Registry
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.status import StatusService
from trustmesh.controlplane.trace_log import TraceLog

# ExportTrace answers in messages of whole lines, each well under the 4 MiB gRPC limit.
EXPORT_CHUNK_BYTES = 256 * 1024


class AgentStreams(Protocol):
    """The agents' open sync streams on this replica (sync_service.SyncService)."""

    def delivered_revisions(self) -> Mapping[str, int]:
        """Agent ID -> the policy revision last delivered on its open stream."""
        ...


@dataclass(frozen=True)
class AdminServices:
    """The domain services behind the admin API, one of each per server."""

    registry: Registry
    policy: PolicyService
    federation: FederationAdmin
    partners: PartnerCertificates
    ca: CAAdmin
    audit: AuditQueries
    operators: Operators
    access: AccessRequests
    flows: FlowRollups
    quarantines: QuarantineService
    trace: TraceLog
    streams: AgentStreams
    status: StatusService

    @classmethod
    def of(cls, rt: ServerRuntime, operators: Operators, flows: FlowRollups,
           quarantines: QuarantineService, trace: TraceLog, streams: AgentStreams,
           status: StatusService) -> AdminServices:
        return cls(Registry(rt.config.trust_domain, rt.store, rt.audit, rt.clock), PolicyService(rt),
                   FederationAdmin(rt), PartnerCertificates(rt), CAAdmin(rt), AuditQueries(rt), operators,
                   AccessRequests(rt), flows, quarantines, trace, streams, status)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Served on the local socket and, optionally, over mTLS to admin SVIDs. The call layer
    (calls.py) has authenticated and authorized the caller before a handler runs; handlers
    read who it is with `current_caller()` for the audit trail."""

    def __init__(self, services: AdminServices) -> None:
        self._domain = services

    def register(self, server: grpc.aio.Server) -> None:
        admin_pb2_grpc.add_AdminServicer_to_server(self, server)

    async def CreateEntry(self, request: admin_pb2.CreateEntryRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.CreateEntryResponse:
        actor = current_caller().id
        entry = await self._domain.registry.create_entry(entry_spec_from_pb(request.entry), actor)
        return admin_pb2.CreateEntryResponse(entry=entry_to_pb(entry))

    async def GetEntry(self, request: admin_pb2.GetEntryRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.GetEntryResponse:
        return admin_pb2.GetEntryResponse(entry=entry_to_pb(await self._domain.registry.get_entry(request.id)))

    async def ListEntries(self, request: admin_pb2.ListEntriesRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ListEntriesResponse:
        page = await self._domain.registry.list_entries(EntryQuery(
            parent_id=request.parent_id, spiffe_id=request.spiffe_id, page_size=request.page_size,
            page_token=request.page_token))
        return admin_pb2.ListEntriesResponse(entries=[entry_to_pb(e) for e in page.entries],
                                             next_page_token=page.next_page_token)

    async def UpdateEntry(self, request: admin_pb2.UpdateEntryRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.UpdateEntryResponse:
        actor = current_caller().id
        entry = await self._domain.registry.update_entry(request.entry.id, entry_spec_from_pb(request.entry), actor,
                                                     request.expected_revision or None)
        return admin_pb2.UpdateEntryResponse(entry=entry_to_pb(entry))

    async def DeleteEntry(self, request: admin_pb2.DeleteEntryRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.DeleteEntryResponse:
        actor = current_caller().id
        await self._domain.registry.delete_entry(request.id, actor, request.expected_revision or None)
        return admin_pb2.DeleteEntryResponse()

    async def CreateJoinToken(self, request: admin_pb2.CreateJoinTokenRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.CreateJoinTokenResponse:
        actor = current_caller().id
        token, record = await self._domain.registry.create_join_token(request.node_name, request.ttl_seconds, actor)
        agent = self._domain.registry.agent_id_of(record.node_name)
        return admin_pb2.CreateJoinTokenResponse(token=token, expires_at=int(record.expires_at), agent_id=agent)

    async def ListAgents(self, request: admin_pb2.ListAgentsRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListAgentsResponse:
        agents = await self._domain.registry.list_agents()
        live = self._domain.streams.delivered_revisions()
        return admin_pb2.ListAgentsResponse(agents=[node_to_pb(n, live.get(str(n.spiffe_id))) for n in agents])

    async def BanAgent(self, request: admin_pb2.BanAgentRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.BanAgentResponse:
        actor = current_caller().id
        await self._domain.registry.ban_agent(request.spiffe_id, actor)
        return admin_pb2.BanAgentResponse()

    async def EvictAgent(self, request: admin_pb2.EvictAgentRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.EvictAgentResponse:
        actor = current_caller().id
        await self._domain.registry.evict_agent(request.spiffe_id, actor)
        return admin_pb2.EvictAgentResponse()

    async def ClearAgent(self, request: admin_pb2.ClearAgentRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ClearAgentResponse:
        actor = current_caller().id
        node, cleared = await self._domain.registry.clear_agent(request.spiffe_id, actor)
        return admin_pb2.ClearAgentResponse(agent=node_to_pb(node), cleared=cleared)

    async def LabelAgent(self, request: admin_pb2.LabelAgentRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.LabelAgentResponse:
        actor = current_caller().id
        node, changed = await self._domain.registry.label_agent(
            request.spiffe_id, dict(request.set), list(request.remove), actor)
        return admin_pb2.LabelAgentResponse(agent=node_to_pb(node), changed=changed)

    async def GetBundle(self, request: admin_pb2.GetBundleRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.GetBundleResponse:
        found = await self._domain.federation.bundle(request.trust_domain)
        return admin_pb2.GetBundleResponse(bundle=bundle_to_pb(found.bundle), spiffe_bundle=found.jwks)

    async def ApplyPolicy(self, request: admin_pb2.ApplyPolicyRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ApplyPolicyResponse:
        caller = current_caller()
        revision, changed, diff = await self._domain.policy.apply(
            request.documents, author=request.author, comment=request.comment,
            expected_head=request.expected_head_revision, dry_run=request.dry_run, actor=caller.id,
            team=request.team, allow_empty=request.allow_empty, scope=policy_scope(caller))
        return admin_pb2.ApplyPolicyResponse(revision=revision, changed=changed, diff=diff)

    async def DiffPolicy(self, request: admin_pb2.DiffPolicyRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.DiffPolicyResponse:
        changed, diff, against = await self._domain.policy.diff(request.documents, request.against_revision,
                                                                request.team)
        return admin_pb2.DiffPolicyResponse(changed=changed, diff=diff, against_revision=against)

    async def GetPolicy(self, request: admin_pb2.GetPolicyRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.GetPolicyResponse:
        return admin_pb2.GetPolicyResponse(policy=revision_to_pb(await self._domain.policy.get(request.revision)))

    async def ListPolicyRevisions(self, request: admin_pb2.ListPolicyRevisionsRequest,
                                  context: grpc.aio.ServicerContext) -> admin_pb2.ListPolicyRevisionsResponse:
        records = await self._domain.policy.revisions()
        return admin_pb2.ListPolicyRevisionsResponse(revisions=[revision_to_pb(r) for r in records])

    async def RollbackPolicy(self, request: admin_pb2.RollbackPolicyRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.RollbackPolicyResponse:
        caller = current_caller()
        revision = await self._domain.policy.rollback(request.revision, author=request.author,
                                                  comment=request.comment,
                                                  expected_head=request.expected_head_revision, actor=caller.id,
                                                  scope=policy_scope(caller))
        return admin_pb2.RollbackPolicyResponse(revision=revision)

    async def ListFlows(self, request: admin_pb2.ListFlowsRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.ListFlowsResponse:
        window = await self._domain.flows.query(FlowQuery(since=float(request.since), source=request.source,
                                                          destination=request.destination,
                                                          decision=request.decision))
        return admin_pb2.ListFlowsResponse(edges=[flow_to_pb(f) for f in window.flows], since=int(window.since),
                                           until=int(window.until))

    async def ExportTrace(self, request: admin_pb2.ExportTraceRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[admin_pb2.ExportTraceResponse]:
        until = float(request.until) if request.until else math.inf  # 0: up to now
        async for chunk in self._domain.trace.export(float(max(request.since, 0)), until, EXPORT_CHUNK_BYTES):
            yield admin_pb2.ExportTraceResponse(lines=chunk)

    async def GetPolicyOwners(self, request: admin_pb2.GetPolicyOwnersRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.GetPolicyOwnersResponse:
        ownership, record = await self._domain.policy.ownership()
        return admin_pb2.GetPolicyOwnersResponse(
            teams=ownership_to_pb(ownership), documents=record.documents if record else "",
            updated_by=record.updated_by if record else "", updated_at=int(record.updated_at) if record else 0)

    async def SetPolicyOwners(self, request: admin_pb2.SetPolicyOwnersRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.SetPolicyOwnersResponse:
        ownership = await self._domain.policy.set_ownership(request.documents, current_caller().id)
        return admin_pb2.SetPolicyOwnersResponse(teams=ownership_to_pb(ownership))

    async def ListAuditEvents(self, request: admin_pb2.ListAuditEventsRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.ListAuditEventsResponse:
        page = await self._domain.audit.events(AuditQuery(
            since_seq=request.since_seq, since_time=request.since_time, limit=request.limit, kind=request.kind,
            actor=request.actor))
        return admin_pb2.ListAuditEventsResponse(events=[audit_event_to_pb(e) for e in page.events],
                                                 next_seq=page.next_seq)

    async def VerifyAudit(self, request: admin_pb2.VerifyAuditRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.VerifyAuditResponse:
        result = await self._domain.audit.verify()
        return admin_pb2.VerifyAuditResponse(
            ok=result.ok, checked=result.chain.checked, first_broken_seq=result.chain.first_broken_seq,
            reason=result.reason, records_checked=result.records_checked,
            record_failures=[f"{f.kind} {f.key}: {f.reason}" for f in result.record_failures],
            anchored_seq=result.anchor.checkpoint.seq if result.anchor.checkpoint else 0, anchor=result.anchor_target)

    # --- federation ----------------------------------------------------------------------------

    async def ListFederationRelationships(self, request: admin_pb2.ListFederationRelationshipsRequest,
                                          context: grpc.aio.ServicerContext
                                          ) -> admin_pb2.ListFederationRelationshipsResponse:
        found = await self._domain.federation.relationships()
        return admin_pb2.ListFederationRelationshipsResponse(relationships=[relationship_to_pb(r) for r in found])

    async def CreateFederationRelationship(self, request: admin_pb2.CreateFederationRelationshipRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> admin_pb2.CreateFederationRelationshipResponse:
        actor = current_caller().id
        created = await self._domain.federation.create(relationship_spec_from_pb(request), actor)
        return admin_pb2.CreateFederationRelationshipResponse(relationship=relationship_to_pb(created))

    async def DeleteFederationRelationship(self, request: admin_pb2.DeleteFederationRelationshipRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> admin_pb2.DeleteFederationRelationshipResponse:
        actor = current_caller().id
        await self._domain.federation.delete(request.trust_domain, actor)
        return admin_pb2.DeleteFederationRelationshipResponse()

    async def RefreshFederatedBundle(self, request: admin_pb2.RefreshFederatedBundleRequest,
                                     context: grpc.aio.ServicerContext) -> admin_pb2.RefreshFederatedBundleResponse:
        actor = current_caller().id
        bundle = await self._domain.federation.refresh(request.trust_domain, actor)
        return admin_pb2.RefreshFederatedBundleResponse(bundle=bundle_to_pb(bundle))

    # --- partner certificates -----------------------------------------------------------------

    async def IssuePartnerCertificate(self, request: admin_pb2.IssuePartnerCertificateRequest,
                                      context: grpc.aio.ServicerContext) -> admin_pb2.IssuePartnerCertificateResponse:
        actor = current_caller().id
        issued = await self._domain.partners.issue(
            PartnerRequest(spiffe_id=request.spiffe_id, csr=request.csr, ttl_seconds=request.ttl_seconds), actor)
        return admin_pb2.IssuePartnerCertificateResponse(
            cert_chain=[c.public_bytes(serialization.Encoding.DER) for c in issued.cert_chain],
            serial=issued.serial, expires_at=int(issued.expires_at))

    async def RevokePartnerCertificate(self, request: admin_pb2.RevokePartnerCertificateRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> admin_pb2.RevokePartnerCertificateResponse:
        actor = current_caller().id
        await self._domain.partners.revoke(request.serial, request.reason, actor)
        return admin_pb2.RevokePartnerCertificateResponse()

    # --- certificate authority ------------------------------------------------------------

    async def GetCAJournal(self, request: admin_pb2.GetCAJournalRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.GetCAJournalResponse:
        status = await self._domain.ca.status()
        return admin_pb2.GetCAJournalResponse(authorities=ca_authorities_pb(status.authorities),
                                              leader=status.leader, next_step=status.next_step)

    async def RotateRoot(self, request: admin_pb2.RotateRootRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.RotateRootResponse:
        actor = current_caller().id
        done = await self._domain.ca.rotate_root(root_step_from_pb(request.step), actor, force=request.force)
        return admin_pb2.RotateRootResponse(authorities=ca_authorities_pb(done.authorities), detail=done.detail,
                                            forced=done.forced)

    # --- operators ------------------------------------------------------------------------

    async def AddOperator(self, request: admin_pb2.AddOperatorRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.AddOperatorResponse:
        ops = self._domain.operators
        added = await ops.add(request.name, list(request.roles), request.team, current_caller().id)
        return admin_pb2.AddOperatorResponse(operator=operator_to_pb(added.record, ops.trust_domain),
                                             enrollment_token=added.token,
                                             enrollment_expires_at=int(added.expires_at))

    async def ListOperators(self, request: admin_pb2.ListOperatorsRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.ListOperatorsResponse:
        ops = self._domain.operators
        return admin_pb2.ListOperatorsResponse(operators=[operator_to_pb(r, ops.trust_domain)
                                                          for r in await ops.list()])

    async def DisableOperator(self, request: admin_pb2.DisableOperatorRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.DisableOperatorResponse:
        ops = self._domain.operators
        record = await ops.disable(request.name, current_caller().id)
        return admin_pb2.DisableOperatorResponse(operator=operator_to_pb(record, ops.trust_domain))

    async def RemoveOperator(self, request: admin_pb2.RemoveOperatorRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.RemoveOperatorResponse:
        await self._domain.operators.remove(request.name, current_caller().id)
        return admin_pb2.RemoveOperatorResponse()

    async def ResetOperator(self, request: admin_pb2.ResetOperatorRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.ResetOperatorResponse:
        ops = self._domain.operators
        reset = await ops.reset(request.name, current_caller().id)
        return admin_pb2.ResetOperatorResponse(operator=operator_to_pb(reset.record, ops.trust_domain),
                                               enrollment_token=reset.token,
                                               enrollment_expires_at=int(reset.expires_at))

    async def WhoAmI(self, request: admin_pb2.WhoAmIRequest,
                     context: grpc.aio.ServicerContext) -> admin_pb2.WhoAmIResponse:
        caller = current_caller()
        answer = admin_pb2.WhoAmIResponse(actor=caller.id, kind=str(caller.kind), source=caller.source)
        if isinstance(caller.payload, AuthenticatedOperator):
            answer.roles.extend(caller.payload.record.roles)
            answer.team = caller.payload.record.team
            answer.expires_at = int(caller.payload.expires_at)
        return answer

    # --- just-in-time access ----------------------------------------------------------------

    def _grant(self, grant: AccessGrant) -> admin_pb2.AccessGrant:
        return access_to_pb(grant, self._domain.access.state_of(grant))

    async def RequestAccess(self, request: admin_pb2.RequestAccessRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.RequestAccessResponse:
        grant = await self._domain.access.request(request.source, request.destination, request.port,
                                                  request.duration_seconds, request.reason, current_caller().id)
        return admin_pb2.RequestAccessResponse(grant=self._grant(grant))

    async def ApproveAccess(self, request: admin_pb2.ApproveAccessRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.ApproveAccessResponse:
        grant = await self._domain.access.approve(request.id, current_caller().id)
        return admin_pb2.ApproveAccessResponse(grant=self._grant(grant))

    async def DenyAccess(self, request: admin_pb2.DenyAccessRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.DenyAccessResponse:
        grant = await self._domain.access.deny(request.id, request.reason, current_caller().id)
        return admin_pb2.DenyAccessResponse(grant=self._grant(grant))

    async def ListAccess(self, request: admin_pb2.ListAccessRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListAccessResponse:
        grants = await self._domain.access.list(request.state)
        return admin_pb2.ListAccessResponse(grants=[self._grant(g) for g in grants])

    async def RevokeAccess(self, request: admin_pb2.RevokeAccessRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.RevokeAccessResponse:
        grant = await self._domain.access.revoke(request.id, request.reason, current_caller().id)
        return admin_pb2.RevokeAccessResponse(grant=self._grant(grant))

    async def BreakGlass(self, request: admin_pb2.BreakGlassRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.BreakGlassResponse:
        grant = await self._domain.access.break_glass(request.source, request.destination, request.port,
                                                      request.duration_seconds, request.reason, current_caller().id)
        return admin_pb2.BreakGlassResponse(grant=self._grant(grant))

    async def ReviewAccess(self, request: admin_pb2.ReviewAccessRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ReviewAccessResponse:
        grant = await self._domain.access.review(request.id, request.note, current_caller().id)
        return admin_pb2.ReviewAccessResponse(grant=self._grant(grant))

    # --- quarantine ---------------------------------------------------------------------------

    async def ListQuarantines(self, request: admin_pb2.ListQuarantinesRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.ListQuarantinesResponse:
        quarantines = await self._domain.quarantines.list()
        return admin_pb2.ListQuarantinesResponse(quarantines=[quarantine_to_pb(q) for q in quarantines])

    async def AddQuarantine(self, request: admin_pb2.AddQuarantineRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.AddQuarantineResponse:
        quarantine = await self._domain.quarantines.add(request.target, request.kind or IDENTITY, request.reason,
                                                        current_caller().id)
        return admin_pb2.AddQuarantineResponse(quarantine=quarantine_to_pb(quarantine))

    async def ReleaseQuarantine(self, request: admin_pb2.ReleaseQuarantineRequest,
                                context: grpc.aio.ServicerContext) -> admin_pb2.ReleaseQuarantineResponse:
        quarantine = await self._domain.quarantines.release(request.target, request.reason, current_caller().id)
        return admin_pb2.ReleaseQuarantineResponse(quarantine=quarantine_to_pb(quarantine))

    # --- health -------------------------------------------------------------------------------

    async def GetStatus(self, request: admin_pb2.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.GetStatusResponse:
        s = await self._domain.status.status()
        return admin_pb2.GetStatusResponse(
            trust_domain=s.trust_domain, replica_id=s.replica_id, server_time_ms=int(s.time * 1000),
            leader=s.leader, ready=s.ready, store_backend=s.store.backend, store_error=s.store.error,
            store_members=[admin_pb2.StoreMember(name=m.name, endpoint=m.endpoint, healthy=m.healthy,
                                                 leader=m.leader, error=m.error) for m in s.store.members],
            authorities=ca_authorities_pb(s.authorities), root_ttl_seconds=int(s.root_ttl),
            ca_ttl_seconds=int(s.ca_ttl), agent_ttl_seconds=int(s.agent_ttl),
            server_svid_chain=list(s.server_svid_chain),
            listeners=[admin_pb2.ServerListener(name=n, address=a) for n, a in sorted(s.listeners.items())],
            bundle_endpoint_profile=s.bundle_endpoint_profile, oidc_issuer=s.oidc_issuer,
            oidc_discovery_bind=s.oidc_discovery_bind, oidc_serves_server_svid=s.oidc_serves_server_svid,
            policy_revision=s.policy_revision,
            agents=[admin_pb2.AgentPresence(spiffe_id=a, last_seen=int(t))
                    for a, t in sorted(s.agents_last_seen.items())])
