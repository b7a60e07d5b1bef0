"""`trustmesh federation …`: trust partner trust domains (SPIFFE federation)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.cli.admin_client import TIMEOUT, AdminCallError, add_socket_flag, call, print_json, read_input_file
from trustmesh.cli.config import show_help
from trustmesh.clock import format_utc

_PROFILES = {
    "https_web": admin_pb2.BUNDLE_ENDPOINT_PROFILE_HTTPS_WEB,
    "https_spiffe": admin_pb2.BUNDLE_ENDPOINT_PROFILE_HTTPS_SPIFFE,
}
_NAMES = {v: k for k, v in _PROFILES.items()}
MAX_BUNDLE_FILE = 1024 * 1024


def _relationship(r: admin_pb2.FederationRelationship) -> dict[str, Any]:
    return {"trust_domain": r.trust_domain, "endpoint": r.bundle_endpoint_url,
            "profile": _NAMES.get(r.profile, ""), "endpoint_spiffe_id": r.endpoint_spiffe_id,
            "bundle_sequence": r.bundle_sequence_number, "last_refreshed_at": r.last_refreshed_at,
            "last_error": r.last_error}


def _add(args: argparse.Namespace) -> int:
    bundle = b""
    if args.bundle_file:
        bundle = read_input_file(Path(args.bundle_file), "--bundle-file", MAX_BUNDLE_FILE, "a SPIFFE bundle")
    if args.endpoint and not args.profile:
        raise AdminCallError("--endpoint needs --profile https_web or https_spiffe")
    req = admin_pb2.CreateFederationRelationshipRequest(
        trust_domain=args.trust_domain, bundle_endpoint_url=args.endpoint or "",
        profile=_PROFILES.get(args.profile or "", admin_pb2.BUNDLE_ENDPOINT_PROFILE_UNSPECIFIED),
        endpoint_spiffe_id=args.endpoint_spiffe_id or "", bundle=bundle)
    reply = call(args, lambda s: s.CreateFederationRelationship(req, timeout=TIMEOUT))
    r = reply.relationship
    where = f"from {r.bundle_endpoint_url} ({_NAMES.get(r.profile, '')})" if r.bundle_endpoint_url else "set by hand"
    print(f"federating with {r.trust_domain}: bundle {where}")
    return 0


def _list(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.ListFederationRelationships(admin_pb2.ListFederationRelationshipsRequest(),
                                                               timeout=TIMEOUT))
    items = [_relationship(r) for r in reply.relationships]
    if args.json:
        print_json(items)
        return 0
    if not items:
        print("no federation relationships: only this trust domain's SVIDs are trusted")
    for r in items:
        source = f"{r['endpoint']} ({r['profile']})" if r["endpoint"] else "bundle set by hand"
        state = f"error: {r['last_error']}" if r["last_error"] else "ok"
        print(f"{r['trust_domain']:<32} {source:<56} seq {r['bundle_sequence']:<6} "
              f"refreshed {format_utc(r['last_refreshed_at'], missing='never')}  {state}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    req = admin_pb2.DeleteFederationRelationshipRequest(trust_domain=args.trust_domain)
    call(args, lambda s: s.DeleteFederationRelationship(req, timeout=TIMEOUT))
    print(f"no longer federating with {args.trust_domain}: its bundle is withdrawn from every agent")
    return 0


def _refresh(args: argparse.Namespace) -> int:
    req = admin_pb2.RefreshFederatedBundleRequest(trust_domain=args.trust_domain)
    reply = call(args, lambda s: s.RefreshFederatedBundle(req, timeout=TIMEOUT))
    b = reply.bundle
    print(f"{b.trust_domain}: {len(b.x509_authorities)} X.509 authorities, {len(b.jwt_authorities)} JWT keys, "
          f"sequence {b.sequence_number}")
    return 0


EXAMPLES = """\
examples:
  # a partner running SPIFFE (SPIRE, trustmesh, …) with an SVID-authenticated endpoint;
  # its current bundle comes out of band once, later ones from the endpoint
  trustmesh federation add --trust-domain partner.example --endpoint https://bundle.partner.example:8443/ \\
      --profile https_spiffe --endpoint-spiffe-id spiffe://partner.example/spire/server \\
      --bundle-file partner-bundle.json
  # a partner whose endpoint has a web-PKI certificate
  trustmesh federation add --trust-domain bank.example --endpoint https://spiffe.bank.example/bundle \\
      --profile https_web
  # a partner without an endpoint: keep its bundle by hand
  trustmesh federation add --trust-domain legacy.example --bundle-file legacy-bundle.json
  trustmesh federation list
  trustmesh federation refresh partner.example
  trustmesh federation remove partner.example
then let workloads trust it: `trustmesh entry create … --federates-with partner.example`,
and allow its IDs in an allowlist like any other.
"""


def _bundle_show(args: argparse.Namespace) -> int:
    req = admin_pb2.GetBundleRequest(trust_domain=args.trust_domain or "")
    reply = call(args, lambda s: s.GetBundle(req, timeout=TIMEOUT))
    if args.format == "spiffe":
        print(reply.spiffe_bundle.decode())
    else:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        for der in reply.bundle.x509_authorities:
            print(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode(), end="")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bundle = commands.add_parser("bundle", help="print a trust bundle (this trust domain's, or a partner's)",
                                 description="Print a trust bundle: this trust domain's (to hand to a partner "
                                             "out of band, for `federation add --bundle-file`) or a federated one.")
    bsub = bundle.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND", title="subcommands")
    p = bsub.add_parser("show", help="print the bundle",
                        epilog="example:\n  trustmesh bundle show > example.org-bundle.json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trust-domain", help="a federated trust domain (default: this server's own)")
    p.add_argument("--format", choices=["spiffe", "pem"], default="spiffe",
                   help="spiffe: the SPIFFE bundle document (JWKS JSON, default); pem: the X.509 roots")
    add_socket_flag(p)
    p.set_defaults(func=_bundle_show)
    bundle.set_defaults(func=show_help(bundle))

    fed = commands.add_parser("federation", help="trust partner trust domains (SPIFFE federation)",
                              description="Federation relationships: whose bundles this trust domain fetches, "
                                          "keeps current and hands to the workloads that federate with them.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = fed.add_subparsers(dest="federation_command", metavar="SUBCOMMAND", title="subcommands")
    p = sub.add_parser("add", help="federate with a partner trust domain",
                       description="Federate with a partner: fetch its bundle from its bundle endpoint (refreshed "
                                   "per its refresh hint by the leader replica), or keep the bundle you give.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trust-domain", required=True, help="the partner's trust domain, e.g. partner.example")
    p.add_argument("--endpoint", metavar="URL", help="the partner's SPIFFE bundle endpoint (https://…)")
    p.add_argument("--profile", choices=list(_PROFILES), help="how the endpoint authenticates")
    p.add_argument("--endpoint-spiffe-id", metavar="ID", help="https_spiffe: the endpoint's SPIFFE ID")
    p.add_argument("--bundle-file", metavar="FILE",
                   help="the partner's SPIFFE bundle (JWKS JSON), obtained out of band; required with "
                        "https_spiffe, or alone for a partner without an endpoint")
    add_socket_flag(p)
    p.set_defaults(func=_add)
    p = sub.add_parser("list", help="the relationships, their bundle sequence and last refresh")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_socket_flag(p)
    p.set_defaults(func=_list)
    p = sub.add_parser("remove", help="stop federating; the partner's bundle leaves every agent")
    p.add_argument("trust_domain", help="the partner's trust domain")
    add_socket_flag(p)
    p.set_defaults(func=_remove)
    p = sub.add_parser("refresh", help="fetch the partner's bundle now")
    p.add_argument("trust_domain", help="the partner's trust domain")
    add_socket_flag(p)
    p.set_defaults(func=_refresh)
    fed.set_defaults(func=show_help(fed))
