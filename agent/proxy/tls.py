"""TLS contexts from SVIDs, and SPIFFE verification of the peer after the handshake.

stdlib `ssl` has no per-certificate verification callback and one context's trust store
mixes every trust domain. So OpenSSL checks the chain against all roots we trust, and then,
before a single byte is forwarded, we take the peer's chain, read its SPIFFE ID and verify
the chain again with `cryptography` against the bundle of that ID's own trust domain only:
a partner's CA can never vouch for an ID in our trust domain.

Private keys reach OpenSSL through an anonymous memory file (memfd; see trustmesh.tls).
"""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.bundle import BundleSet
from trustmesh.clock import Clock, utc_now
from trustmesh.errors import VerificationError
from trustmesh.spiffeid import SpiffeId
from trustmesh.tls import load_key_and_chain, peer_chain
from trustmesh.x509svid import X509Svid, verify_x509_svid


def _load_chain(ctx: ssl.SSLContext, svid: X509Svid) -> None:
    assert svid.private_key is not None
    key_pem = svid.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
    load_key_and_chain(ctx, svid.chain_pem(), key_pem)


def _roots_pem(bundles: BundleSet) -> str:
    return "".join(b.x509_authorities_pem().decode() for b in bundles.values())


def server_context(svid: X509Svid, bundles: BundleSet, *, allow_tls12: bool = False,
                   alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """`alpn`: the application protocols offered (an http listener says http/1.1, so a client
    that also speaks h2 does not try it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if allow_tls12 else ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=_roots_pem(bundles))
    _load_chain(ctx, svid)
    return ctx


def client_context(svid: X509Svid, bundles: BundleSet) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the peer is checked by SPIFFE ID after the handshake instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=_roots_pem(bundles))
    _load_chain(ctx, svid)
    return ctx


class CertificateRevokedError(VerificationError):
    """The chain verified, but one of its certificates was revoked (a partner certificate)."""

    def __init__(self, spiffe_id: SpiffeId, serial: str) -> None:
        self.spiffe_id = spiffe_id
        self.serial = serial
        super().__init__(f"{spiffe_id} presented certificate {serial}, which was revoked")


def serial_text(cert: x509.Certificate) -> str:
    """A certificate's serial as revocations name it (lower-case hex)."""
    return f"{cert.serial_number:x}"


def chain_serials(ssl_object: ssl.SSLObject) -> frozenset[str]:
    """The serials of every certificate the peer presented, to check later revocations against."""
    return frozenset(serial_text(cert) for cert in peer_chain(ssl_object))


def verify_peer(ssl_object: ssl.SSLObject, bundles: BundleSet, now: Clock = utc_now,
                revoked: frozenset[str] = frozenset()) -> SpiffeId:
    chain = peer_chain(ssl_object)
    if not chain:
        raise VerificationError("the peer presented no certificate")
    found = verify_x509_svid(chain, bundles.x509_anchors(), now=now())
    for cert in chain:
        serial = serial_text(cert)
        if serial in revoked:
            raise CertificateRevokedError(found, serial)
    return found


# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) that a refused client certificate reports.
_VERIFY_REASONS = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "not_yet_valid",
    10: "expired",
    18: "unknown_ca",  # self-signed certificate
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    23: "revoked",
}


def handshake_failure(err: BaseException) -> str:
    """A short, fixed label for why a TLS handshake failed (a metric label, an audit reason):
    no_client_certificate, unknown_ca, expired, not_yet_valid, revoked, bad_certificate,
    protocol (no common TLS version or cipher), not_tls, client_alert (the client refused us),
    timeout, closed (the client went away), tls_error (anything else OpenSSL refused)."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(err.verify_code, "bad_certificate")
    if isinstance(err, ssl.SSLError):
        reason = err.reason or ""
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"):
            return "no_client_certificate"
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL"):
            return "not_tls"
        if reason in ("UNSUPPORTED_PROTOCOL", "NO_SHARED_CIPHER", "NO_PROTOCOLS_AVAILABLE",
                      "TLSV1_ALERT_PROTOCOL_VERSION", "VERSION_TOO_LOW"):
            return "protocol"
        if reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
            return "client_alert"
        if isinstance(err, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
            return "closed"
        return "tls_error"
    if isinstance(err, (ConnectionAbortedError, TimeoutError)):
        return "timeout"  # asyncio aborts a handshake that outlives its timeout
    return "closed"
