"""Partner certificates: X509-SVIDs for partners that run no SPIFFE system (transport-free).

The partner keeps its key and sends a CSR; the CA takes only its public key and names the
partner `spiffe://<our td>/partners/NAME`, so allowlists and audits tell partners from
workloads. Every issue, refusal and revocation is audited; agents learn revocations from
the store's change feed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from cryptography import x509

from trustmesh.clip import SHOWN, clip, shown
from trustmesh.controlplane.registration import spiffe_id_arg
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import PartnerCertificate
from trustmesh.errors import CAError, FailedPreconditionError, InvalidArgumentError, SvidError
from trustmesh.spiffeid import SpiffeId, TrustDomain

PARTNERS_PATH = "/partners/"
DEFAULT_PARTNER_TTL = timedelta(hours=24)
MAX_PARTNER_TTL = timedelta(days=30)
MIN_PARTNER_TTL = timedelta(minutes=1)
MAX_CSR_BYTES = 16 * 1024
MAX_SERIAL = 64
MAX_REASON = 1024
# Audit subjects quote the caller's words; clip them.


@dataclass(frozen=True)
class PartnerRequest:
    """What an admin asks for: the partner's SPIFFE ID, its PKCS#10 CSR (DER), a lifetime (0: default)."""

    spiffe_id: str
    csr: bytes
    ttl_seconds: int = 0


@dataclass(frozen=True)
class IssuedCertificate:
    cert_chain: tuple[x509.Certificate, ...]  # leaf first
    serial: str  # lower-case hex; names the certificate for `revoke`
    expires_at: float


def check_partner_request(request: PartnerRequest, own: TrustDomain) -> tuple[SpiffeId, timedelta]:
    """The partner's SPIFFE ID and certificate lifetime, or INVALID_ARGUMENT saying why (pure)."""
    spiffe_id = spiffe_id_arg(request.spiffe_id, "--spiffe-id")
    if spiffe_id.trust_domain != own:
        raise InvalidArgumentError(f"{spiffe_id} is not in this trust domain; partner certificates name "
                                   f"spiffe://{own.name}{PARTNERS_PATH}NAME")
    if not spiffe_id.path.startswith(PARTNERS_PATH) or len(spiffe_id.path) <= len(PARTNERS_PATH):
        raise InvalidArgumentError(f"{spiffe_id}: partner certificates name spiffe://{own.name}{PARTNERS_PATH}NAME, "
                                   "so that allowlists and audits tell partners from workloads")
    ttl = timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else DEFAULT_PARTNER_TTL
    if not MIN_PARTNER_TTL <= ttl <= MAX_PARTNER_TTL:
        raise InvalidArgumentError(f"--ttl must be between {MIN_PARTNER_TTL} and {MAX_PARTNER_TTL.days} days")
    if not request.csr or len(request.csr) > MAX_CSR_BYTES:
        raise InvalidArgumentError("--csr: give the partner's PKCS#10 certificate signing request (PEM or DER)")
    return spiffe_id, ttl


def check_serial(text: str) -> str:
    """A serial number as stored (lower-case hex, no 0x), or INVALID_ARGUMENT."""
    serial = text.strip().lower().removeprefix("0x")
    if not serial or len(serial) > MAX_SERIAL or any(c not in "0123456789abcdef" for c in serial):
        raise InvalidArgumentError(f"serial {shown(text)} is not a hexadecimal serial number; "
                                   "`trustmesh partner list` shows them")
    return serial


class PartnerCertificates:
    """Issue, list and revoke partner certificates; `actor` names who asked, for the audit log."""

    def __init__(self, rt: ServerRuntime) -> None:
        self._rt = rt

    async def issue(self, request: PartnerRequest, actor: str) -> IssuedCertificate:
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
            serial=serial, spiffe_id=spiffe_id, not_after=expires, issued_at=self._rt.clock(),
            issued_by=actor))
        await self._rt.audit.record("partner.issue", actor=actor, subject=str(spiffe_id), serial=serial,
                                    not_after=int(expires))
        return IssuedCertificate(tuple(svid.cert_chain), serial, expires)

    async def certificates(self) -> list[PartnerCertificate]:
        """Every partner certificate on record (revoked ones included until they expire), by serial."""
        return sorted(await self._rt.store.list_partner_certificates(), key=lambda c: c.serial)

    async def revoke(self, serial_text: str, reason: str, actor: str) -> PartnerCertificate:
        serial = check_serial(serial_text)
        if len(reason) > MAX_REASON:
            raise InvalidArgumentError(f"--reason is longer than {MAX_REASON} characters")
        cert, revision = await self._rt.store.get_partner_certificate(serial)
        if cert.revoked_at:
            raise FailedPreconditionError(f"partner certificate {serial} ({cert.spiffe_id}) is already revoked")
        revoked = replace(cert, revoked_at=self._rt.clock(), reason=reason)
        await self._rt.store.replace_partner_certificate(revoked, revision)
        await self._rt.audit.record("partner.revoke", actor=actor, subject=str(cert.spiffe_id), serial=serial,
                                    reason=reason)
        return revoked


__all__ = ["IssuedCertificate", "PartnerCertificate", "PartnerCertificates", "PartnerRequest",
           "check_partner_request", "check_serial"]
