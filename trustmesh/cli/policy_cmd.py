"""`trustmesh policy …`: allowlists as code, on files (CI) and on the server alike."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.cli.admin_client import (
    TIMEOUT,
    add_socket_flag,
    call,
    message_dict,
    print_json,
    read_input_file,
)
from trustmesh.cli.config import show_help
from trustmesh.clock import format_utc, parse_utc, utc_now
from trustmesh.errors import InvalidSpiffeIdError, TrustmeshError
from trustmesh.policy import Policy, bundle_documents, load_paths, load_text
from trustmesh.policy.loader import REVISION
from trustmesh.spiffeid import SpiffeId

EXAMPLES = """\
examples (the same files in CI and in production):
  trustmesh policy lint policies/                       # exit 0 clean, 1 problems, 2 unreadable
  trustmesh policy lint --strict policies/              # expired rules are problems too
  trustmesh policy test policies/ --from spiffe://example.org/payments \\
      --to spiffe://example.org/ledger --port 9443      # exit 0 allow, 1 deny, 2 invalid input
  trustmesh policy test policies/ --from spiffe://partner.example/settlement \\
      --to spiffe://example.org/ledger --at 2027-01-01T00:00:00Z   # as of that time
  trustmesh policy diff policies/                       # what apply would change
  trustmesh policy apply policies/ --comment "JIRA-123: batch may read the ledger"
  trustmesh policy apply empty-dir/ --allow-empty       # deny everything, deliberately
  trustmesh policy history; trustmesh policy rollback 7
  trustmesh policy owners --set owners.yaml --otp 123456   # which team owns which destinations (admin)
  trustmesh policy apply teams/payments/ --team payments   # replace the payments team's allowlists only

policy files are read strictly: duplicate keys, anchors and aliases, tags other than the
core ones, and YAML 1.1 numbers such as 010 or 1:20 are refused with file, document and
line; files, nesting, names, owners, rules and the compiled policy have size limits.
"""


class PolicyArgsError(TrustmeshError):
    pass


LINT_CLEAN, LINT_PROBLEMS, LINT_UNREADABLE = 0, 1, 2
TEST_ALLOW, TEST_DENY, TEST_INVALID = 0, 1, 2
MAX_OWNERSHIP_BYTES = 256 * 1024


def _lint(args: argparse.Namespace) -> int:
    loaded = load_paths(args.paths, reject_expired=args.strict)
    for problem in loaded.problems:
        print(problem)
    for warning in loaded.warnings:
        print(f"warning: {warning}")
    if loaded.problems:
        print(f"{len(loaded.problems)} problem(s)")
        return LINT_UNREADABLE if loaded.unreadable else LINT_PROBLEMS
    warned = f", {len(loaded.warnings)} warning(s) (--strict makes them problems)" if loaded.warnings else ""
    print(f"ok: {len(loaded.policy.allowlists)} allowlist(s){warned}")
    return LINT_CLEAN


def _server_policy(args: argparse.Namespace) -> Policy:
    reply = call(args, lambda s: s.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=TIMEOUT))
    loaded = load_text(reply.policy.documents, f"revision {reply.policy.revision}", reject_expired=False,
                       limits=REVISION)
    return loaded.policy


def _test(args: argparse.Namespace) -> int:
    # 1 means deny, so a CI gate must never read a bad file or a missing server as "deny".
    try:
        return _test_decision(args)
    except TrustmeshError as err:
        print(f"trustmesh: error: {err}", file=sys.stderr)
        return TEST_INVALID


def _test_decision(args: argparse.Namespace) -> int:
    try:
        source, destination = SpiffeId.parse(args.source), SpiffeId.parse(args.to)
    except InvalidSpiffeIdError as err:
        raise PolicyArgsError(str(err)) from err
    if args.port is not None and not 1 <= args.port <= 65535:
        raise PolicyArgsError(f"--port {args.port}: a port is 1 to 65535")
    at = utc_now()
    if args.at:
        try:
            at = parse_utc(args.at)
        except ValueError as err:
            raise PolicyArgsError(f"--at {args.at!r}: use an ISO time like 2026-12-31T00:00:00Z") from err
    if args.paths:
        # As of `at`: a rule expired by then simply does not match (not a problem).
        loaded = load_paths(args.paths, now=at, reject_expired=False)
        if loaded.problems:
            for problem in loaded.problems:
                print(problem)
            raise PolicyArgsError("fix the problems above first (see `trustmesh policy lint`)")
        policy = loaded.policy
    else:
        policy = _server_policy(args)
    decision = policy.decide(source, destination, args.port, at)
    print(f"{decision.verdict}  {decision.rule}: {decision.reason}")
    return TEST_ALLOW if decision.allowed else TEST_DENY


def _documents(args: argparse.Namespace, *, allow_empty: bool = True) -> str:
    loaded = load_paths(args.paths)
    if loaded.problems:
        for problem in loaded.problems:
            print(problem)
        raise PolicyArgsError(f"{len(loaded.problems)} problem(s): nothing was sent to the server")
    if not loaded.policy.allowlists and not allow_empty:
        raise PolicyArgsError(f"no allowlists in {' '.join(args.paths)}: applying would deny every connection; "
                              "pass --allow-empty to deny everything deliberately")
    return bundle_documents(args.paths)


def _diff(args: argparse.Namespace) -> int:
    documents = _documents(args)
    req = admin_pb2.DiffPolicyRequest(documents=documents, team=args.team or "")
    reply = call(args, lambda s: s.DiffPolicy(req, timeout=TIMEOUT))
    print(reply.diff if reply.changed else f"no change against revision {reply.against_revision}", end="")
    if not reply.changed:
        print()
    return 0


def _apply(args: argparse.Namespace) -> int:
    documents = _documents(args, allow_empty=args.allow_empty)
    req = admin_pb2.ApplyPolicyRequest(documents=documents, author=args.author or getpass.getuser(),
                                       comment=args.comment or "", dry_run=args.dry_run,
                                       expected_head_revision=args.expected_revision or 0, team=args.team or "",
                                       allow_empty=args.allow_empty)
    reply = call(args, lambda s: s.ApplyPolicy(req, timeout=TIMEOUT))
    if reply.diff:
        print(reply.diff, end="")
    if not reply.changed:
        print(f"no change: revision {reply.revision} already says this")
    elif args.dry_run:
        print(f"dry run: would replace revision {reply.revision}")
    else:
        print(f"applied as revision {reply.revision}")
    return 0


def _owners(args: argparse.Namespace) -> int:
    if args.set:
        text = read_input_file(Path(args.set), "--set", MAX_OWNERSHIP_BYTES, "an ownership file").decode(
            errors="replace")
        teams = call(args, lambda s: s.SetPolicyOwners(admin_pb2.SetPolicyOwnersRequest(documents=text),
                                                       timeout=TIMEOUT)).teams
        print(f"ownership set: {len(teams)} team(s), {sum(len(t.destinations) for t in teams)} destination pattern(s)")
        return 0
    reply = call(args, lambda s: s.GetPolicyOwners(admin_pb2.GetPolicyOwnersRequest(), timeout=TIMEOUT))
    if args.json:
        print_json(message_dict(reply))
        return 0
    if not reply.teams:
        print("no ownership file set: no team owns any destination (only admins write allowlists); "
              "set one with `trustmesh policy owners --set FILE`")
        return 0
    print(f"{'TEAM':<20} DESTINATIONS")
    for team in reply.teams:
        print(f"{team.team:<20} {', '.join(team.destinations)}")
    print(f"# set by {reply.updated_by} at {format_utc(reply.updated_at)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.GetPolicy(admin_pb2.GetPolicyRequest(revision=args.revision or 0), timeout=TIMEOUT))
    p = reply.policy
    print(f"# revision {p.revision} by {p.author} at "
          f"{format_utc(p.created_at)}: {p.comment}")
    print(p.documents)
    return 0


def _history(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.ListPolicyRevisions(admin_pb2.ListPolicyRevisionsRequest(), timeout=TIMEOUT))
    if not reply.revisions:
        print("no policy applied yet: everything is denied by default")
    for r in reply.revisions:
        when = format_utc(r.created_at)
        print(f"{r.revision:>5}  {when}  {r.author:<16} {r.sha256[:12]}  {r.comment}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    req = admin_pb2.RollbackPolicyRequest(revision=args.revision, author=args.author or getpass.getuser(),
                                          comment=args.comment or "")
    reply = call(args, lambda s: s.RollbackPolicy(req, timeout=TIMEOUT))
    print(f"rolled back: revision {reply.revision} now holds the documents of revision {args.revision}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = commands.add_parser("policy", help="allowlists as code: lint, test, diff, apply, history, rollback",
                                 description="Service-to-service allowlists (default deny), checked in CI and "
                                             "applied to the server from the same files.",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", title="subcommands")

    p = sub.add_parser("lint", help="check allowlist files; prints every problem, exit 1 if any",
                       description="Exit 0 when clean (expired rules are warnings), 1 on any problem, 2 when a "
                                   "file cannot be read.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or directories of them")
    p.add_argument("--strict", action="store_true", help="rules that have already expired are problems, not warnings")
    p.set_defaults(func=_lint)

    p = sub.add_parser("test", help="would SOURCE reach DESTINATION? prints ALLOW or DENY and the deciding rule",
                       description="Exit 0 for allow, 1 for deny and 2 for invalid input (bad files, IDs or "
                                   "time, or no server), so it can gate a CI pipeline. Without PATHs it asks the "
                                   "server's current policy.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="YAML files or directories (default: the server's policy)")
    p.add_argument("--from", dest="source", required=True, metavar="ID", help="the calling workload's SPIFFE ID")
    p.add_argument("--to", required=True, metavar="ID", help="the called workload's SPIFFE ID")
    p.add_argument("--port", type=int, help="the destination port")
    p.add_argument("--at", metavar="TIME", help="decide as of this ISO 8601 time, e.g. 2027-01-01T00:00:00Z; "
                                                "rules expired by then do not match")
    add_socket_flag(p)
    p.set_defaults(func=_test)

    for name, func, text in (("diff", _diff, "show what applying these files would change on the server"),
                             ("apply", _apply, "validate, then store these files as a new policy revision")):
        p = sub.add_parser(name, help=text)
        p.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or directories of them")
        p.add_argument("--team", metavar="TEAM",
                       help="replace only this team's allowlists (the destinations it owns, `policy owners`); "
                            "every other allowlist stays")
        if name == "apply":
            p.add_argument("--comment", help="why (kept in the history and the audit log)")
            p.add_argument("--author", help="who (default: your user name)")
            p.add_argument("--dry-run", action="store_true", help="validate and diff only")
            p.add_argument("--expected-revision", type=int, help="refuse if the head is no longer this revision")
            p.add_argument("--allow-empty", action="store_true",
                           help="apply even when PATHs hold no allowlist (denies every connection; with --team, "
                                "removes all of the team's allowlists)")
        add_socket_flag(p)
        p.set_defaults(func=func)

    p = sub.add_parser("owners", help="which team owns which destinations; --set FILE to change it (admin)",
                       description="Teams own destinations (exact IDs or prefixes ending in /*; the most specific "
                                   "pattern wins). A policy-author may change only allowlists whose destinations "
                                   "its team owns; `policy apply --team TEAM` replaces that team's allowlists "
                                   "only. Setting the file needs the admin role and --otp.",
                       epilog="examples:\n  trustmesh policy owners\n  trustmesh policy owners --set owners.yaml "
                              "--otp 123456\n\nowners.yaml:\n  apiVersion: trustmesh/v1\n  kind: Ownership\n"
                              "  teams:\n    payments: [spiffe://example.org/payments, spiffe://example.org/ledger/*]\n"
                              "    risk: [spiffe://example.org/fraud/*]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", metavar="FILE", help="replace the ownership file with FILE")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_socket_flag(p)
    p.set_defaults(func=_owners)

    p = sub.add_parser("show", help="print the documents of the current (or a given) revision")
    p.add_argument("--revision", type=int, help="a past revision (default: the current one)")
    add_socket_flag(p)
    p.set_defaults(func=_show)

    p = sub.add_parser("history", help="list policy revisions")
    add_socket_flag(p)
    p.set_defaults(func=_history)

    p = sub.add_parser("rollback", help="make a past revision current again (as a new revision)")
    p.add_argument("revision", type=int, help="the revision to return to")
    p.add_argument("--comment", help="why")
    p.add_argument("--author", help="who (default: your user name)")
    add_socket_flag(p)
    p.set_defaults(func=_rollback)
    policy.set_defaults(func=show_help(policy))
