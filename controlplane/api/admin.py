"""The Admin service, on the admin unix socket (file permissions are the access control) and,
optionally, over mTLS to admin SVIDs. Thin: converts protobuf to the typed inputs of the domain
services (registration, policy_store, federation_admin, partners, ca_admin, audit_query) and
their answers back; every rule, store write, CA call and audit record lives there.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc
from trustmesh.controlplane.api.convert import (
    audit_event_to_pb,
    bundle_to_pb,
    ca_authorities_pb,
    entry_spec_from_pb,
    entry_to_pb,
    node_to_pb,
    relationship_spec_from_pb,
    relationship_to_pb,
    revision_to_pb,
    root_step_from_pb,
)
from trustmesh.controlplane.api.status import PermissionDeniedError, UnauthenticatedError, grpc_errors
from trustmesh.controlplane.audit_query import AuditQueries, AuditQuery
from trustmesh.controlplane.ca_admin import CAAdmin
from trustmesh.controlplane.federation_admin import FederationAdmin
from trustmesh.controlplane.partners import PartnerCertificates, PartnerRequest
from trustmesh.controlplane.policy_store import PolicyService
from trustmesh.controlplane.registration import EntryQuery, Registry
from trustmesh.controlplane.registry_view import RegistryView
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.errors import VerificationError
from trustmesh.x509svid import spiffe_id_from_certificate

# Who made an admin change. grpcio cannot read SO_PEERCRED on the unix socket, so the
# local socket itself (mode 0600, owned by the server's user) is the identity.
LOCAL_ADMIN = "admin:local-socket"


@dataclass(frozen=True)
class AdminServices:
    """The domain services behind the admin API, one of each per server."""

    registry: Registry
    policy: PolicyService
    federation: FederationAdmin
    partners: PartnerCertificates
    ca: CAAdmin
    audit: AuditQueries

    @classmethod
    def of(cls, rt: ServerRuntime) -> AdminServices:
        return cls(Registry(rt.config.trust_domain, rt.store, rt.audit, rt.clock), PolicyService(rt),
                   FederationAdmin(rt), PartnerCertificates(rt), CAAdmin(rt), AuditQueries(rt))


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """One instance serves the local socket (`remote=False`), another the optional mTLS
    listener, where the caller must present the SVID of an entry marked `admin`."""

    def __init__(self, rt: ServerRuntime, view: RegistryView, *, remote: bool = False,
                 services: AdminServices | None = None) -> None:
        self._rt = rt
        self._view = view
        self._remote = remote
        self._domain = services or AdminServices.of(rt)

    async def _authorize(self, context: grpc.aio.ServicerContext, method: str) -> str:
        if not self._remote:
            return LOCAL_ADMIN
        auth = context.auth_context() or {}
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            raise UnauthenticatedError("the remote admin API needs an admin SVID as TLS client certificate")
        try:
            caller = spiffe_id_from_certificate(x509.load_pem_x509_certificate(pems[0]))
        except (ValueError, VerificationError) as err:
            raise UnauthenticatedError(f"the client certificate is not an X509-SVID: {err}") from err
        if caller.trust_domain != self._rt.config.trust_domain or not self._view.is_admin(str(caller)):
            await self._rt.audit.record("admin.call", actor=str(caller), subject=method, outcome="denied",
                                        reason="not an admin entry")
            raise PermissionDeniedError(
                f"{caller} may not use the admin API: register it with `trustmesh entry create … --admin`")
        return f"admin:{caller}"

    async def CreateEntry(self, request: admin_pb2.CreateEntryRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.CreateEntryResponse:
        async with grpc_errors(context, "CreateEntry"):
            actor = await self._authorize(context, "CreateEntry")
            entry = await self._domain.registry.create_entry(entry_spec_from_pb(request.entry), actor)
            return admin_pb2.CreateEntryResponse(entry=entry_to_pb(entry))

    async def GetEntry(self, request: admin_pb2.GetEntryRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.GetEntryResponse:
        async with grpc_errors(context, "GetEntry"):
            await self._authorize(context, "GetEntry")
            return admin_pb2.GetEntryResponse(entry=entry_to_pb(await self._domain.registry.get_entry(request.id)))

    async def ListEntries(self, request: admin_pb2.ListEntriesRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ListEntriesResponse:
        async with grpc_errors(context, "ListEntries"):
            await self._authorize(context, "ListEntries")
            page = await self._domain.registry.list_entries(EntryQuery(
                parent_id=request.parent_id, spiffe_id=request.spiffe_id, page_size=request.page_size,
                page_token=request.page_token))
            return admin_pb2.ListEntriesResponse(entries=[entry_to_pb(e) for e in page.entries],
                                                 next_page_token=page.next_page_token)

    async def UpdateEntry(self, request: admin_pb2.UpdateEntryRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.UpdateEntryResponse:
        async with grpc_errors(context, "UpdateEntry"):
            actor = await self._authorize(context, "UpdateEntry")
            entry = await self._domain.registry.update_entry(request.entry.id, entry_spec_from_pb(request.entry), actor,
                                                         request.expected_revision or None)
            return admin_pb2.UpdateEntryResponse(entry=entry_to_pb(entry))

    async def DeleteEntry(self, request: admin_pb2.DeleteEntryRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.DeleteEntryResponse:
        async with grpc_errors(context, "DeleteEntry"):
            actor = await self._authorize(context, "DeleteEntry")
            await self._domain.registry.delete_entry(request.id, actor, request.expected_revision or None)
            return admin_pb2.DeleteEntryResponse()

    async def CreateJoinToken(self, request: admin_pb2.CreateJoinTokenRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.CreateJoinTokenResponse:
        async with grpc_errors(context, "CreateJoinToken"):
            actor = await self._authorize(context, "CreateJoinToken")
            token, record = await self._domain.registry.create_join_token(request.node_name, request.ttl_seconds, actor)
            agent = self._domain.registry.agent_id_of(record.node_name)
            return admin_pb2.CreateJoinTokenResponse(token=token, expires_at=int(record.expires_at), agent_id=agent)

    async def ListAgents(self, request: admin_pb2.ListAgentsRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListAgentsResponse:
        async with grpc_errors(context, "ListAgents"):
            await self._authorize(context, "ListAgents")
            agents = await self._domain.registry.list_agents()
            return admin_pb2.ListAgentsResponse(agents=[node_to_pb(n) for n in agents])

    async def BanAgent(self, request: admin_pb2.BanAgentRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.BanAgentResponse:
        async with grpc_errors(context, "BanAgent"):
            actor = await self._authorize(context, "BanAgent")
            await self._domain.registry.ban_agent(request.spiffe_id, actor)
            return admin_pb2.BanAgentResponse()

    async def EvictAgent(self, request: admin_pb2.EvictAgentRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.EvictAgentResponse:
        async with grpc_errors(context, "EvictAgent"):
            actor = await self._authorize(context, "EvictAgent")
            await self._domain.registry.evict_agent(request.spiffe_id, actor)
            return admin_pb2.EvictAgentResponse()

    async def GetBundle(self, request: admin_pb2.GetBundleRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.GetBundleResponse:
        async with grpc_errors(context, "GetBundle"):
            await self._authorize(context, "GetBundle")
            found = await self._domain.federation.bundle(request.trust_domain)
            return admin_pb2.GetBundleResponse(bundle=bundle_to_pb(found.bundle), spiffe_bundle=found.jwks)

    async def ApplyPolicy(self, request: admin_pb2.ApplyPolicyRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ApplyPolicyResponse:
        async with grpc_errors(context, "ApplyPolicy"):
            actor = await self._authorize(context, "ApplyPolicy")
            revision, changed, diff = await self._domain.policy.apply(
                request.documents, author=request.author, comment=request.comment,
                expected_head=request.expected_head_revision, dry_run=request.dry_run, actor=actor)
            return admin_pb2.ApplyPolicyResponse(revision=revision, changed=changed, diff=diff)

    async def DiffPolicy(self, request: admin_pb2.DiffPolicyRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.DiffPolicyResponse:
        async with grpc_errors(context, "DiffPolicy"):
            await self._authorize(context, "DiffPolicy")
            changed, diff, against = await self._domain.policy.diff(request.documents, request.against_revision)
            return admin_pb2.DiffPolicyResponse(changed=changed, diff=diff, against_revision=against)

    async def GetPolicy(self, request: admin_pb2.GetPolicyRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.GetPolicyResponse:
        async with grpc_errors(context, "GetPolicy"):
            await self._authorize(context, "GetPolicy")
            return admin_pb2.GetPolicyResponse(policy=revision_to_pb(await self._domain.policy.get(request.revision)))

    async def ListPolicyRevisions(self, request: admin_pb2.ListPolicyRevisionsRequest,
                                  context: grpc.aio.ServicerContext) -> admin_pb2.ListPolicyRevisionsResponse:
        async with grpc_errors(context, "ListPolicyRevisions"):
            await self._authorize(context, "ListPolicyRevisions")
            records = await self._domain.policy.revisions()
            return admin_pb2.ListPolicyRevisionsResponse(revisions=[revision_to_pb(r) for r in records])

    async def RollbackPolicy(self, request: admin_pb2.RollbackPolicyRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.RollbackPolicyResponse:
        async with grpc_errors(context, "RollbackPolicy"):
            actor = await self._authorize(context, "RollbackPolicy")
            revision = await self._domain.policy.rollback(request.revision, author=request.author,
                                                      comment=request.comment,
                                                      expected_head=request.expected_head_revision, actor=actor)
            return admin_pb2.RollbackPolicyResponse(revision=revision)

    async def ListAuditEvents(self, request: admin_pb2.ListAuditEventsRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.ListAuditEventsResponse:
        async with grpc_errors(context, "ListAuditEvents"):
            await self._authorize(context, "ListAuditEvents")
            page = await self._domain.audit.events(AuditQuery(
                since_seq=request.since_seq, since_time=request.since_time, limit=request.limit, kind=request.kind))
            return admin_pb2.ListAuditEventsResponse(events=[audit_event_to_pb(e) for e in page.events],
                                                     next_seq=page.next_seq)

    async def VerifyAudit(self, request: admin_pb2.VerifyAuditRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.VerifyAuditResponse:
        async with grpc_errors(context, "VerifyAudit"):
            await self._authorize(context, "VerifyAudit")
            result = await self._domain.audit.verify()
            return admin_pb2.VerifyAuditResponse(ok=result.ok, checked=result.checked,
                                                 first_broken_seq=result.first_broken_seq, reason=result.reason)

    # --- federation ----------------------------------------------------------------------------

    async def ListFederationRelationships(self, request: admin_pb2.ListFederationRelationshipsRequest,
                                          context: grpc.aio.ServicerContext
                                          ) -> admin_pb2.ListFederationRelationshipsResponse:
        async with grpc_errors(context, "ListFederationRelationships"):
            await self._authorize(context, "ListFederationRelationships")
            found = await self._domain.federation.relationships()
            return admin_pb2.ListFederationRelationshipsResponse(relationships=[relationship_to_pb(r) for r in found])

    async def CreateFederationRelationship(self, request: admin_pb2.CreateFederationRelationshipRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> admin_pb2.CreateFederationRelationshipResponse:
        async with grpc_errors(context, "CreateFederationRelationship"):
            actor = await self._authorize(context, "CreateFederationRelationship")
            created = await self._domain.federation.create(relationship_spec_from_pb(request), actor)
            return admin_pb2.CreateFederationRelationshipResponse(relationship=relationship_to_pb(created))

    async def DeleteFederationRelationship(self, request: admin_pb2.DeleteFederationRelationshipRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> admin_pb2.DeleteFederationRelationshipResponse:
        async with grpc_errors(context, "DeleteFederationRelationship"):
            actor = await self._authorize(context, "DeleteFederationRelationship")
            await self._domain.federation.delete(request.trust_domain, actor)
            return admin_pb2.DeleteFederationRelationshipResponse()

    async def RefreshFederatedBundle(self, request: admin_pb2.RefreshFederatedBundleRequest,
                                     context: grpc.aio.ServicerContext) -> admin_pb2.RefreshFederatedBundleResponse:
        async with grpc_errors(context, "RefreshFederatedBundle"):
            actor = await self._authorize(context, "RefreshFederatedBundle")
            bundle = await self._domain.federation.refresh(request.trust_domain, actor)
            return admin_pb2.RefreshFederatedBundleResponse(bundle=bundle_to_pb(bundle))

    # --- partner certificates -----------------------------------------------------------------

    async def IssuePartnerCertificate(self, request: admin_pb2.IssuePartnerCertificateRequest,
                                      context: grpc.aio.ServicerContext) -> admin_pb2.IssuePartnerCertificateResponse:
        async with grpc_errors(context, "IssuePartnerCertificate"):
            actor = await self._authorize(context, "IssuePartnerCertificate")
            issued = await self._domain.partners.issue(
                PartnerRequest(spiffe_id=request.spiffe_id, csr=request.csr, ttl_seconds=request.ttl_seconds), actor)
            return admin_pb2.IssuePartnerCertificateResponse(
                cert_chain=[c.public_bytes(serialization.Encoding.DER) for c in issued.cert_chain],
                serial=issued.serial, expires_at=int(issued.expires_at))

    async def RevokePartnerCertificate(self, request: admin_pb2.RevokePartnerCertificateRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> admin_pb2.RevokePartnerCertificateResponse:
        async with grpc_errors(context, "RevokePartnerCertificate"):
            actor = await self._authorize(context, "RevokePartnerCertificate")
            await self._domain.partners.revoke(request.serial, request.reason, actor)
            return admin_pb2.RevokePartnerCertificateResponse()

    # --- certificate authority ------------------------------------------------------------

    async def GetCAJournal(self, request: admin_pb2.GetCAJournalRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.GetCAJournalResponse:
        async with grpc_errors(context, "GetCAJournal"):
            await self._authorize(context, "GetCAJournal")
            status = await self._domain.ca.status()
            return admin_pb2.GetCAJournalResponse(authorities=ca_authorities_pb(status.authorities),
                                                  leader=status.leader, next_step=status.next_step)

    async def RotateRoot(self, request: admin_pb2.RotateRootRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.RotateRootResponse:
        async with grpc_errors(context, "RotateRoot"):
            actor = await self._authorize(context, "RotateRoot")
            done = await self._domain.ca.rotate_root(root_step_from_pb(request.step), actor)
            return admin_pb2.RotateRootResponse(authorities=ca_authorities_pb(done.authorities), detail=done.detail)


class AdminAPI:
    def __init__(self, rt: ServerRuntime, view: RegistryView) -> None:
        self._rt = rt
        self._view = view
        self._services = AdminServices.of(rt)

    def register(self, server: grpc.aio.Server, *, remote: bool = False) -> None:
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminServicer(self._rt, self._view, remote=remote, services=self._services), server)
