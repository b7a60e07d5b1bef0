"""TLS plumbing shared by the agent's listeners and the server's bundle endpoint.

Private keys reach OpenSSL through an anonymous memory file (memfd), never a disk file:
`ssl.SSLContext.load_cert_chain` accepts only paths.
"""

from __future__ import annotations

import os
import ssl

from cryptography import x509


def load_key_and_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("trustmesh-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[x509.Certificate]:
    """The chain the peer presented, leaf first (before any verification of ours)."""
    # Python 3.11 exposes the presented chain only privately (public in 3.13).
    raw = ssl_object._sslobj.get_unverified_chain() or []  # type: ignore[union-attr]
    return [x509.load_der_x509_certificate(c.public_bytes(ssl._ssl.ENCODING_DER)) for c in raw]  # type: ignore[attr-defined]
