"""TLS contexts from SVIDs, and SPIFFE verification of the peer after the handshake.

stdlib `ssl` has no per-certificate verification callback and one context's trust store
mixes every trust domain. So OpenSSL checks the chain against all roots we trust, and then,
before a single byte is forwarded, we take the peer's chain, read its SPIFFE ID and verify
the chain again with `cryptography` against the bundle of that ID's own trust domain only:
a partner's CA can never vouch for an ID in our trust domain.

Private keys reach OpenSSL through an anonymous memory file (memfd), never a disk file.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.bundle import BundleSet
from trustmesh.errors import VerificationError
from trustmesh.spiffeid import SpiffeId
from trustmesh.x509svid import X509Svid, verify_x509_svid


def _load_chain(ctx: ssl.SSLContext, svid: X509Svid) -> None:
    assert svid.private_key is not None
    key_pem = svid.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
    fd = os.memfd_create("trustmesh-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, svid.chain_pem() + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


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


def peer_chain(ssl_object: ssl.SSLObject) -> list[x509.Certificate]:
    # Python 3.11 exposes the presented chain only privately (public in 3.13).
    raw = ssl_object._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
    return [x509.load_der_x509_certificate(c.public_bytes(ssl._ssl.ENCODING_DER)) for c in raw]  # type: ignore[attr-defined]


def verify_peer(ssl_object: ssl.SSLObject, bundles: BundleSet, now: Callable[[], datetime] | None = None) -> SpiffeId:
    chain = peer_chain(ssl_object)
    if not chain:
        raise VerificationError("the peer presented no certificate")
    return verify_x509_svid(chain, bundles.x509_anchors(), now=(now or (lambda: datetime.now(timezone.utc)))())
