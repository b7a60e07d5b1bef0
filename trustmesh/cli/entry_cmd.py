"""`trustmesh entry …`: registration entries (which workloads get which SPIFFE ID).

The server validates every field (and audits every refusal); this module only turns flags
into an Entry message and prints the answer. It checks nothing the server would check, so
that one set of rules, with one set of messages, applies to the CLI and the API alike.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from functools import partial
from typing import Any

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call, message_dict, print_json
from trustmesh.cli.config import show_help
from trustmesh.clock import format_utc
from trustmesh.duration import format_duration, parse_duration
from trustmesh.errors import TrustmeshError
from trustmesh.labels import LabelError, format_labels, parse_assignments
from trustmesh.labels import matches as labels_match
from trustmesh.naming import agent_id
from trustmesh.selectors import InvalidSelectorError, Selector
from trustmesh.spiffeid import TrustDomain
from trustmesh.wire import selector_from_pb, selector_to_pb


class EntryArgsError(TrustmeshError):
    """The command line itself is incomplete or contradictory."""


EXAMPLES = """\
examples:
  trustmesh entry create --spiffe-id spiffe://example.org/ledger --node node-1 \\
      --selector unix:uid:1001 --x509-ttl 30m --dns-name ledger.internal
  trustmesh entry create --spiffe-id spiffe://example.org/batch --parent-id spiffe://example.org/agent/node-2 \\
      --selector unix:user:batch --selector unix:path:/usr/local/bin/batch
  trustmesh entry create --spiffe-id spiffe://example.org/card-vault --node-selector zone=cde \
      --selector unix:user:vault                              (only on nodes labelled zone=cde)
  trustmesh entry list --node node-1
  trustmesh entry show 3f2a9c…
  trustmesh entry update 3f2a9c… --selector unix:uid:1002       (selectors given replace all of them)
  trustmesh entry update 3f2a9c… --dns-name ''                  (drop every DNS name)
  trustmesh entry delete 3f2a9c…
"""

SELECTOR_HELP = ("TYPE:VALUE the workload must match (repeat for several; all must match): "
                 "unix:uid:N, unix:gid:N, unix:user:NAME, unix:group:NAME, unix:path:/abs/exe, unix:sha256:HEX")


def _list_entries(req: admin_pb2.ListEntriesRequest,
                  stub: admin_pb2_grpc.AdminStub) -> admin_pb2.ListEntriesResponse:
    reply: admin_pb2.ListEntriesResponse = stub.ListEntries(req, timeout=TIMEOUT)
    return reply


def _seconds(text: str | None, flag: str) -> int:
    if text is None:
        return 0
    try:
        return int(parse_duration(text).total_seconds())
    except (ValueError, OverflowError) as err:  # the kernel's parser overflows on huge numbers
        raise EntryArgsError(f"{flag} {text!r}: {err}") from err


def _selectors(texts: list[str]) -> list[types_pb2.Selector]:
    # Only the TYPE:VALUE form is checked here: the server checks the rest, and audits what it refuses.
    try:
        return [selector_to_pb(Selector.from_text(text)) for text in texts]
    except InvalidSelectorError as err:
        raise EntryArgsError(f"--selector: {err}") from err


def _server_trust_domain(args: argparse.Namespace) -> TrustDomain:
    """The server's trust domain, so `--node NAME` becomes spiffe://<td>/agent/NAME."""
    reply = call(args, lambda s: s.GetBundle(admin_pb2.GetBundleRequest(), timeout=TIMEOUT))
    return TrustDomain(reply.bundle.trust_domain)


def _parent(args: argparse.Namespace, *, required: bool) -> str:
    """The parent ID from --parent-id or --node ("" when neither is given and none is required)."""
    if args.node and args.parent_id:
        raise EntryArgsError("give either --node or --parent-id, not both")
    if args.parent_id:
        return str(args.parent_id)
    if args.node:
        return str(agent_id(_server_trust_domain(args), args.node))
    if required:
        raise EntryArgsError("say which node's agent may hand out this identity: --node NAME or --parent-id ID")
    return ""


def _ttl(seconds: int) -> str:
    return format_duration(timedelta(seconds=seconds)) if seconds else "default"


def _node_selector(args: argparse.Namespace) -> dict[str, str]:
    try:
        return parse_assignments(args.node_selector or [], allow_reserved=True)
    except LabelError as err:
        raise EntryArgsError(f"--node-selector: {err}") from err


def _create(args: argparse.Namespace) -> int:
    node_selector = _node_selector(args)
    if node_selector and (args.node or args.parent_id):
        raise EntryArgsError("give either --node (or --parent-id) or --node-selector, not both")
    parent = "" if node_selector else _parent(args, required=True)
    entry = types_pb2.Entry(
        spiffe_id=args.spiffe_id, parent_id=parent, selectors=_selectors(args.selector or []),
        x509_ttl_seconds=_seconds(args.x509_ttl, "--x509-ttl"), jwt_ttl_seconds=_seconds(args.jwt_ttl, "--jwt-ttl"),
        dns_names=args.dns_name or [], federates_with=args.federates_with or [], admin=args.admin,
        node_selector=node_selector,
    )
    reply = call(args, lambda s: s.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=TIMEOUT))
    print(reply.entry.id)  # only the id, so scripts can capture it
    return 0


def list_entries(args: argparse.Namespace, parent: str = "", spiffe_id: str = "") -> list[types_pb2.Entry]:
    """Every entry the server has (with these filters), page after page."""
    entries: list[types_pb2.Entry] = []
    token = ""
    while True:
        req = admin_pb2.ListEntriesRequest(parent_id=parent, spiffe_id=spiffe_id, page_token=token)
        reply = call(args, partial(_list_entries, req))
        entries.extend(reply.entries)
        token = reply.next_page_token
        if not token:
            return entries


def _list(args: argparse.Namespace) -> int:
    entries = list_entries(args, _parent(args, required=False), args.spiffe_id or "")
    if args.json:
        print_json([message_dict(e) for e in entries])
        return 0
    if not entries:
        print("no entries")
        return 0
    rows = [("ID", "SPIFFE ID", "PARENT", "SELECTORS", "X509 TTL", "JWT TTL")]
    for e in entries:
        rows.append((e.id, e.spiffe_id + (" (admin)" if e.admin else ""), e.parent_id,
                     ",".join(str(selector_from_pb(s)) for s in e.selectors),
                     _ttl(e.x509_ttl_seconds), _ttl(e.jwt_ttl_seconds)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(col.ljust(w) for col, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.GetEntry(admin_pb2.GetEntryRequest(id=args.id), timeout=TIMEOUT))
    e = reply.entry
    reaches: list[str] | None = None
    if e.node_selector:
        # Which nodes the selector reaches now: the labels the server holds for each agent.
        agents = call(args, lambda s: s.ListAgents(admin_pb2.ListAgentsRequest(), timeout=TIMEOUT)).agents
        reaches = sorted(a.spiffe_id for a in agents
                         if not a.banned and labels_match(dict(e.node_selector), dict(a.labels)))
    if args.json:
        data = message_dict(e)
        if reaches is not None:
            data["reaches"] = reaches
        print_json(data)
        return 0
    lines: list[tuple[str, Any]] = [
        ("id", e.id), ("spiffe id", e.spiffe_id), ("parent id", e.parent_id),
        ("selectors", ", ".join(str(selector_from_pb(s)) for s in e.selectors)),
        ("x509 ttl", _ttl(e.x509_ttl_seconds)), ("jwt ttl", _ttl(e.jwt_ttl_seconds)),
        ("dns names", ", ".join(e.dns_names) or "-"), ("federates with", ", ".join(e.federates_with) or "-"),
        ("admin", "yes" if e.admin else "no"), ("revision", e.revision),
        ("created", format_utc(e.created_at)), ("updated", format_utc(e.updated_at)),
    ]
    if reaches is not None:
        lines[3:3] = [("node selector", format_labels(dict(e.node_selector))),
                      ("reaches", ", ".join(reaches) or "no node yet (none carries all these labels)")]
    for key, value in lines:
        print(f"{key + ':':16} {value}")
    return 0


def _update(args: argparse.Namespace) -> int:
    current = call(args, lambda s: s.GetEntry(admin_pb2.GetEntryRequest(id=args.id), timeout=TIMEOUT)).entry
    entry = types_pb2.Entry()
    entry.CopyFrom(current)
    if args.spiffe_id:
        entry.spiffe_id = args.spiffe_id
    node_selector = _node_selector(args)
    if node_selector and (args.node or args.parent_id):
        raise EntryArgsError("give either --node (or --parent-id) or --node-selector, not both")
    parent = _parent(args, required=False)
    if parent:  # a node instead of a selector
        entry.parent_id = parent
        entry.node_selector.clear()
    if node_selector:  # a selector instead of a node: the server sets the parent
        entry.parent_id = ""
        entry.node_selector.clear()
        entry.node_selector.update(node_selector)
    if args.selector:
        del entry.selectors[:]
        entry.selectors.extend(_selectors(args.selector))
    if args.x509_ttl is not None:
        entry.x509_ttl_seconds = _seconds(args.x509_ttl, "--x509-ttl")
    if args.jwt_ttl is not None:
        entry.jwt_ttl_seconds = _seconds(args.jwt_ttl, "--jwt-ttl")
    if args.dns_name is not None:
        del entry.dns_names[:]
        entry.dns_names.extend(d for d in args.dns_name if d)  # --dns-name '' clears
    if args.federates_with is not None:
        del entry.federates_with[:]
        entry.federates_with.extend(t for t in args.federates_with if t)
    if args.admin is not None:
        entry.admin = args.admin
    # Read-modify-write: without --expected-revision, the revision just read guards the
    # write, so a change someone made in between is never silently overwritten.
    req = admin_pb2.UpdateEntryRequest(entry=entry, expected_revision=args.expected_revision or current.revision)
    reply = call(args, lambda s: s.UpdateEntry(req, timeout=TIMEOUT))
    print(reply.entry.id)
    return 0


def _delete(args: argparse.Namespace) -> int:
    req = admin_pb2.DeleteEntryRequest(id=args.id, expected_revision=args.expected_revision or 0)
    call(args, lambda s: s.DeleteEntry(req, timeout=TIMEOUT))
    print(f"deleted entry {args.id}")
    return 0


def _entry_flags(p: argparse.ArgumentParser, *, create: bool) -> None:
    replaces = "" if create else " (replaces the current ones)"
    p.add_argument("--spiffe-id", required=create, metavar="ID",
                   help="the SPIFFE ID to issue, e.g. spiffe://example.org/ledger (must be in the server's "
                        "trust domain, with a path, not under /agent or /trustmesh)")
    p.add_argument("--node", metavar="NAME",
                   help="the node whose agent may hand out this identity (parent spiffe://<td>/agent/NAME)")
    p.add_argument("--parent-id", metavar="ID",
                   help="the parent SPIFFE ID instead of --node: an agent ID, or a node alias of the trust domain")
    p.add_argument("--node-selector", action="append", metavar="KEY=VALUE",
                   help="instead of --node: issue on every node carrying all these labels (repeatable; "
                        "`trustmesh agent label`), e.g. zone=cde" + replaces)
    p.add_argument("--selector", action="append", metavar="TYPE:VALUE", help=SELECTOR_HELP + replaces)
    p.add_argument("--x509-ttl", metavar="DURATION",
                   help="X.509-SVID lifetime, 1s to 30d, e.g. 30m (default: the server's --default-x509-ttl; "
                        "0 = that default)")
    p.add_argument("--jwt-ttl", metavar="DURATION",
                   help="JWT-SVID lifetime, 1s to 1d, e.g. 5m (default: the server's --default-jwt-ttl; "
                        "0 = that default)")
    clears = "" if create else "; replaces the current ones, and '' clears them"
    p.add_argument("--dns-name", action="append", metavar="NAME",
                   help=f"a DNS SAN for the X.509-SVID (repeatable{clears})")
    p.add_argument("--federates-with", action="append", metavar="TD",
                   help=f"a trust domain whose bundle the workload also receives (repeatable{clears})")
    add_socket_flag(p)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    entry = commands.add_parser(
        "entry", help="manage registration entries (who gets which SPIFFE ID)",
        description="Create, list, show, update and delete registration entries. An entry says: the agent of "
                    "this node (the parent) may give this SPIFFE ID to workloads matching all these selectors.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = entry.add_subparsers(dest="entry_command", metavar="SUBCOMMAND", title="subcommands")

    p = sub.add_parser("create", help="register a workload identity; prints only the new entry id",
                       description="Register a workload identity. Prints only the new entry id.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _entry_flags(p, create=True)
    p.add_argument("--admin", action="store_true",
                   help="workloads with this identity may use the remote admin API (server --admin-bind)")
    p.set_defaults(func=_create)

    p = sub.add_parser("list", help="list entries (a table, or --json)",
                       description="List registration entries, optionally only those of one node or SPIFFE ID.",
                       epilog="examples:\n  trustmesh entry list\n  trustmesh entry list --node node-1 --json\n"
                              "  trustmesh entry list --spiffe-id spiffe://example.org/ledger",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", metavar="NAME", help="only entries whose parent is this node's agent")
    p.add_argument("--parent-id", metavar="ID", help="only entries with this parent ID")
    p.add_argument("--spiffe-id", metavar="ID", help="only entries for this SPIFFE ID")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    add_socket_flag(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("show", help="show one entry",
                       description="Show every field of one entry.",
                       epilog="example:\n  trustmesh entry show 3f2a9c… --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id", help="the entry id (see `trustmesh entry list`)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_socket_flag(p)
    p.set_defaults(func=_show)

    p = sub.add_parser("update", help="change an entry; the flags given replace the current values",
                       description="Change an entry. Each flag given replaces that field; fields not given keep "
                                   "their value. The update is refused (ABORTED) if the entry changed meanwhile.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id", help="the entry id (see `trustmesh entry list`)")
    _entry_flags(p, create=False)
    p.add_argument("--admin", dest="admin", action="store_true", default=None,
                   help="allow the remote admin API for this identity")
    p.add_argument("--no-admin", dest="admin", action="store_false", help="remove the admin permission")
    p.add_argument("--expected-revision", type=int, metavar="N",
                   help="refuse unless the entry is still at this revision (see `entry show`); "
                        "default: the revision read just before the update")
    p.set_defaults(func=_update)

    p = sub.add_parser("delete", help="delete an entry; agents stop handing out its identity",
                       description="Delete an entry. Agents drop it at once; SVIDs already issued expire on "
                                   "their own (they are short-lived).",
                       epilog="example:\n  trustmesh entry delete 3f2a9c…",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id", help="the entry id (see `trustmesh entry list`)")
    p.add_argument("--expected-revision", type=int, metavar="N", help="refuse unless the entry is at this revision")
    add_socket_flag(p)
    p.set_defaults(func=_delete)
    entry.set_defaults(func=show_help(entry))
