"""`trustmesh partner …`: certificates for partners that run no SPIFFE system of their own."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.cli.admin_client import TIMEOUT, AdminCallError, add_socket_flag, call, read_input_file
from trustmesh.cli.config import show_help
from trustmesh.clock import format_utc
from trustmesh.duration import parse_duration
from trustmesh.files import atomic_write

MAX_CSR_FILE = 16 * 1024


def _read_csr(path: Path) -> bytes:
    """The CSR as DER, from a PEM or DER file (the server parses and checks it)."""
    data = read_input_file(path, "--csr", MAX_CSR_FILE, "a certificate signing request")
    if b"-----BEGIN" in data:
        try:
            return x509.load_pem_x509_csr(data).public_bytes(serialization.Encoding.DER)
        except ValueError as err:
            raise AdminCallError(f"--csr {path} is not a PEM certificate signing request: {err}") from err
    return data


def _issue(args: argparse.Namespace) -> int:
    try:
        ttl = int(parse_duration(args.ttl).total_seconds())
    except ValueError as err:
        raise AdminCallError(f"--ttl: {err}") from err
    req = admin_pb2.IssuePartnerCertificateRequest(spiffe_id=args.spiffe_id, csr=_read_csr(Path(args.csr)),
                                                   ttl_seconds=ttl)
    reply = call(args, lambda s: s.IssuePartnerCertificate(req, timeout=TIMEOUT))
    pem = b"".join(x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM)
                   for c in reply.cert_chain)
    out = Path(args.out)
    # A certificate is public, but write it whole or not at all.
    try:
        atomic_write(out, pem, 0o644)
    except OSError as err:
        raise AdminCallError(f"cannot write --out {out}: {err.strerror}") from err
    print(f"issued {args.spiffe_id}: serial {reply.serial}, expires "
          f"{format_utc(x509.load_der_x509_certificate(reply.cert_chain[0]).not_valid_after_utc)}; "
          f"chain written to {out}")
    print(f"revoke with: trustmesh partner revoke {reply.serial}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    req = admin_pb2.RevokePartnerCertificateRequest(serial=args.serial, reason=args.reason or "")
    call(args, lambda s: s.RevokePartnerCertificate(req, timeout=TIMEOUT))
    print(f"revoked {args.serial}: every agent refuses it from its next handshake on")
    return 0


EXAMPLES = """\
examples:
  # the partner made a key and a CSR (it keeps the key):
  #   openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout acme.key \\
  #       -subj /CN=acme -out acme.csr
  trustmesh partner issue --spiffe-id spiffe://example.org/partners/acme --csr acme.csr --ttl 24h --out acme.pem
  trustmesh partner revoke 5f2c0e... --reason "key exposed"
then allow spiffe://example.org/partners/acme in an allowlist like any other ID.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    partner = commands.add_parser("partner", help="issue and revoke certificates for partners without SPIFFE",
                                  description="Certificates for partners that run no SPIFFE system: signed from "
                                              "the partner's CSR (the key stays with the partner) by a partner CA "
                                              "under this trust domain's root; every issue and revocation is "
                                              "audited.",
                                  epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = partner.add_subparsers(dest="partner_command", metavar="SUBCOMMAND", title="subcommands")
    p = sub.add_parser("issue", help="sign a partner's CSR", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spiffe-id", required=True, help="spiffe://<trust domain>/partners/NAME")
    p.add_argument("--csr", required=True, metavar="FILE", help="the partner's PKCS#10 CSR (PEM or DER)")
    p.add_argument("--ttl", default="24h", help="lifetime (default 24h, at most 30d)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the certificate chain (PEM)")
    add_socket_flag(p)
    p.set_defaults(func=_issue)
    p = sub.add_parser("revoke", help="revoke a partner certificate; agents refuse it at the next handshake")
    p.add_argument("serial", help="the certificate's serial (hex), as `partner issue` printed it")
    p.add_argument("--reason", help="why (kept in the audit log)")
    add_socket_flag(p)
    p.set_defaults(func=_revoke)
    partner.set_defaults(func=show_help(partner))
