"""`trustmesh access …`: just-in-time access with four-eyes approval, and break-glass."""

from __future__ import annotations

import argparse

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.cli.admin_client import TIMEOUT, AdminCallError, add_socket_flag, call, message_dict, print_json
from trustmesh.cli.config import show_help
from trustmesh.clock import format_utc
from trustmesh.duration import parse_duration

STATES = ("pending", "active", "expired", "denied", "revoked", "review")

EXAMPLES = """\
examples:
  trustmesh access request --from spiffe://bank.example/ns/ops/sa/debug --to spiffe://bank.example/ledger \\
      --port 5432 --for 30m --reason "INC-4711: reconcile the ledger"          # prints the request ID
  trustmesh access approve 3f9a1c2b7d4e --otp 123456    # by a security-officer, never the requester
  trustmesh access deny 3f9a1c2b7d4e --reason "use the read replica"
  trustmesh access list --state pending --json
  trustmesh access revoke 3f9a1c2b7d4e --reason "incident closed"
  trustmesh access break-glass --from spiffe://bank.example/ops --to spiffe://bank.example/ledger --port 5432 \\
      --for 15m --reason "INC-4712: ledger down" --otp 123456
  trustmesh access review 9c0d2e4f6a8b --note "checked: used as stated"
"""


def _seconds(text: str) -> int:
    try:
        return int(parse_duration(text).total_seconds())
    except ValueError as err:
        raise AdminCallError(f"--for: {err}") from err


def _request(args: argparse.Namespace) -> int:
    req = admin_pb2.RequestAccessRequest(source=args.source, destination=args.destination, port=args.port,
                                         duration_seconds=_seconds(args.duration), reason=args.reason)
    reply = call(args, lambda s: s.RequestAccess(req, timeout=TIMEOUT))
    print(reply.grant.id)  # one line: the request ID, for a script or a ticket
    return 0


def _approve(args: argparse.Namespace) -> int:
    grant = call(args, lambda s: s.ApproveAccess(admin_pb2.ApproveAccessRequest(id=args.id), timeout=TIMEOUT)).grant
    if grant.state == "active":
        print(f"approved {grant.id}: {_subject(grant)} is allowed until {format_utc(grant.expires_at)}")
    else:
        print(f"approved {grant.id}: {len(grant.approvals)} of {grant.required_approvals} approvals; "
              "it takes effect once another approver agrees")
    return 0


def _deny(args: argparse.Namespace) -> int:
    req = admin_pb2.DenyAccessRequest(id=args.id, reason=args.reason)
    grant = call(args, lambda s: s.DenyAccess(req, timeout=TIMEOUT)).grant
    print(f"denied {grant.id} ({_subject(grant)}), requested by {grant.requester}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    req = admin_pb2.RevokeAccessRequest(id=args.id, reason=args.reason or "")
    grant = call(args, lambda s: s.RevokeAccess(req, timeout=TIMEOUT)).grant
    print(f"revoked {grant.id}: {_subject(grant)} is no longer allowed; agents drop it within a second")
    return 0


def _break_glass(args: argparse.Namespace) -> int:
    req = admin_pb2.BreakGlassRequest(source=args.source, destination=args.destination, port=args.port,
                                      duration_seconds=_seconds(args.duration), reason=args.reason)
    grant = call(args, lambda s: s.BreakGlass(req, timeout=TIMEOUT)).grant
    print(f"break-glass {grant.id}: {_subject(grant)} is allowed until {format_utc(grant.expires_at)}; "
          f"another operator must review it (`trustmesh access review {grant.id}`)")
    return 0


def _review(args: argparse.Namespace) -> int:
    req = admin_pb2.ReviewAccessRequest(id=args.id, note=args.note or "")
    grant = call(args, lambda s: s.ReviewAccess(req, timeout=TIMEOUT)).grant
    print(f"reviewed break-glass {grant.id} (used by {grant.requester})")
    return 0


def _list(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.ListAccess(admin_pb2.ListAccessRequest(state=args.state or ""), timeout=TIMEOUT))
    if args.json:
        print_json([message_dict(g) for g in reply.grants])
        return 0
    print(f"{'ID':<12} {'STATE':<8} {'REQUESTER':<34} {'UNTIL':<20} {'APPROVED BY':<30} ACCESS")
    for g in reply.grants:
        until = g.expires_at if g.state in ("active", "expired") and g.expires_at else g.approve_by
        who = ",".join(g.approvals) or ("break-glass" + ("" if g.reviewed_by else " (review due)")
                                        if g.break_glass else "-")
        print(f"{g.id:<12} {g.state:<8} {g.requester:<34} {format_utc(until):<20} {who:<30} {_subject(g)}")
    return 0


def _subject(grant: admin_pb2.AccessGrant) -> str:
    return f"{grant.source} -> {grant.destination}:{grant.port}"


def _what(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="ID",
                   help="the source SPIFFE ID (a workload, or yourself: spiffe://<td>/operator/NAME)")
    p.add_argument("--to", dest="destination", required=True, metavar="ID", help="the destination SPIFFE ID")
    p.add_argument("--port", required=True, type=int, metavar="N", help="the destination port")
    p.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                   help="how long, once in force (e.g. 30m; at most the server's --access-max-grant, 8h)")
    p.add_argument("--reason", required=True, metavar="TEXT", help="why: the approver and the auditors read it")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    top = commands.add_parser(
        "access", help="just-in-time access: request, approve (four eyes), list, revoke, break-glass",
        description="Extra access for a bounded time, approved by someone other than the requester. An "
                    "approved request becomes an allow rule every agent enforces within a second and that lapses "
                    "by itself; a request not approved within the server's --access-approval-window (1h) "
                    "expires. Every step is audited with the requester and the approver.",
        epilog=EXAMPLES, formatter_class=fmt)
    sub = top.add_subparsers(dest="access_command", metavar="SUBCOMMAND", title="subcommands")

    p = sub.add_parser("request", help="ask for access; prints the request ID",
                       description="Ask for SOURCE to reach DESTINATION:PORT for a while. Any operator may ask, "
                                   "for itself or for a workload. Prints one line: the request ID.",
                       epilog=EXAMPLES, formatter_class=fmt)
    _what(p)
    add_socket_flag(p)
    p.set_defaults(func=_request)

    p = sub.add_parser("approve", help="approve a pending request (security-officer, never its requester; --otp)",
                       description="Approve a pending request. Needs the security-officer role and a current "
                                   "one-time code (--otp); the requester can never approve its own request, "
                                   "whatever its roles.",
                       epilog="example:\n  trustmesh access approve 3f9a1c2b7d4e --otp 123456", formatter_class=fmt)
    p.add_argument("id", metavar="ID", help="the request ID (`trustmesh access list`)")
    add_socket_flag(p)
    p.set_defaults(func=_approve)

    p = sub.add_parser("deny", help="deny a pending request, with a reason",
                       description="Deny a pending request (security-officer). The requester reads the reason.",
                       epilog='example:\n  trustmesh access deny 3f9a1c2b7d4e --reason "use the read replica"',
                       formatter_class=fmt)
    p.add_argument("id", metavar="ID", help="the request ID")
    p.add_argument("--reason", required=True, metavar="TEXT", help="why it is denied")
    add_socket_flag(p)
    p.set_defaults(func=_deny)

    p = sub.add_parser("list", help="list access requests and grants (a table, or --json)",
                       description="List access requests with their state now: " + ", ".join(STATES[:-1])
                                   + "; `--state review` lists break-glass grants nobody has reviewed yet.",
                       epilog="examples:\n  trustmesh access list --state pending\n  trustmesh access list --json",
                       formatter_class=fmt)
    p.add_argument("--state", choices=STATES, help="only requests in this state")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_socket_flag(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("revoke", help="end an active grant (or withdraw a pending request) now",
                       description="End an active grant now, or withdraw a pending request (security-officer). "
                                   "Agents stop allowing it within a second.",
                       epilog='example:\n  trustmesh access revoke 3f9a1c2b7d4e --reason "incident closed"',
                       formatter_class=fmt)
    p.add_argument("id", metavar="ID", help="the request ID")
    p.add_argument("--reason", metavar="TEXT", help="why, for the audit log")
    add_socket_flag(p)
    p.set_defaults(func=_revoke)

    p = sub.add_parser("break-glass", help="access at once, without approval (admin, --otp); reviewed afterwards",
                       description="Grant access at once, without waiting for an approver: for emergencies. "
                                   "Needs the admin role and --otp. The grant stays flagged in `access list` "
                                   "until another operator records a review (`access review`).",
                       epilog=EXAMPLES, formatter_class=fmt)
    _what(p)
    add_socket_flag(p)
    p.set_defaults(func=_break_glass)

    p = sub.add_parser("review", help="record the review of a break-glass grant (not by its requester)",
                       description="Record that a break-glass grant was reviewed (security-officer or auditor; "
                                   "never the operator who used it).",
                       epilog='example:\n  trustmesh access review 9c0d2e4f6a8b --note "checked: used as stated"',
                       formatter_class=fmt)
    p.add_argument("id", metavar="ID", help="the break-glass grant's ID")
    p.add_argument("--note", metavar="TEXT", help="what the review found")
    add_socket_flag(p)
    p.set_defaults(func=_review)
    top.set_defaults(func=show_help(top))
