"""Who is calling, for each listener of the server: the authenticators of the call layer.

gRPC already verified any client certificate against our roots during the handshake (the
server trusts only its own trust domain's roots). An authenticator reads the leaf, says
which kind of caller it belongs to, and leaves the "may it call this method" question to
the table in calls.py. It raises only when the caller cannot be identified at all, or is an
agent that may no longer act as one (not attested, banned, evicted, superseded SVID, or its
identity in use from another address: controlplane/clones.py).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc
from cryptography import x509

from trustmesh.controlplane.api.calls import (
    ANONYMOUS_CALLER,
    Authenticator,
    Caller,
    CallerKind,
    DenialHook,
    Method,
    StepUpHook,
    current_caller,
)
from trustmesh.controlplane.api.peer import PeerAgent, peer_address, peer_host
from trustmesh.controlplane.call_source import source_of_call
from trustmesh.controlplane.operators import OperatorRecord
from trustmesh.controlplane.registration import AttestedNode
from trustmesh.errors import UnauthenticatedError, VerificationError
from trustmesh.naming import node_name_of
from trustmesh.peercred import PeerCredentials
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import admin_entry_of, spiffe_id_from_certificate


class AgentAuthenticator(Protocol):
    def authenticate(self, peer: PeerAgent) -> AttestedNode:
        """The agent's current node record; raises when it may not act as that agent now (from
        that address, with that SVID)."""
        ...


class AdminCheck(Protocol):
    def is_admin_entry(self, entry_id: str, spiffe_id: str) -> bool: ...


class OperatorCheck(Protocol):
    async def authenticate(self, spiffe_id: SpiffeId, leaf: x509.Certificate) -> OperatorRecord | None: ...

    async def step_up(self, name: str, otp: str, method: str) -> None: ...


@dataclass(frozen=True)
class AuthenticatedOperator:
    """The payload of an operator caller: its record at this call and its certificate's end."""

    record: OperatorRecord
    expires_at: float


def policy_scope(caller: Caller) -> str | None:
    """The team whose allowlists `caller` is confined to: an operator without the admin role
    writes policy only for its team's destinations ("" when it has no team); None: not confined
    (admins, admin SVIDs, the root socket)."""
    if isinstance(caller.payload, AuthenticatedOperator) and "admin" not in caller.payload.record.roles:
        return caller.payload.record.team
    return None


class AuditRecorder(Protocol):
    def record(self, kind: str, *, actor: str, subject: str = "", outcome: str = "ok",
               **details: Any) -> Awaitable[object]: ...


@dataclass(frozen=True)
class AuthenticatedAgent:
    """The payload of an agent caller: the SVID it presented and its node record."""

    peer: PeerAgent
    node: AttestedNode


def current_agent() -> AuthenticatedAgent:
    """The agent calling the Node API method being handled."""
    return current_caller().payload_as(AuthenticatedAgent)


def client_svid(context: grpc.aio.ServicerContext, missing: str) -> tuple[SpiffeId, x509.Certificate]:
    """The SPIFFE ID and leaf of the caller's TLS client certificate; `missing` says what to present."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise UnauthenticatedError(missing)
    try:
        leaf = x509.load_pem_x509_certificate(pems[0])
        return spiffe_id_from_certificate(leaf), leaf
    except (ValueError, VerificationError) as err:
        raise UnauthenticatedError(f"the client certificate is not an X509-SVID: {err}") from err


async def anonymous(context: grpc.aio.ServicerContext) -> Caller:
    """The attestation listener: no client certificate, so nobody is known yet; only where the
    call comes from (its host: failures are aggregated and rate-limited per source address)."""
    return replace(ANONYMOUS_CALLER, source=peer_host(context.peer()))


class LocalCallers(Protocol):
    def caller_of(self, peer: str | None) -> PeerCredentials | None: ...


def local_admin_id(uid: int) -> str:
    """How the audit log names a caller on the admin socket (the host's break-glass path): by
    the uid the kernel gave for its connection."""
    return f"local-root (uid {uid})" if uid == 0 else f"local (uid {uid})"


def local_admins(sockets: LocalCallers) -> Authenticator:
    """The admin unix socket (mode 0600: whoever can open it is a local admin), named by the
    uid and pid the kernel gives for the connection (SO_PEERCRED, read by local_socket.py)."""

    async def authenticate(context: grpc.aio.ServicerContext) -> Caller:
        creds = sockets.caller_of(context.peer())
        if creds is None:
            raise UnauthenticatedError("this connection did not come through the admin socket; connect to the "
                                       "server's --admin-socket")
        return Caller(CallerKind.LOCAL_ADMIN, local_admin_id(creds.uid), source=f"pid {creds.pid}")

    return authenticate


def agents(td: TrustDomain, records: AgentAuthenticator) -> Authenticator:
    """The Node API listener: an agent SVID of `td` whose node record lets it act as that agent."""

    async def authenticate(context: grpc.aio.ServicerContext) -> Caller:
        sid, leaf = client_svid(context, "this call needs the agent's X509-SVID as TLS client certificate; attest "
                                         "first (the Node API listener is --bind; attestation is on --attest-bind)")
        if sid.trust_domain != td or node_name_of(sid) is None:
            return Caller(CallerKind.WORKLOAD, str(sid), sid)
        peer = PeerAgent(sid, format(leaf.serial_number, "x"), leaf.not_valid_after_utc.timestamp(),
                         peer_host(context.peer()))
        return Caller(CallerKind.AGENT, peer.id, AuthenticatedAgent(peer, records.authenticate(peer)))

    return authenticate


def remote_admins(td: TrustDomain, admins: AdminCheck, operators: OperatorCheck | None = None) -> Authenticator:
    """The remote admin listener: an SVID of `td` issued from an entry marked admin.

    The SVID must name the entry it was issued from (x509svid.ADMIN_ENTRY_OID, set by the CA
    for admin entries only), and that entry must, at this call, still exist, still be marked
    admin and still be for this SPIFFE ID: the same ID registered without --admin elsewhere
    gets nothing, and unmarking or deleting the entry revokes its SVIDs' rights at once.
    """

    async def authenticate(context: grpc.aio.ServicerContext) -> Caller:
        sid, leaf = client_svid(context, "the remote admin API needs an operator certificate (`trustmesh login`) "
                                         "or an admin SVID as TLS client certificate")
        source = peer_address(context.peer())
        if operators is not None:
            with source_of_call(source):
                record = await operators.authenticate(sid, leaf)
            if record is not None:
                return Caller(CallerKind.OPERATOR, str(sid), AuthenticatedOperator(
                    record, leaf.not_valid_after_utc.timestamp()), roles=frozenset(record.roles), source=source)
        entry = admin_entry_of(leaf)
        if sid.trust_domain == td and entry and admins.is_admin_entry(entry, str(sid)):
            return Caller(CallerKind.REMOTE_ADMIN, f"admin:{sid}", sid, source=source)
        return Caller(CallerKind.WORKLOAD, str(sid), sid, source=source)

    return authenticate


def operator_step_up(operators: OperatorCheck) -> StepUpHook:
    """Privileged calls of operators: a current one-time code, checked against its record."""

    async def check(caller: Caller, otp: str, method: Method) -> None:
        await operators.step_up(caller.payload_as(AuthenticatedOperator).record.name, otp, str(method))

    return check


def audit_admin_denials(audit: AuditRecorder) -> DenialHook:
    """Every caller the remote admin listener refuses becomes an `admin.call` audit event."""

    async def denied(caller: Caller, method: Method) -> None:
        if caller.kind is CallerKind.WORKLOAD:
            reason = "its SVID was not issued from an entry marked admin"
        elif caller.kind is CallerKind.OPERATOR:
            reason = f"roles {', '.join(sorted(caller.roles))} may not call it"
        else:
            reason = f"{caller.kind} may not call it"
        await audit.record("admin.call", actor=caller.id, subject=method.name, outcome="denied", reason=reason)

    return denied
