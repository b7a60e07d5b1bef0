"""`trustmesh policy …`: allowlists as code, on files (CI) and on the server alike."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
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
from trustmesh.cli.config import invalid_as, show_help
from trustmesh.cli.flows_cmd import fetch_flows
from trustmesh.clock import format_utc, parse_utc, utc_now
from trustmesh.errors import InvalidSpiffeIdError, TrustmeshError
from trustmesh.flows import Flow, flow_to_dict, read_jsonl
from trustmesh.policy import AmbiguousPathError, HttpRequest, Policy, bundle_documents, load_paths, load_text
from trustmesh.policy.loader import REVISION
from trustmesh.policy.model import IdPattern, PolicyError
from trustmesh.policy.ownership import ownership_of
from trustmesh.policy.routes import check_method, normalize_path
from trustmesh.policy.schema import check_paths, lint_findings
from trustmesh.policy.suggest import simulate, suggest
from trustmesh.spiffeid import SpiffeId

EXAMPLES = """\
examples (the same files in CI and in production):
  trustmesh policy lint policies/                       # exit 0 clean, 1 problems, 2 unreadable
  trustmesh policy lint --strict policies/              # expired rules are problems too
  trustmesh policy test policies/ --from spiffe://example.org/payments \\
      --to spiffe://example.org/ledger --port 9443      # exit 0 allow, 1 deny, 2 invalid input
  trustmesh policy test policies/ --from spiffe://partner.example/settlement \\
      --to spiffe://example.org/ledger --at 2027-01-01T00:00:00Z   # as of that time
  trustmesh policy test policies/ --from spiffe://example.org/fraud-scoring \
      --to spiffe://example.org/ledger --method GET --path /transactions/42   # one HTTP request
  trustmesh policy diff policies/                       # what apply would change
  trustmesh policy apply policies/ --comment "JIRA-123: batch may read the ledger"
  trustmesh policy apply empty-dir/ --allow-empty       # deny everything, deliberately
  trustmesh policy history; trustmesh policy rollback 7
  trustmesh policy owners --set owners.yaml --otp 123456   # which team owns which destinations (admin)
  trustmesh policy apply teams/payments/ --team payments   # replace the payments team's allowlists only
  trustmesh policy suggest --since 7d proposed/         # allowlists (audit mode) from observed traffic
  trustmesh policy simulate proposed/ --since 7d        # exit 1 if they would deny observed traffic

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
    # The JSON Schema first (what editors show, with YAML line and column), then the loader's
    # checks as before; a field both flag is reported once (policy/schema.py lint_findings).
    report = check_paths(args.paths)
    loaded = load_paths(args.paths, reject_expired=args.strict)
    problems, warnings = lint_findings(report, loaded)
    code = (LINT_UNREADABLE if loaded.unreadable else LINT_PROBLEMS) if problems else LINT_CLEAN
    responses = loaded.policy.responses
    if args.json:
        print_json({"ok": not problems, "problems": [p.to_dict() for p in problems],
                    "warnings": [w.to_dict() for w in warnings], "allowlists": len(loaded.policy.allowlists),
                    "responses": len(responses.documents)})
        return code
    for problem in problems:
        print(problem)
    for warning in warnings:
        print(f"warning: {warning}")
    if problems:
        print(f"{len(problems)} problem(s)")
        return code
    warned = f", {len(warnings)} warning(s) (--strict makes them problems)" if warnings else ""
    extra = ""
    if responses.documents:
        extra = f", {len(responses.documents)} Response document(s) with {len(responses.rules)} rule(s)" + \
            (" (dry run: nothing is quarantined)" if responses.dry_run else "")
    print(f"ok: {len(loaded.policy.allowlists)} allowlist(s){extra}{warned}")
    return LINT_CLEAN


def revision_policy(revision: admin_pb2.PolicyRevision) -> Policy:
    """A stored revision's allowlists (rules that lapsed since simply no longer match)."""
    return load_text(revision.documents, f"revision {revision.revision}", reject_expired=False,
                     limits=REVISION).policy


def _server_policy(args: argparse.Namespace) -> Policy:
    return revision_policy(call(args, lambda s: s.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=TIMEOUT)).policy)


def _test_decision(args: argparse.Namespace) -> int:
    try:
        source, destination = SpiffeId.parse(args.source), SpiffeId.parse(args.to)
    except InvalidSpiffeIdError as err:
        raise PolicyArgsError(str(err)) from err
    if args.port is not None and not 1 <= args.port <= 65535:
        raise PolicyArgsError(f"--port {args.port}: a port is 1 to 65535")
    request = _test_request(args.method, args.path)
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
    decision = policy.decide(source, destination, args.port, at, request=request)
    route = f" (route {decision.route})" if decision.route else ""
    print(f"{decision.verdict}  {decision.rule}: {decision.reason}{route}")
    return TEST_ALLOW if decision.allowed else TEST_DENY


def _test_request(method: str | None, path: str | None) -> HttpRequest | None:
    """The HTTP request --method/--path describe (either one implies a request), or None for a
    plain connection. The path is normalised as an http listener does; an ambiguous one is bad
    input, since a listener would answer it 400 before any rule is looked at."""
    if method is None and path is None:
        return None
    method = "GET" if method is None else method
    try:
        check_method(method)
    except PolicyError as err:
        raise PolicyArgsError(f"--method: {err}") from err
    try:
        # The query is no part of what is matched: split off as an http listener does.
        normal = normalize_path("/" if path is None else path.partition("?")[0])
    except AmbiguousPathError as err:
        raise PolicyArgsError(f"--path: an http listener refuses this path (400): {err.reason}") from err
    return HttpRequest(method, normal)


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


def _flows_for(args: argparse.Namespace) -> list[Flow]:
    """The observed flows: a `flows export` file with --flows, else the server's window."""
    if args.flows:
        return read_jsonl(Path(args.flows))
    return fetch_flows(args, args.since)[0]


def _team_filter(args: argparse.Namespace) -> Callable[[str], bool] | None:
    if not args.team:
        return None
    reply = call(args, lambda s: s.GetPolicyOwners(admin_pb2.GetPolicyOwnersRequest(), timeout=TIMEOUT))
    ownership = ownership_of((IdPattern.parse(d), t.team) for t in reply.teams for d in t.destinations)
    if args.team not in ownership.teams:
        raise PolicyArgsError(f"--team {args.team!r} owns no destination (see `trustmesh policy owners`)")
    return lambda destination: ownership.team_of(IdPattern.parse(destination)) == args.team


def _suggest(args: argparse.Namespace) -> int:
    if args.min_connections < 1:
        raise PolicyArgsError("--min-connections must be at least 1")
    try:
        prefixes = [IdPattern.parse(p if p.endswith("/*") else p.rstrip("/") + "/*") for p in args.group_prefix]
    except PolicyError as err:
        raise PolicyArgsError(f"--group-prefix: {err}") from err
    owns = _team_filter(args)
    suggestions = suggest(_flows_for(args), min_connections=args.min_connections, owns=owns,
                          group_prefixes=prefixes, team=args.team or "")
    out = Path(args.out_dir)
    taken = [s.filename for s in suggestions if (out / s.filename).exists()]
    if taken and not args.force:
        raise PolicyArgsError(f"{out} already holds {', '.join(taken[:5])}: choose an empty directory or pass --force")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for s in suggestions:
            (out / s.filename).write_text(s.text)
    except OSError as err:
        raise PolicyArgsError(f"cannot write to {out}: {err.strerror}") from err
    if args.json:
        print_json([{"destination": s.destination, "file": str(out / s.filename), "allowlists": s.allowlists,
                     "unverified_callers": s.unverified} for s in suggestions])
        return 0
    if not suggestions:
        print("no traffic went through in the window: nothing to suggest (see `trustmesh flows`)")
        return 0
    for s in suggestions:
        note = f", {s.unverified} unverified caller(s) to resolve (comments)" if s.unverified else ""
        print(f"wrote {out / s.filename}: {s.allowlists} allowlist(s) for {s.destination}{note}")
    print(f"next: trustmesh policy lint {out}; trustmesh policy simulate {out}; then apply (audit mode)")
    return 0


def _simulation(args: argparse.Namespace) -> int:
    at = utc_now()
    loaded = load_paths(args.paths, now=at, reject_expired=False)
    if loaded.problems:
        for problem in loaded.problems:
            print(problem, file=sys.stderr)
        raise PolicyArgsError("fix the problems above first (see `trustmesh policy lint`)")
    result = simulate(loaded.policy, _flows_for(args), at)
    if args.json:
        print_json({
            "would_deny": [flow_to_dict(r.flow) | {"candidate_rule": r.rule, "reason": r.reason}
                           for r in result.would_deny],
            "unused_rules": [{"rule": rule, "from": source} for rule, source in result.unused_rules],
            "newly_allowed": [flow_to_dict(f) for f in result.newly_allowed],
            "unverified": [flow_to_dict(f) for f in result.unverified],
            "granted": [flow_to_dict(f) for f in result.granted],
            "flows_judged": result.judged})
        return TEST_DENY if result.would_deny else TEST_ALLOW
    for r in result.would_deny:
        f = r.flow
        print(f"WOULD DENY  {f.source} -> {f.destination}:{f.port}  {f.connections} connection(s), last seen "
              f"{format_utc(f.last_seen)}: {r.reason}")
    for rule, source in result.unused_rules:
        print(f"UNUSED      {rule} (from {source}): no observed flow used it")
    for f in result.newly_allowed:
        print(f"NEWLY ALLOWED  {f.source} -> {f.destination}:{f.port}  (denied {f.connections} time(s) in the window)")
    for f in result.unverified:
        print(f"UNVERIFIED  {f.source_address} -> {f.destination}:{f.port}  {f.connections} connection(s): a "
              "plaintext caller no allowlist can admit; strict mode refuses it")
    for f in result.granted:
        print(f"GRANTED     {f.source} -> {f.destination}:{f.port}  {f.connections} connection(s) under "
              f"{f.rule.split(' ')[0]}: just-in-time access, not judged")
    verdict = (f"{len(result.would_deny)} observed flow(s) would be denied" if result.would_deny
               else "no observed flow would be denied")
    print(f"{verdict}; {len(result.unused_rules)} rule(s) unused; {result.judged} flow(s) replayed")
    return TEST_DENY if result.would_deny else TEST_ALLOW


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = commands.add_parser("policy", help="allowlists as code: lint, test, diff, apply, history, rollback",
                                 description="Service-to-service allowlists (default deny), checked in CI and "
                                             "applied to the server from the same files.",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", title="subcommands")

    p = sub.add_parser("lint", help="check allowlist files; prints every problem, exit 1 if any",
                       description="Checks each document against the JSON Schema of its apiVersion (schemas/ "
                                   "in the repository; the one editors use), then the loader's own checks. Exit 0 "
                                   "when clean (expired rules are warnings), 1 on any problem, 2 when a file cannot "
                                   "be read.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or directories of them")
    p.add_argument("--strict", action="store_true", help="rules that have already expired are problems, not warnings")
    p.add_argument("--json", action="store_true",
                   help="print {ok, problems, warnings, allowlists, responses}; each finding has source, document, "
                        "field, message, line, column and check (schema or loader)")
    p.set_defaults(func=_lint)

    p = sub.add_parser("test", help="would SOURCE reach DESTINATION? prints ALLOW or DENY and the deciding rule",
                       description="Exit 0 for allow, 1 for deny and 2 for invalid input (bad files, IDs, time, "
                                   "method or path, or no server), so it can gate a CI pipeline. Without PATHs it "
                                   "asks the server's current policy. With --method or --path it decides one HTTP "
                                   "request as an http listener would (the path normalised first) and prints the "
                                   "route label; without them, a plain connection (as a tcp listener), which rules "
                                   "naming methods or paths never allow.",
                       epilog="examples:\n"
                              "  trustmesh policy test policies/ --from spiffe://example.org/payments \\\n"
                              "      --to spiffe://example.org/ledger --port 9443\n"
                              "  trustmesh policy test policies/ --from spiffe://example.org/fraud-scoring \\\n"
                              "      --to spiffe://example.org/ledger --method POST --path /transactions/1\n"
                              "  trustmesh policy test --from spiffe://example.org/payments \\\n"
                              "      --to spiffe://example.org/ledger --path /health   (GET, the server's policy)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="PATH", help="YAML files or directories (default: the server's policy)")
    p.add_argument("--from", dest="source", required=True, metavar="ID", help="the calling workload's SPIFFE ID")
    p.add_argument("--to", required=True, metavar="ID", help="the called workload's SPIFFE ID")
    p.add_argument("--port", type=int, help="the destination port")
    p.add_argument("--at", metavar="TIME", help="decide as of this ISO 8601 time, e.g. 2027-01-01T00:00:00Z; "
                                                "rules expired by then do not match")
    p.add_argument("--method", metavar="METHOD",
                   help="decide an HTTP request with this method (case-sensitive, e.g. GET; default GET when "
                        "only --path is given)")
    p.add_argument("--path", metavar="PATH",
                   help="decide an HTTP request for this path (normalised as an http listener does, a query "
                        "ignored; default / when only --method is given)")
    add_socket_flag(p)
    p.set_defaults(func=invalid_as(TEST_INVALID, _test_decision))  # 1 means deny: never an error

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

    p = sub.add_parser(
        "suggest", help="write allowlists (audit mode) that allow exactly the observed traffic",
        description="One YAML file per destination that saw traffic in the window, allowing exactly the "
                    "identities and ports that went through (allow or audit decisions), in audit mode, with each "
                    "rule's evidence as a comment. Denied connections never become rules; plaintext (unverified) "
                    "callers are listed as comments to resolve. The output passes `policy lint`.",
        epilog="examples:\n  trustmesh policy suggest --since 7d proposed/\n"
               "  trustmesh policy suggest --since 30d --min-connections 10 --team payments proposed/\n"
               "  trustmesh policy suggest --since 7d --group-prefix spiffe://example.org/batch proposed/\n"
               "  trustmesh policy suggest --flows flows.jsonl proposed/     (offline, from `flows export`)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the files (created if missing)")
    p.add_argument("--since", metavar="WHEN", default="7d",
                   help="the window: a duration back from now or an ISO time (default 7d)")
    p.add_argument("--min-connections", type=int, default=1, metavar="N",
                   help="leave out sources seen fewer than N times (default 1)")
    p.add_argument("--team", metavar="TEAM", help="only the destinations this team owns (`policy owners`)")
    p.add_argument("--group-prefix", action="append", default=[], metavar="PREFIX",
                   help="allow every observed source under PREFIX as one PREFIX/* rule (repeatable)")
    p.add_argument("--flows", metavar="FILE", help="read flows from a `flows export` file instead of the server")
    p.add_argument("--force", action="store_true", help="overwrite files of the same names in OUT_DIR")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    add_socket_flag(p)
    p.set_defaults(func=_suggest)

    p = sub.add_parser(
        "simulate", help="replay observed flows against candidate allowlists: what would they deny?",
        description="Every flow that went through in the window (allow or audit) is decided again by the "
                    "candidate allowlists as if enforced; prints each one they would deny, every rule no flow "
                    "used, denied flows they would allow, and unverified callers. Exit 0 when no observed flow "
                    "would be denied, 1 when some would, 2 for invalid input (bad files, no server). Read-only: "
                    "the viewer or auditor role is enough; offline with --flows.",
        epilog="examples:\n  trustmesh policy simulate policies/ --since 7d\n"
               "  trustmesh policy simulate policies/ --flows flows.jsonl --json   (CI, no server)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="the candidate: YAML files or directories of them")
    p.add_argument("--since", metavar="WHEN", default="7d",
                   help="the window: a duration back from now or an ISO time (default 7d)")
    p.add_argument("--flows", metavar="FILE", help="read flows from a `flows export` file instead of the server")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_socket_flag(p)
    p.set_defaults(func=invalid_as(TEST_INVALID, _simulation))  # 1: would deny observed traffic

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
