"""`trustmesh quarantine …`: identities and nodes in quarantine (continuous verification)."""

from __future__ import annotations

import argparse

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call, message_dict, print_json
from trustmesh.cli.config import show_help
from trustmesh.clock import format_utc

EXAMPLES = """\
examples:
  trustmesh quarantine list
  trustmesh quarantine list --json | jq -r '.[].target'
  trustmesh quarantine add spiffe://bank.example/payments --reason "INC-4711: credential seen off the mesh"
  trustmesh quarantine add node-7 --node --reason "INC-4712: host compromised"
  trustmesh quarantine release spiffe://bank.example/payments --reason "key rotated, host rebuilt" --otp 123456
  trustmesh quarantine release node-7 --reason "host reimaged" --otp 123456
"""


def _add(args: argparse.Namespace) -> int:
    req = admin_pb2.AddQuarantineRequest(target=args.id, kind="node" if args.node else "identity",
                                         reason=args.reason)
    q = call(args, lambda s: s.AddQuarantine(req, timeout=TIMEOUT)).quarantine
    print(f"quarantined {_what(q)}: agents refuse it and cut its connections within a second; "
          "the CA issues it nothing until it is released")
    return 0


def _release(args: argparse.Namespace) -> int:
    req = admin_pb2.ReleaseQuarantineRequest(target=args.id, reason=args.reason)
    q = call(args, lambda s: s.ReleaseQuarantine(req, timeout=TIMEOUT)).quarantine
    print(f"released {_what(q)} (in quarantine since {format_utc(q.created_at)}, by {q.created_by})")
    return 0


def _list(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.ListQuarantines(admin_pb2.ListQuarantinesRequest(), timeout=TIMEOUT))
    if args.json:
        print_json([message_dict(q) for q in reply.quarantines])
        return 0
    print(f"{'SINCE':<20} {'KIND':<8} {'BY':<34} {'TARGET':<50} REASON")
    for q in reply.quarantines:
        by = f"{q.created_by} ({q.detector}, {q.score:.2f})" if q.detector else q.created_by
        print(f"{format_utc(q.created_at):<20} {q.kind:<8} {by:<34} {_what(q):<50} {q.reason}")
    return 0


def _what(q: admin_pb2.Quarantine) -> str:
    return f"node {q.node} ({q.target})" if q.kind == "node" else q.target


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    top = commands.add_parser(
        "quarantine", help="identities and nodes in quarantine: list, add, release (security officers)",
        description="An identity in quarantine is refused by every agent, from and to, its open connections are "
                    "cut within a second, and the CA issues it no SVID; a node in quarantine refuses everything "
                    "on it and gets no workload SVID. Response rules put identities there automatically "
                    "(`kind: Response`); security officers add and release by hand. Every step is audited.",
        epilog=EXAMPLES, formatter_class=fmt)
    sub = top.add_subparsers(dest="quarantine_command", metavar="SUBCOMMAND", title="subcommands")

    p = sub.add_parser("list", help="list what is in quarantine (a table, or --json)",
                       description="List the identities and nodes in quarantine: since when (UTC), who put them "
                                   "there (an operator, or the detector with its score) and why.",
                       epilog="examples:\n  trustmesh quarantine list\n  trustmesh quarantine list --json",
                       formatter_class=fmt)
    p.add_argument("--json", action="store_true", help="print JSON (times as seconds since the epoch)")
    add_socket_flag(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("add", help="put an identity (or, with --node, a node) in quarantine (security-officer)",
                       description="Put a workload's SPIFFE ID (of this trust domain or a federated one) in "
                                   "quarantine, or with --node every workload of a node. Agents enforce it within "
                                   "a second; the agent of a quarantined node keeps its own identity, so that it "
                                   "learns of the release.",
                       epilog="examples:\n"
                              '  trustmesh quarantine add spiffe://bank.example/payments --reason "INC-4711"\n'
                              '  trustmesh quarantine add node-7 --node --reason "INC-4712: host compromised"',
                       formatter_class=fmt)
    p.add_argument("id", metavar="ID", help="the SPIFFE ID, or with --node the node name")
    p.add_argument("--node", action="store_true", help="ID is a node name: quarantine the whole node")
    p.add_argument("--reason", required=True, metavar="TEXT",
                   help="why: the security officer who releases it and the auditors read it")
    add_socket_flag(p)
    p.set_defaults(func=_add)

    p = sub.add_parser("release", help="end a quarantine (security-officer, --otp)",
                       description="End the quarantine of a SPIFFE ID or a node (by its name). Needs the "
                                   "security-officer role and a current one-time code (--otp). Agents allow it "
                                   "again within a second, as the allowlists say, and the CA issues it SVIDs.",
                       epilog="examples:\n"
                              '  trustmesh quarantine release spiffe://bank.example/payments --reason "key rotated" '
                              "--otp 123456\n"
                              '  trustmesh quarantine release node-7 --reason "host reimaged" --otp 123456',
                       formatter_class=fmt)
    p.add_argument("id", metavar="ID", help="the SPIFFE ID, or the node name (`trustmesh quarantine list`)")
    p.add_argument("--reason", required=True, metavar="TEXT", help="why it is safe again, for the auditors")
    add_socket_flag(p)
    p.set_defaults(func=_release)
    top.set_defaults(func=show_help(top))
