"""`trustmesh audit …`: read and verify the tamper-evident audit log."""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from functools import partial
from typing import Any

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call, print_json
from trustmesh.cli.config import show_help
from trustmesh.clock import format_utc, parse_utc
from trustmesh.duration import parse_duration
from trustmesh.errors import TrustmeshError


class AuditArgsError(TrustmeshError):
    pass


def _list_events(req: admin_pb2.ListAuditEventsRequest,
                 stub: admin_pb2_grpc.AdminStub) -> admin_pb2.ListAuditEventsResponse:
    reply: admin_pb2.ListAuditEventsResponse = stub.ListAuditEvents(req, timeout=TIMEOUT)
    return reply


def parse_since(text: str | None, now: float | None = None, *, flag: str = "--since") -> int:
    """`--since` takes an ISO time (2026-11-22T10:00:00Z) or a duration back from now (1h);
    so does any other time flag, named by `flag` in the messages."""
    if not text:
        return 0
    try:
        return int((now or time.time()) - parse_duration(text).total_seconds())
    except OverflowError as err:
        raise AuditArgsError(f"{flag} {text!r} is too far back") from err
    except ValueError:
        pass
    try:
        return int(parse_utc(text).timestamp())
    except ValueError as err:
        raise AuditArgsError(
            f"{flag} {text!r}: use an ISO time like 2026-11-22T10:00:00Z or a duration like 1h"
        ) from err


def _printable(value: object) -> str:
    """One event, one line: control characters in recorded input (a refused ID with a
    newline, say) are escaped so that they cannot forge lines of the listing."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _show(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise AuditArgsError(f"--limit {args.limit}: give a positive number of events")
    since = parse_since(args.since)
    events: list[Any] = []
    cursor = 0
    while len(events) < args.limit:
        req = admin_pb2.ListAuditEventsRequest(
            since_seq=cursor, since_time=since, kind=args.kind or "", actor=args.actor or "",
            limit=min(1000, args.limit - len(events))
        )
        reply = call(args, partial(_list_events, req))
        events.extend(reply.events)
        if not reply.next_seq:
            break
        cursor = reply.next_seq
    if args.json:
        print_json(
            [
                {
                    "seq": e.seq,
                    "time": datetime.fromtimestamp(e.time, timezone.utc).isoformat(),
                    "kind": e.kind,
                    "actor": e.actor,
                    "source": json.loads(e.details_json or "{}").get("source", ""),
                    "subject": e.subject,
                    "outcome": e.outcome,
                    "details": json.loads(e.details_json or "{}"),
                    "hash": e.hash,
                }
                for e in events
            ]
        )
        return 0
    for e in events:
        when = format_utc(e.time)
        details = json.loads(e.details_json or "{}")
        # Who, and from where: an address, or the pid on the admin socket ("-": not recorded).
        source = details.pop("source", "") or "-"
        extra = " ".join(f"{_printable(k)}={_printable(v)}" for k, v in sorted(details.items()))
        print(
            f"{e.seq:>6} {when} {_printable(e.kind):<14} {_printable(e.outcome):<7} "
            f"{_printable(e.actor)} [{_printable(source)}] -> {_printable(e.subject)} {extra}".rstrip()
        )
    if not events:
        print("no audit events")
    return 0


def _verify(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.VerifyAudit(admin_pb2.VerifyAuditRequest(), timeout=300))
    anchored = (f"anchored up to event {reply.anchored_seq} in {reply.anchor}" if reply.anchored_seq
                else f"no checkpoint in {reply.anchor} yet")
    if getattr(args, "json", False):
        print(json.dumps({"ok": reply.ok, "events_checked": reply.checked, "first_broken_seq": reply.first_broken_seq,
                          "reason": reply.reason, "records_checked": reply.records_checked,
                          "record_failures": list(reply.record_failures), "anchored_seq": reply.anchored_seq,
                          "anchor": reply.anchor}, indent=2))
        return 0 if reply.ok else 1
    if reply.ok:
        print(f"audit log intact: {reply.checked} events verified, {anchored}; "
              f"{reply.records_checked} registry records carry a valid MAC")
        return 0
    where = f" at event {reply.first_broken_seq}" if reply.first_broken_seq else ""
    print(f"audit log BROKEN{where}: {reply.reason} ({reply.checked} events verified, {anchored})")
    for failure in reply.record_failures:
        print(f"  record failed its MAC: {failure}")
    return 1


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit",
        help="read and verify the tamper-evident audit log",
        description="Every attestation, issuance, admin change and refusal is an event "
        "in a hash chain keyed by the server's key-encryption key.",
    )
    sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", title="subcommands")
    p = sub.add_parser(
        "show",
        help="print audit events, oldest first",
        epilog="examples:\n  trustmesh audit show --since 1h\n"
        "  trustmesh audit show --since 2026-11-22T10:00:00Z --kind node.attest --json\n"
        "  trustmesh audit show --actor alice   # what operator alice did",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--since",
        metavar="TIME",
        help="only events at or after this ISO time (2026-11-22T10:00:00Z), or within this "
        "duration back from now (1h = the last hour)",
    )
    p.add_argument(
        "--kind", help="only events of this kind, e.g. entry.create, token.create, agent.ban, node.attest, svid.issue"
    )
    p.add_argument(
        "--actor", metavar="NAME",
        help="only events by this actor: an operator's name (alice), a SPIFFE ID, or e.g. 'local-root (uid 0)'")
    p.add_argument(
        "--limit", type=int, default=1000, metavar="N", help="at most this many events, oldest first (default 1000)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON array instead of one line per event")
    add_socket_flag(p)
    p.set_defaults(func=_show)
    p = sub.add_parser(
        "verify",
        help="check the chain, its anchor outside the store, and every registry record's MAC",
        description="Walk the whole hash chain, check that it still holds the newest checkpoint the server "
        "wrote outside the store (--audit-anchor), and check the MAC of every registry record. Exits 0 "
        "when all hold; otherwise names the first problem (an edited, removed or reordered event, a cut "
        "or wiped log, a record written without the key-encryption key) and exits 1.",
        epilog="examples:\n  trustmesh audit verify || alert-security-team\n  trustmesh audit verify --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_socket_flag(p)
    p.set_defaults(func=_verify)
    audit.set_defaults(func=show_help(audit))
