"""`trustmesh entry …`: registration entries (which workloads get which SPIFFE ID)."""

from __future__ import annotations

import argparse
from typing import Any

from google.protobuf.json_format import MessageToDict

from trustmesh._proto.trustmesh.v1 import admin_pb2, types_pb2
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call, print_json
from trustmesh.duration import format_duration, parse_duration
from trustmesh.errors import TrustmeshError
from trustmesh.spiffeid import SpiffeId


class EntryArgsError(TrustmeshError):
    pass


EXAMPLES = """\
examples:
  trustmesh entry create --spiffe-id spiffe://example.org/ledger --node node-1 \\
      --selector unix:uid:1001 --x509-ttl 30m --dns-name ledger.internal
  trustmesh entry list --node node-1
  trustmesh entry show 3f2a…
  trustmesh entry update 3f2a… --selector unix:uid:1002
  trustmesh entry delete 3f2a…
"""

SELECTOR_HELP = ("TYPE:VALUE that the workload must match (repeat for several; all must match): "
                 "unix:uid:N, unix:gid:N, unix:user:NAME, unix:group:NAME, unix:path:/abs/exe, unix:sha256:HEX")


def _seconds(text: str | None, flag: str) -> int:
    if text is None:
        return 0
    try:
        return int(parse_duration(text).total_seconds())
    except ValueError as err:
        raise EntryArgsError(f"{flag}: {err}") from err


def _entry_dict(entry: types_pb2.Entry) -> dict[str, Any]:
    return MessageToDict(entry, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _parent(args: argparse.Namespace, server_td_hint: str | None = None) -> str:
    if args.node and args.parent_id:
        raise EntryArgsError("give either --node or --parent-id, not both")
    if args.parent_id:
        return str(args.parent_id)
    if args.node:
        td = SpiffeId.parse(args.spiffe_id).trust_domain if getattr(args, "spiffe_id", None) else server_td_hint
        return f"spiffe://{td}/agent/{args.node}"
    raise EntryArgsError("say which node's agent may hand out this identity: --node NAME or --parent-id ID")


def _create(args: argparse.Namespace) -> int:
    try:
        parent = _parent(args)
    except (ValueError, TrustmeshError) as err:
        raise EntryArgsError(str(err)) from err
    entry = types_pb2.Entry(
        spiffe_id=args.spiffe_id, parent_id=parent,
        selectors=[types_pb2.Selector(type=s.split(":", 1)[0], value=s.split(":", 1)[1] if ":" in s else "")
                   for s in args.selector or []],
        x509_ttl_seconds=_seconds(args.x509_ttl, "--x509-ttl"), jwt_ttl_seconds=_seconds(args.jwt_ttl, "--jwt-ttl"),
        dns_names=args.dns_name or [], federates_with=args.federates_with or [], admin=args.admin,
    )
    reply = call(args, lambda s: s.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=TIMEOUT))
    print(reply.entry.id)
    return 0


def _list(args: argparse.Namespace) -> int:
    parent = ""
    if args.parent_id:
        parent = args.parent_id
    entries: list[types_pb2.Entry] = []
    token = ""
    while True:
        req = admin_pb2.ListEntriesRequest(parent_id=parent, spiffe_id=args.spiffe_id or "", page_token=token)
        reply = call(args, lambda s: s.ListEntries(req, timeout=TIMEOUT))
        entries.extend(reply.entries)
        token = reply.next_page_token
        if not token:
            break
    if args.node:
        entries = [e for e in entries if e.parent_id.endswith(f"/agent/{args.node}")]
    if args.json:
        print_json([_entry_dict(e) for e in entries])
        return 0
    if not entries:
        print("no entries")
        return 0
    rows = [("ID", "SPIFFE ID", "PARENT", "SELECTORS", "X509 TTL")]
    for e in entries:
        rows.append((e.id, e.spiffe_id, e.parent_id, ",".join(f"{s.type}:{s.value}" for s in e.selectors),
                     format_duration(_td(e.x509_ttl_seconds)) if e.x509_ttl_seconds else "default"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(col.ljust(w) for col, w in zip(row, widths)).rstrip())
    return 0


def _td(seconds: int) -> Any:
    from datetime import timedelta

    return timedelta(seconds=seconds)


def _show(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.GetEntry(admin_pb2.GetEntryRequest(id=args.id), timeout=TIMEOUT))
    data = _entry_dict(reply.entry)
    if args.json:
        print_json(data)
    else:
        for key in ("id", "spiffe_id", "parent_id", "selectors", "x509_ttl_seconds", "jwt_ttl_seconds",
                    "dns_names", "federates_with", "admin", "revision"):
            value = data.get(key)
            if key == "selectors":
                value = ", ".join(f"{s['type']}:{s['value']}" for s in value or [])
            elif isinstance(value, list):
                value = ", ".join(value) or "-"
            print(f"{key:18} {value}")
    return 0


def _update(args: argparse.Namespace) -> int:
    current = call(args, lambda s: s.GetEntry(admin_pb2.GetEntryRequest(id=args.id), timeout=TIMEOUT)).entry
    entry = types_pb2.Entry()
    entry.CopyFrom(current)
    if args.spiffe_id:
        entry.spiffe_id = args.spiffe_id
    if args.node or args.parent_id:
        entry.parent_id = _parent(args, server_td_hint=SpiffeId.parse(current.spiffe_id).trust_domain.name)
    if args.selector:
        del entry.selectors[:]
        entry.selectors.extend(types_pb2.Selector(type=s.split(":", 1)[0], value=s.split(":", 1)[1] if ":" in s else "")
                               for s in args.selector)
    if args.x509_ttl is not None:
        entry.x509_ttl_seconds = _seconds(args.x509_ttl, "--x509-ttl")
    if args.jwt_ttl is not None:
        entry.jwt_ttl_seconds = _seconds(args.jwt_ttl, "--jwt-ttl")
    if args.dns_name is not None:
        del entry.dns_names[:]
        entry.dns_names.extend(d for d in args.dns_name if d)
    if args.federates_with is not None:
        del entry.federates_with[:]
        entry.federates_with.extend(t for t in args.federates_with if t)
    if args.admin is not None:
        entry.admin = args.admin
    req = admin_pb2.UpdateEntryRequest(entry=entry, expected_revision=args.expected_revision or current.revision)
    reply = call(args, lambda s: s.UpdateEntry(req, timeout=TIMEOUT))
    print(reply.entry.id)
    return 0


def _delete(args: argparse.Namespace) -> int:
    call(args, lambda s: s.DeleteEntry(admin_pb2.DeleteEntryRequest(id=args.id), timeout=TIMEOUT))
    print(f"deleted entry {args.id}")
    return 0


def _entry_flags(p: argparse.ArgumentParser, *, create: bool) -> None:
    p.add_argument("--spiffe-id", required=create, help="the SPIFFE ID to issue, e.g. spiffe://example.org/ledger")
    p.add_argument("--node", help="the node whose agent may hand out this identity (its agent is spiffe://<td>/agent/NODE)")
    p.add_argument("--parent-id", help="the parent SPIFFE ID instead of --node (an agent ID or a node alias)")
    p.add_argument("--selector", action="append", metavar="TYPE:VALUE", help=SELECTOR_HELP)
    p.add_argument("--x509-ttl", metavar="DURATION", help="X.509-SVID lifetime, e.g. 30m (default: the server's)")
    p.add_argument("--jwt-ttl", metavar="DURATION", help="JWT-SVID lifetime, e.g. 5m (default: the server's)")
    p.add_argument("--dns-name", action="append", metavar="NAME", help="DNS SAN to add (repeatable)")
    p.add_argument("--federates-with", action="append", metavar="TD", help="trust domain whose bundle the workload also gets")
    add_socket_flag(p)


def register(commands: argparse._SubParsersAction) -> None:
    entry = commands.add_parser("entry", help="manage registration entries (who gets which SPIFFE ID)",
                                description="Create, list, show, update and delete registration entries.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = entry.add_subparsers(dest="entry_command", metavar="SUBCOMMAND", title="subcommands")

    p = sub.add_parser("create", help="register a workload identity; prints the new entry id",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _entry_flags(p, create=True)
    p.add_argument("--admin", action="store_true", help="the workload may use the admin API over mTLS")
    p.set_defaults(func=_create)

    p = sub.add_parser("list", help="list entries (a table, or --json)")
    p.add_argument("--node", help="only entries of this node's agent")
    p.add_argument("--parent-id", help="only entries with this parent ID")
    p.add_argument("--spiffe-id", help="only entries for this SPIFFE ID")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_socket_flag(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("show", help="show one entry")
    p.add_argument("id", help="the entry id (see `trustmesh entry list`)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_socket_flag(p)
    p.set_defaults(func=_show)

    p = sub.add_parser("update", help="change an entry; flags given replace the current values")
    p.add_argument("id", help="the entry id")
    _entry_flags(p, create=False)
    p.add_argument("--admin", dest="admin", action="store_true", default=None, help="mark as admin")
    p.add_argument("--no-admin", dest="admin", action="store_false", help="remove the admin mark")
    p.add_argument("--expected-revision", type=int, help="refuse when the entry changed since this revision")
    p.set_defaults(func=_update)

    p = sub.add_parser("delete", help="delete an entry; its SVIDs are withdrawn from the agents")
    p.add_argument("id", help="the entry id")
    add_socket_flag(p)
    p.set_defaults(func=_delete)
    entry.set_defaults(func=lambda _a: entry.print_help() or 2)
