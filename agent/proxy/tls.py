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


def server_context(svid: X509Svid, bundles: BundleSet, *, allow_tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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


def verify_peer(ssl_object: ssl.SSLObject, bundles: BundleSet, now: Clock = utc_now,
                revoked: frozenset[str] = frozenset()) -> SpiffeId:
    chain = peer_chain(ssl_object)
    if not chain:
        raise VerificationError("the peer presented no certificate")
    found = verify_x509_svid(chain, bundles.x509_anchors(), now=now())
    for cert in chain:
        serial = f"{cert.serial_number:x}"
        if serial in revoked:
            raise CertificateRevokedError(found, serial)
    return found
