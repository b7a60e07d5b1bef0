"""The Admin service, served on the admin unix socket (file permissions are the access control).

Thin: converts messages, calls the Registry / audit log, lets `grpc_errors` map refusals.
"""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from trustmesh.bundle import Bundle
from trustmesh.clip import AUTHOR, COMMENT, SHOWN, clip, shown
from trustmesh.controlplane.api.convert import (
    audit_event_to_pb,
    ca_authorities_pb,
    entry_to_pb,
    node_to_pb,
)
from trustmesh.controlplane.api.federation_check import check_partner_request, check_relationship
from trustmesh.controlplane.api.node import NodeAPI
from trustmesh.controlplane.api.status import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    grpc_errors,
)
from trustmesh.controlplane.config import MAX_JWT_TTL
from trustmesh.controlplane.duties import take_root_step
from trustmesh.controlplane.federation import BundleFetchError, refresh, stored_bundle
from trustmesh.controlplane.policy_store import PolicyService
from trustmesh.controlplane.registration import EntrySpec, Registry, check_entry_id
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import (
    AuditEvent,
    BundleRecord,
    FederationRecord,
    PartnerCertificate,
    PolicyRevision,
)
from trustmesh.errors import CAError, InvalidSpiffeIdError, NotFoundError, SvidError, VerificationError
from trustmesh.spiffeid import TrustDomain
from trustmesh.wire import bundle_to_pb, selector_from_pb
from trustmesh.x509svid import spiffe_id_from_certificate

# Who made an admin change. grpcio cannot read SO_PEERCRED on the unix socket, so the
# local socket itself (mode 0600, owned by the server's user) is the identity.
LOCAL_ADMIN = "admin:local-socket"
MAX_PAGE = 1000
MAX_AUDIT_PAGE = 5000
_STEPS = {
    admin_pb2.ROOT_ROTATION_STEP_UNSPECIFIED: "next",
    admin_pb2.ROOT_ROTATION_STEP_PREPARE: "prepare",
    admin_pb2.ROOT_ROTATION_STEP_ACTIVATE: "activate",
    admin_pb2.ROOT_ROTATION_STEP_RETIRE: "retire",
}

def _spec(entry: types_pb2.Entry) -> EntrySpec:
    return EntrySpec(
        spiffe_id=entry.spiffe_id, parent_id=entry.parent_id,
        selectors=[str(selector_from_pb(s)) for s in entry.selectors],
        x509_ttl=entry.x509_ttl_seconds, jwt_ttl=entry.jwt_ttl_seconds,
        dns_names=list(entry.dns_names), federates_with=list(entry.federates_with), admin=entry.admin,
    )


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """One instance serves the local socket (`remote=False`), another the optional mTLS
    listener, where the caller must present the SVID of an entry marked `admin`."""

    def __init__(self, rt: ServerRuntime, node_api: NodeAPI, *, remote: bool = False) -> None:
        self._rt = rt
        self._registry = Registry(rt.config.trust_domain, rt.store, rt.audit, rt.clock)
        self._node_api = node_api
        self._remote = remote
        self._policy = PolicyService(rt)

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
        if caller.trust_domain != self._rt.config.trust_domain or not self._node_api.is_admin(str(caller)):
            await self._rt.audit.record("admin.call", actor=str(caller), subject=method, outcome="denied",
                                        reason="not an admin entry")
            raise PermissionDeniedError(
                f"{caller} may not use the admin API: register it with `trustmesh entry create … --admin`")
        return f"admin:{caller}"

    async def CreateEntry(self, request: admin_pb2.CreateEntryRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.CreateEntryResponse:
        async with grpc_errors(context, "CreateEntry"):
            actor = await self._authorize(context, "CreateEntry")
            entry = await self._registry.create_entry(_spec(request.entry), actor)
            return admin_pb2.CreateEntryResponse(entry=entry_to_pb(entry))

    async def GetEntry(self, request: admin_pb2.GetEntryRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.GetEntryResponse:
        async with grpc_errors(context, "GetEntry"):
            await self._authorize(context, "GetEntry")
            entry = await self._rt.store.get_entry(check_entry_id(request.id))
            return admin_pb2.GetEntryResponse(entry=entry_to_pb(entry))

    async def ListEntries(self, request: admin_pb2.ListEntriesRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ListEntriesResponse:
        async with grpc_errors(context, "ListEntries"):
            await self._authorize(context, "ListEntries")
            if request.page_size < 0:
                raise InvalidArgumentError("page_size must not be negative")
            size = min(request.page_size or MAX_PAGE, MAX_PAGE)
            entries = await self._rt.store.list_entries(parent_id=request.parent_id or None)
            if request.spiffe_id:
                entries = [e for e in entries if e.spiffe_id == request.spiffe_id]
            entries.sort(key=lambda e: e.id)
            if request.page_token:
                entries = [e for e in entries if e.id > request.page_token]
            page = entries[:size]
            next_token = page[-1].id if len(entries) > size else ""
            return admin_pb2.ListEntriesResponse(entries=[entry_to_pb(e) for e in page], next_page_token=next_token)

    async def UpdateEntry(self, request: admin_pb2.UpdateEntryRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.UpdateEntryResponse:
        async with grpc_errors(context, "UpdateEntry"):
            actor = await self._authorize(context, "UpdateEntry")
            entry = await self._registry.update_entry(request.entry.id, _spec(request.entry), actor,
                                                      request.expected_revision or None)
            return admin_pb2.UpdateEntryResponse(entry=entry_to_pb(entry))

    async def DeleteEntry(self, request: admin_pb2.DeleteEntryRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.DeleteEntryResponse:
        async with grpc_errors(context, "DeleteEntry"):
            actor = await self._authorize(context, "DeleteEntry")
            await self._registry.delete_entry(request.id, actor, request.expected_revision or None)
            return admin_pb2.DeleteEntryResponse()

    async def CreateJoinToken(self, request: admin_pb2.CreateJoinTokenRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.CreateJoinTokenResponse:
        async with grpc_errors(context, "CreateJoinToken"):
            actor = await self._authorize(context, "CreateJoinToken")
            token, record = await self._registry.create_join_token(request.node_name, request.ttl_seconds, actor)
            agent = self._registry.agent_id_of(record.node_name)
            return admin_pb2.CreateJoinTokenResponse(token=token, expires_at=int(record.expires_at), agent_id=agent)

    async def ListAgents(self, request: admin_pb2.ListAgentsRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListAgentsResponse:
        async with grpc_errors(context, "ListAgents"):
            await self._authorize(context, "ListAgents")
            nodes = sorted(await self._rt.store.list_attested_nodes(), key=lambda n: n.spiffe_id)
            return admin_pb2.ListAgentsResponse(agents=[node_to_pb(n) for n in nodes])

    async def BanAgent(self, request: admin_pb2.BanAgentRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.BanAgentResponse:
        async with grpc_errors(context, "BanAgent"):
            actor = await self._authorize(context, "BanAgent")
            await self._registry.ban_agent(request.spiffe_id, actor)
            return admin_pb2.BanAgentResponse()

    async def EvictAgent(self, request: admin_pb2.EvictAgentRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.EvictAgentResponse:
        async with grpc_errors(context, "EvictAgent"):
            actor = await self._authorize(context, "EvictAgent")
            await self._registry.evict_agent(request.spiffe_id, actor)
            return admin_pb2.EvictAgentResponse()

    async def GetBundle(self, request: admin_pb2.GetBundleRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.GetBundleResponse:
        async with grpc_errors(context, "GetBundle"):
            await self._authorize(context, "GetBundle")
            own = self._rt.config.trust_domain
            td = _trust_domain_arg(request.trust_domain) if request.trust_domain else own.name
            if td == own.name:
                bundle = self._rt.ca.bundle().with_refresh_hint(self._rt.config.bundle_refresh_hint)
                return admin_pb2.GetBundleResponse(bundle=bundle_to_pb(bundle), spiffe_bundle=bundle.to_jwks())
            federated, record = await stored_bundle(self._rt, td)
            if federated is None or record is None:
                raise NotFoundError(f"this server holds no bundle for {td}; `trustmesh federation list` shows the "
                                    "partners it federates with")
            return admin_pb2.GetBundleResponse(bundle=bundle_to_pb(federated), spiffe_bundle=record.jwks)

    async def ApplyPolicy(self, request: admin_pb2.ApplyPolicyRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ApplyPolicyResponse:
        async with grpc_errors(context, "ApplyPolicy"):
            actor = await self._authorize(context, "ApplyPolicy")
            revision, changed, diff = await self._policy.apply(
                request.documents, author=clip(request.author, AUTHOR), comment=clip(request.comment, COMMENT),
                expected_head=request.expected_head_revision, dry_run=request.dry_run, actor=actor)
            return admin_pb2.ApplyPolicyResponse(revision=revision, changed=changed, diff=diff)

    async def DiffPolicy(self, request: admin_pb2.DiffPolicyRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.DiffPolicyResponse:
        async with grpc_errors(context, "DiffPolicy"):
            await self._authorize(context, "DiffPolicy")
            changed, diff, against = await self._policy.diff(request.documents, request.against_revision)
            return admin_pb2.DiffPolicyResponse(changed=changed, diff=diff, against_revision=against)

    async def GetPolicy(self, request: admin_pb2.GetPolicyRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.GetPolicyResponse:
        async with grpc_errors(context, "GetPolicy"):
            await self._authorize(context, "GetPolicy")
            if request.revision:
                record = await self._rt.store.get_policy_revision(request.revision)
            else:
                head = await self._rt.store.get_policy_head()
                if head is None:
                    raise NotFoundError("no policy has been applied yet: everything is denied by default; "
                                        "apply one with `trustmesh policy apply FILE`")
                record = head
            return admin_pb2.GetPolicyResponse(policy=_revision_pb(record))

    async def ListPolicyRevisions(self, request: admin_pb2.ListPolicyRevisionsRequest,
                                  context: grpc.aio.ServicerContext) -> admin_pb2.ListPolicyRevisionsResponse:
        async with grpc_errors(context, "ListPolicyRevisions"):
            await self._authorize(context, "ListPolicyRevisions")
            records = await self._rt.store.list_policy_revisions()
            return admin_pb2.ListPolicyRevisionsResponse(revisions=[_revision_pb(r) for r in records])

    async def RollbackPolicy(self, request: admin_pb2.RollbackPolicyRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.RollbackPolicyResponse:
        async with grpc_errors(context, "RollbackPolicy"):
            actor = await self._authorize(context, "RollbackPolicy")
            if request.revision <= 0:
                raise InvalidArgumentError("name the revision to roll back to; see `trustmesh policy history`")
            revision = await self._policy.rollback(request.revision, author=clip(request.author, AUTHOR),
                                                   comment=clip(request.comment, COMMENT),
                                                   expected_head=request.expected_head_revision, actor=actor)
            return admin_pb2.RollbackPolicyResponse(revision=revision)

    async def ListAuditEvents(self, request: admin_pb2.ListAuditEventsRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.ListAuditEventsResponse:
        async with grpc_errors(context, "ListAuditEvents"):
            await self._authorize(context, "ListAuditEvents")
            if request.limit < 0 or request.since_seq < 0:
                raise InvalidArgumentError("limit and since_seq must not be negative")
            limit = min(request.limit or MAX_AUDIT_PAGE, MAX_AUDIT_PAGE)
            out: list[AuditEvent] = []
            cursor = request.since_seq
            # Filters apply after reading; read pages until the limit is met or the log ends.
            while len(out) < limit:
                page = await self._rt.store.list_audit_events(since_seq=cursor, limit=limit)
                if not page:
                    break
                cursor = page[-1].seq
                out.extend(e for e in page if e.time >= request.since_time
                           and (not request.kind or e.kind == request.kind))
            out = out[:limit]
            next_seq = out[-1].seq if len(out) == limit else 0
            return admin_pb2.ListAuditEventsResponse(events=[audit_event_to_pb(e) for e in out], next_seq=next_seq)

    async def VerifyAudit(self, request: admin_pb2.VerifyAuditRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.VerifyAuditResponse:
        async with grpc_errors(context, "VerifyAudit"):
            await self._authorize(context, "VerifyAudit")
            started = time.monotonic()
            result = await self._rt.audit.verify()
            self._rt.metrics.histogram("trustmesh_audit_verify_seconds", "time to verify the audit chain").observe(
                time.monotonic() - started)
            return admin_pb2.VerifyAuditResponse(ok=result.ok, checked=result.checked,
                                                 first_broken_seq=result.first_broken_seq, reason=result.reason)

    # --- federation ----------------------------------------------------------------------------

    async def ListFederationRelationships(self, request: admin_pb2.ListFederationRelationshipsRequest,
                                          context: grpc.aio.ServicerContext
                                          ) -> admin_pb2.ListFederationRelationshipsResponse:
        async with grpc_errors(context, "ListFederationRelationships"):
            await self._authorize(context, "ListFederationRelationships")
            out = []
            for record in await self._rt.store.list_federations():
                bundle, _ = await stored_bundle(self._rt, record.trust_domain)
                out.append(_relationship_pb(record, bundle))
            return admin_pb2.ListFederationRelationshipsResponse(relationships=out)

    async def CreateFederationRelationship(self, request: admin_pb2.CreateFederationRelationshipRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> admin_pb2.CreateFederationRelationshipResponse:
        async with grpc_errors(context, "CreateFederationRelationship"):
            actor = await self._authorize(context, "CreateFederationRelationship")
            try:
                record, bundle = check_relationship(request, self._rt.config.trust_domain, self._rt.clock())
            except InvalidArgumentError as err:
                await self._rt.audit.record("federation.create", actor=actor, subject=clip(request.trust_domain, SHOWN),
                                            outcome="denied", reason=str(err))
                raise
            bundle_record = None if bundle is None else BundleRecord(record.trust_domain, request.bundle, 1,
                                                                     self._rt.clock())
            await self._rt.store.create_federation(record, bundle_record)
            await self._rt.audit.record("federation.create", actor=actor, subject=record.trust_domain,
                                        endpoint=record.endpoint_url, profile=record.profile,
                                        endpoint_spiffe_id=record.endpoint_spiffe_id)
            return admin_pb2.CreateFederationRelationshipResponse(relationship=_relationship_pb(record, bundle))

    async def DeleteFederationRelationship(self, request: admin_pb2.DeleteFederationRelationshipRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> admin_pb2.DeleteFederationRelationshipResponse:
        async with grpc_errors(context, "DeleteFederationRelationship"):
            actor = await self._authorize(context, "DeleteFederationRelationship")
            td = _trust_domain_arg(request.trust_domain)
            await self._rt.store.delete_federation(td)
            await self._rt.audit.record("federation.delete", actor=actor, subject=td)
            return admin_pb2.DeleteFederationRelationshipResponse()

    async def RefreshFederatedBundle(self, request: admin_pb2.RefreshFederatedBundleRequest,
                                     context: grpc.aio.ServicerContext) -> admin_pb2.RefreshFederatedBundleResponse:
        async with grpc_errors(context, "RefreshFederatedBundle"):
            actor = await self._authorize(context, "RefreshFederatedBundle")
            record = await self._rt.store.get_federation(_trust_domain_arg(request.trust_domain))
            if not record.endpoint_url:
                raise FailedPreconditionError(f"the relationship with {record.trust_domain} has no bundle endpoint; "
                                              "its bundle is set by hand (`trustmesh federation add --bundle-file`)")
            try:
                bundle = await refresh(self._rt, record, actor=actor)
            except BundleFetchError as err:
                raise UnavailableError(f"could not refresh the bundle of {record.trust_domain} ({err}); "
                                       "the last good bundle stays in force") from err
            return admin_pb2.RefreshFederatedBundleResponse(bundle=bundle_to_pb(bundle))

    # --- partner certificates -----------------------------------------------------------------

    async def IssuePartnerCertificate(self, request: admin_pb2.IssuePartnerCertificateRequest,
                                      context: grpc.aio.ServicerContext) -> admin_pb2.IssuePartnerCertificateResponse:
        async with grpc_errors(context, "IssuePartnerCertificate"):
            actor = await self._authorize(context, "IssuePartnerCertificate")
            try:
                spiffe_id, ttl = check_partner_request(request, self._rt.config.trust_domain)
                svid = await self._rt.ca.sign_partner_certificate(request.csr, spiffe_id, ttl)
            except (InvalidArgumentError, SvidError, CAError) as err:
                await self._rt.audit.record("partner.issue", actor=actor, subject=clip(request.spiffe_id, SHOWN),
                                            outcome="denied", reason=str(err))
                raise InvalidArgumentError(str(err)) from err
            serial = f"{svid.leaf.serial_number:x}"
            expires = svid.leaf.not_valid_after_utc.timestamp()
            await self._rt.store.create_partner_certificate(PartnerCertificate(
                serial=serial, spiffe_id=str(spiffe_id), not_after=expires, issued_at=self._rt.clock(),
                issued_by=actor))
            await self._rt.audit.record("partner.issue", actor=actor, subject=str(spiffe_id), serial=serial,
                                        not_after=int(expires))
            return admin_pb2.IssuePartnerCertificateResponse(
                cert_chain=[c.public_bytes(serialization.Encoding.DER) for c in svid.cert_chain],
                serial=serial, expires_at=int(expires))

    async def RevokePartnerCertificate(self, request: admin_pb2.RevokePartnerCertificateRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> admin_pb2.RevokePartnerCertificateResponse:
        async with grpc_errors(context, "RevokePartnerCertificate"):
            actor = await self._authorize(context, "RevokePartnerCertificate")
            serial = request.serial.strip().lower().removeprefix("0x")
            if not serial or len(serial) > 64 or any(c not in "0123456789abcdef" for c in serial):
                raise InvalidArgumentError(f"serial {shown(request.serial)} is not a hexadecimal serial number; "
                                           "`trustmesh partner list` shows them")
            if len(request.reason) > 1024:
                raise InvalidArgumentError("--reason is longer than 1024 characters")
            cert, revision = await self._rt.store.get_partner_certificate(serial)
            if cert.revoked_at:
                raise FailedPreconditionError(f"partner certificate {serial} ({cert.spiffe_id}) is already revoked")
            await self._rt.store.replace_partner_certificate(
                replace(cert, revoked_at=self._rt.clock(), reason=request.reason), revision)
            await self._rt.audit.record("partner.revoke", actor=actor, subject=cert.spiffe_id, serial=serial,
                                        reason=request.reason)
            return admin_pb2.RevokePartnerCertificateResponse()

    # --- certificate authority ------------------------------------------------------------

    async def GetCAJournal(self, request: admin_pb2.GetCAJournalRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.GetCAJournalResponse:
        async with grpc_errors(context, "GetCAJournal"):
            await self._authorize(context, "GetCAJournal")
            # Another replica may have moved the journal a moment ago; show the stored one.
            await self._rt.ca.reload()
            journal = self._rt.ca.journal
            step = journal.next_root_step(self._rt.clock(), MAX_JWT_TTL.total_seconds()) or ""
            leader = await self._rt.store.get_leader("duties") or ""
            return admin_pb2.GetCAJournalResponse(authorities=ca_authorities_pb(journal), leader=leader,
                                                  next_step=step)

    async def RotateRoot(self, request: admin_pb2.RotateRootRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.RotateRootResponse:
        async with grpc_errors(context, "RotateRoot"):
            actor = await self._authorize(context, "RotateRoot")
            await self._rt.ca.reload()
            journal = self._rt.ca.journal
            step = _STEPS.get(request.step)
            if step is None:
                raise InvalidArgumentError(f"unknown root rotation step {request.step}; use prepare, activate or retire")
            if step == "next":
                step = "activate" if journal.prepared_root() is not None else "prepare"
            try:
                detail = await take_root_step(self._rt, step, actor=actor)
            except FailedPreconditionError as err:
                await self._rt.audit.record("ca.rotation_refused", actor=actor, subject=step, outcome="denied",
                                            reason=str(err))
                raise
            return admin_pb2.RotateRootResponse(authorities=ca_authorities_pb(self._rt.ca.journal), detail=detail)


_PROFILE_PB = {
    "https_web": admin_pb2.BUNDLE_ENDPOINT_PROFILE_HTTPS_WEB,
    "https_spiffe": admin_pb2.BUNDLE_ENDPOINT_PROFILE_HTTPS_SPIFFE,
}


def _relationship_pb(record: FederationRecord, bundle: Bundle | None) -> admin_pb2.FederationRelationship:
    return admin_pb2.FederationRelationship(
        trust_domain=record.trust_domain, bundle_endpoint_url=record.endpoint_url,
        profile=_PROFILE_PB.get(record.profile, admin_pb2.BUNDLE_ENDPOINT_PROFILE_UNSPECIFIED),
        endpoint_spiffe_id=record.endpoint_spiffe_id,
        bundle_sequence_number=(bundle.sequence_number or 0) if bundle is not None else 0,
        last_refreshed_at=int(record.last_refreshed_at), last_error=record.last_error,
    )


def _trust_domain_arg(text: str) -> str:
    try:
        return TrustDomain.parse(text).name
    except InvalidSpiffeIdError as err:
        raise InvalidArgumentError(f"trust domain {shown(text)}: {err}") from err


def _revision_pb(record: PolicyRevision) -> admin_pb2.PolicyRevision:
    return admin_pb2.PolicyRevision(revision=record.revision, documents=record.documents, author=record.author,
                                    comment=record.comment, created_at=int(record.created_at), sha256=record.sha256)


class AdminAPI:
    def __init__(self, rt: ServerRuntime, node_api: NodeAPI) -> None:
        self._rt = rt
        self._node_api = node_api

    def register(self, server: grpc.aio.Server, *, remote: bool = False) -> None:
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self._rt, self._node_api, remote=remote), server)
