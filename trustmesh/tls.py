"""TLS plumbing shared by the agent's listeners and the server's HTTPS listeners (the bundle
endpoint, the web console).

Private keys reach OpenSSL through an anonymous memory file (memfd), never a disk file:
`ssl.SSLContext.load_cert_chain` accepts only paths.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Protocol

from cryptography import x509

from trustmesh.errors import TrustmeshError


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


class SvidSource(Protocol):
    """A serving certificate that rotates: the current chain and key (PEM), and a number that
    changes whenever they do (the server's ServingCredentials)."""

    version: int
    chain_pem: bytes
    key_pem: bytes


def _server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def rotating_server_context(svid: SvidSource) -> ssl.SSLContext:
    """A server context that always serves `svid`'s newest certificate: its SNI callback swaps
    in a context built from the current chain per handshake, rebuilt only after a rotation
    (the callback runs for every handshake, with or without a server name)."""
    built: list[tuple[int, ssl.SSLContext]] = []  # (version, context): the newest only

    def current() -> ssl.SSLContext:
        if not built or built[0][0] != svid.version:
            ctx = _server_context()
            load_key_and_chain(ctx, svid.chain_pem, svid.key_pem)
            built[:] = [(svid.version, ctx)]
        return built[0][1]

    def pick(ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        ssl_object.context = current()

    base = current()
    base.sni_callback = pick
    return base


def server_context_from_files(cert_file: Path, key_file: Path, flags: str) -> ssl.SSLContext:
    """A server context from a certificate chain and key on disk (web PKI); a file that cannot
    be loaded is an error naming `flags`, the options that gave them."""
    ctx = _server_context()
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as err:
        raise TrustmeshError(f"cannot load the certificate {cert_file} and key {key_file}: {err}; "
                             f"check {flags}") from err
    return ctx
