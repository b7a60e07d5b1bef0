"""`trustmesh ca …`: show the CA journal and rotate the root by hand.

The leader replica rotates the root on its own schedule (prepare at half the active root's
life, activate at two thirds, retire once nothing valid chains to the old root); these
commands show where that stands and take a step now, e.g. after a suspected compromise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call, print_json
from trustmesh.cli.config import show_help
from trustmesh.clock import format_utc

_KINDS = {
    admin_pb2.CA_AUTHORITY_KIND_X509_ROOT: "root",
    admin_pb2.CA_AUTHORITY_KIND_X509_SIGNING: "signing-ca",
    admin_pb2.CA_AUTHORITY_KIND_JWT_KEY: "jwt-key",
}
_STATES = {
    admin_pb2.CA_AUTHORITY_STATE_PREPARED: "prepared",
    admin_pb2.CA_AUTHORITY_STATE_ACTIVE: "active",
    admin_pb2.CA_AUTHORITY_STATE_OLD: "old",
}
_STEPS = {
    "next": admin_pb2.ROOT_ROTATION_STEP_UNSPECIFIED,
    "prepare": admin_pb2.ROOT_ROTATION_STEP_PREPARE,
    "activate": admin_pb2.ROOT_ROTATION_STEP_ACTIVATE,
    "retire": admin_pb2.ROOT_ROTATION_STEP_RETIRE,
}


def _authority(a: admin_pb2.CAAuthority) -> dict[str, Any]:
    pem = ""
    if a.certificate:
        pem = x509.load_der_x509_certificate(a.certificate).public_bytes(serialization.Encoding.PEM).decode()
    return {
        "certificate_pem": pem,
        "kind": _KINDS.get(a.kind, "unknown"), "state": _STATES.get(a.state, "unknown"),
        "id": a.key_id if a.kind != admin_pb2.CA_AUTHORITY_KIND_X509_SIGNING else a.serial,
        "serial": a.serial, "root": a.key_id if a.kind == admin_pb2.CA_AUTHORITY_KIND_X509_SIGNING else "",
        "replica": a.replica, "not_before": a.not_before, "not_after": a.not_after,
        "prepared_at": a.prepared_at, "activated_at": a.activated_at, "retired_at": a.retired_at,
        "key_store": a.key_store, "issuer": a.issuer,
    }


def _print_table(authorities: list[dict[str, Any]]) -> None:
    print(f"{'KIND':<11} {'STATE':<9} {'ID':<34} {'NOT AFTER':<21} {'ACTIVATED':<21} DETAIL")
    for a in authorities:
        detail = f"replica {a['replica']}, under root {a['root']}" if a["kind"] == "signing-ca" else "; ".join(
            part for part in (f"key: {a['key_store']}" if a["key_store"] else "",
                              f"signed by {a['issuer']}" if a["issuer"] else "",
                              f"old since {format_utc(a['retired_at'])}" if a["state"] == "old" else "") if part)
        print(f"{a['kind']:<11} {a['state']:<9} {a['id'][:34]:<34} {format_utc(a['not_after']):<21} "
              f"{format_utc(a['activated_at']):<21} {detail}")


def _show(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.GetCAJournal(admin_pb2.GetCAJournalRequest(), timeout=TIMEOUT))
    authorities = [_authority(a) for a in reply.authorities]
    if args.json:
        print_json({"authorities": authorities, "leader": reply.leader, "next_step": reply.next_step})
        return 0
    _print_table(authorities)
    print(f"\nleader replica: {reply.leader or 'none right now'}")
    print(f"next automatic step: {reply.next_step or 'none due'}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    req = admin_pb2.RotateRootRequest(step=_STEPS[args.step], force=args.force)
    reply = call(args, lambda s: s.RotateRoot(req, timeout=TIMEOUT))
    if reply.forced:
        print("warning: --force activated the new root before every federated partner can have fetched it; "
              "partners that have not refreshed their bundle refuse SVIDs under it until they do", file=sys.stderr)
    if args.json:
        print_json({"detail": reply.detail, "forced": reply.forced,
                    "authorities": [_authority(a) for a in reply.authorities]})
        return 0
    print(reply.detail)
    _print_table([_authority(a) for a in reply.authorities])
    return 0


ROTATE_EPILOG = """\
a root rotation has three steps, each safe on its own:
  prepare   a new root (and JWT key) enters the bundle; agents and workloads receive it at
            once, partners at their next bundle refresh; nothing is signed with it yet
  activate  signing CAs of every replica move under the new root; new SVIDs chain to it,
            existing ones stay valid (the old root is still in the bundle); refused until
            the new root has been in the bundle for the bundle refresh hint
            (--bundle-refresh-hint), so partners hold it; --force overrides, audited
  retire    the old root leaves the bundle; refused while any signing CA under it is
            unexpired, because SVIDs chaining to it may still be in use

examples:
  trustmesh ca rotate                    # the next step: prepare, or activate if prepared
  trustmesh ca rotate --step activate    # after agents and partners have the new root
  trustmesh ca show                      # what is prepared, active and old, and the leader
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = commands.add_parser("ca", help="show the CA journal; rotate the root CA",
                             description="The CA journal: roots, each replica's signing CA and the JWT keys, "
                                         "with their states (prepared, active, old).")
    sub = ca.add_subparsers(dest="ca_command", metavar="SUBCOMMAND", title="subcommands")
    p = sub.add_parser("show", help="print the roots, signing CAs and JWT keys with their states",
                       description="Print every authority in the CA journal, the leader replica and the next "
                                   "step of the automatic root rotation.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_socket_flag(p)
    p.set_defaults(func=_show)
    p = sub.add_parser("rotate", help="take a root rotation step now (prepare, activate or retire)",
                       description="Take one step of a root rotation now instead of waiting for the automatic "
                                   "schedule. Every step is audited.",
                       epilog=ROTATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", choices=list(_STEPS), default="next",
                   help="which step (default next: prepare when nothing is prepared, else activate)")
    p.add_argument("--force", action="store_true",
                   help="activate even before federated partners can have fetched the new root (audited)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_socket_flag(p)
    p.set_defaults(func=_rotate)
    ca.set_defaults(func=show_help(ca))
