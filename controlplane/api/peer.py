"""Who is calling the Node API: the agent SPIFFE ID and serial from the TLS client certificate.

gRPC already verified the client chain against our roots during the handshake (the server
trusts only its own trust domain's roots). Here we read the leaf and insist it is an agent
ID of our trust domain; the NodeAPI then checks it against the attested-node record.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from cryptography import x509

from trustmesh.controlplane.api.status import PermissionDeniedError, UnauthenticatedError
from trustmesh.errors import VerificationError
from trustmesh.naming import node_name_of
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import spiffe_id_from_certificate


@dataclass(frozen=True)
class PeerAgent:
    spiffe_id: SpiffeId
    serial: str
    not_after: float  # the client certificate's expiry (unix time): a stream must not outlive it

    @property
    def id(self) -> str:
        return str(self.spiffe_id)


def peer_agent(context: grpc.aio.ServicerContext, td: TrustDomain) -> PeerAgent:
    """The calling agent, or UNAUTHENTICATED / PERMISSION_DENIED saying what is wrong."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise UnauthenticatedError("this call needs the agent's X509-SVID as TLS client certificate; attest first "
                                   "(the Node API listener is --bind; attestation is on --attest-bind)")
    try:
        leaf = x509.load_pem_x509_certificate(pems[0])
        sid = spiffe_id_from_certificate(leaf)
    except (ValueError, VerificationError) as err:
        raise UnauthenticatedError(f"the client certificate is not an X509-SVID: {err}") from err
    if sid.trust_domain != td or node_name_of(sid) is None:
        raise PermissionDeniedError(f"{sid} is not an agent of trust domain {td}; only agents may call the Node API")
    return PeerAgent(sid, format(leaf.serial_number, "x"), leaf.not_valid_after_utc.timestamp())
