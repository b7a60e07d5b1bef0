"""`trustmesh flows` and `trustmesh graph`: who talks to whom, from the agents' flow reports
summed per edge on the server (every replica's), as a table, JSON, a JSONL export or a graph;
`flows export` also writes the per-minute flow trace one replica recorded (`detect replay`)."""

from __future__ import annotations

import argparse
import json
import sys

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call, print_json
from trustmesh.cli.audit_cmd import parse_since
from trustmesh.cli.entry_cmd import list_entries
from trustmesh.clock import format_utc
from trustmesh.errors import InvalidSpiffeIdError, TrustmeshError
from trustmesh.flowgraph import FORMATS, build, render
from trustmesh.flows import DECISIONS, Flow, flow_to_dict
from trustmesh.spiffeid import SpiffeId

DEFAULT_SINCE = "24h"
EXPORT_TIMEOUT = 600.0  # a 30-day trace is large; a stalled server still ends the command

EXAMPLES = """\
examples:
  trustmesh flows                                   # every edge of the last 24 h
  trustmesh flows --since 7d --to spiffe://example.org/ledger
  trustmesh flows --decision audit                  # what enforce mode would deny today
  trustmesh flows --decision unverified             # plaintext callers of permissive listeners
  trustmesh flows --orphans                         # identities without entries, entries without traffic
  trustmesh flows export --since 30d > trace.jsonl  # per minute: a SIEM, detect replay, policy simulate --flows
  trustmesh flows export --since 30d --format edges > flows.jsonl  # per edge, as `flows --json`
"""


class FlowsArgsError(TrustmeshError):
    pass


def flow_from_pb(edge: admin_pb2.FlowEdge) -> Flow:
    return Flow(edge.source, edge.destination, edge.port, edge.decision, edge.rule, edge.connections, edge.bytes_in,
                edge.bytes_out, float(edge.first_seen), float(edge.last_seen), edge.source_address, edge.route)


def fetch_flows(args: argparse.Namespace, since: str | None, *, source: str = "", destination: str = "",
                decision: str = "") -> tuple[list[Flow], int, int]:
    """The server's flows of the window, and the window (unix seconds, hour-aligned start)."""
    if decision and decision not in DECISIONS:
        raise FlowsArgsError(f"--decision {decision!r}: one of {', '.join(DECISIONS)}")
    for flag, value in (("--from", source), ("--to", destination)):
        if value:
            try:
                SpiffeId.parse(value)
            except InvalidSpiffeIdError as err:
                raise FlowsArgsError(f"{flag}: {err}") from err
    req = admin_pb2.ListFlowsRequest(since=parse_since(since or DEFAULT_SINCE), source=source,
                                     destination=destination, decision=decision)
    reply = call(args, lambda s: s.ListFlows(req, timeout=TIMEOUT))
    return [flow_from_pb(e) for e in reply.edges], reply.since, reply.until


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _table(flows: list[Flow]) -> None:
    # The route column only when HTTP listeners reported requests: a tcp-only mesh keeps its
    # table as it was. With routes, a row counts requests, not connections, where it has one.
    routed = any(f.route for f in flows)
    rows = [("SOURCE", "DESTINATION", "PORT", *(("ROUTE",) if routed else ()), "DECISION",
             "CONNS/REQS" if routed else "CONNS", "BYTES IN", "BYTES OUT", "FIRST SEEN", "LAST SEEN", "RULE")]
    for f in flows:
        rows.append((f.source or f"unverified {f.source_address}", f.destination, str(f.port),
                     *((f.route or "-",) if routed else ()), f.decision, str(f.connections), _size(f.bytes_in),
                     _size(f.bytes_out), format_utc(f.first_seen), format_utc(f.last_seen), f.rule or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _orphans(args: argparse.Namespace, flows: list[Flow]) -> int:
    entries = {e.spiffe_id for e in list_entries(args)}
    local = {SpiffeId.parse(i).trust_domain for i in entries}
    seen = {i for f in flows for i in (f.source, f.destination) if i}
    unregistered: list[str] = []
    foreign: list[str] = []
    for ident in sorted(seen - entries):
        try:
            (unregistered if SpiffeId.parse(ident).trust_domain in local else foreign).append(ident)
        except InvalidSpiffeIdError:
            unregistered.append(ident)
    silent = sorted(entries - seen)
    if args.json:
        print_json({"unregistered": unregistered, "foreign": foreign, "unseen_entries": silent})
        return 0
    print(f"seen in flows without a registration entry ({len(unregistered)}):")
    for ident in unregistered:
        print(f"  {ident}")
    if foreign:
        print(f"from other trust domains (federation or partners; no entry expected) ({len(foreign)}):")
        for ident in foreign:
            print(f"  {ident}")
    print(f"registered but never seen in a flow of the window ({len(silent)}):")
    for ident in silent:
        print(f"  {ident}")
    return 0


def _flows(args: argparse.Namespace) -> int:
    flows, since, until = fetch_flows(args, args.since, source=args.source or "", destination=args.to or "",
                                      decision=args.decision or "")
    if args.orphans:
        return _orphans(args, flows)
    if args.json:
        print_json([flow_to_dict(f) for f in flows])
        return 0
    if not flows:
        print(f"no flows reported between {format_utc(since)} and {format_utc(until)}")
        return 0
    _table(flows)
    print(f"# {len(flows)} edge(s), {format_utc(since)} to {format_utc(until)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.until and args.format == "edges":
        raise FlowsArgsError("--until works with --format jsonl only; per-edge sums end now")
    if args.format == "edges":
        flows, _, _ = fetch_flows(args, args.since)
        for f in flows:
            sys.stdout.write(json.dumps(flow_to_dict(f), sort_keys=True) + "\n")
        return 0
    req = admin_pb2.ExportTraceRequest(since=parse_since(args.since or DEFAULT_SINCE),
                                       until=parse_since(args.until, flag="--until"))
    if req.until and req.until <= req.since:
        raise FlowsArgsError(f"--until {args.until!r} is not after --since {args.since or DEFAULT_SINCE!r}")

    def write(stub: admin_pb2_grpc.AdminStub) -> None:
        # Chunks of whole lines, written as they come: a 30-day trace is never held in memory.
        for reply in stub.ExportTrace(req, timeout=EXPORT_TIMEOUT):
            sys.stdout.buffer.write(reply.lines)
        sys.stdout.buffer.flush()

    call(args, write)
    return 0


def _graph(args: argparse.Namespace) -> int:
    flows, _, _ = fetch_flows(args, args.since)
    sys.stdout.write(render(build(flows), args.format))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "flows", help="who talks to whom: observed connections per edge, with counts, bytes and decisions",
        description="Every connection through an agent's listeners (every request, for http listeners), "
                    "summed per (source, destination, port, decision, rule, and for requests their route: the "
                    "method and the deciding rule's path pattern, never the path itself): allow, deny, audit "
                    "(allowed only because the allowlist is in audit mode: enforce would deny it) and unverified "
                    "(a plaintext caller of a permissive listener, known by its address only). The server keeps "
                    "hourly rollups for --flow-retention (30 days by default); agents' reports are their claims "
                    "about their own workloads.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--since", metavar="WHEN",
                   help=f"a duration back from now (7d, 1h) or an ISO time (default {DEFAULT_SINCE}); "
                        "the window starts at the hour")
    p.add_argument("--from", dest="source", metavar="ID", help="only flows from this SPIFFE ID")
    p.add_argument("--to", metavar="ID", help="only flows to this SPIFFE ID")
    p.add_argument("--decision", choices=DECISIONS, help="only flows with this decision")
    p.add_argument("--orphans", action="store_true",
                   help="list identities seen in flows that have no registration entry, and entries never seen")
    p.add_argument("--json", action="store_true", help="print JSON (times ISO 8601 UTC)")
    add_socket_flag(p)
    p.set_defaults(func=_flows)
    sub = p.add_subparsers(dest="flows_command", metavar="SUBCOMMAND", title="subcommands")
    e = sub.add_parser(
        "export", help="print the window's flows as JSON lines: the per-minute trace, or one line per edge",
        description="--format jsonl (the default) writes the per-minute flow trace the server recorded: one "
                    "JSON object per minute, node, source, destination, port and decision, in time order "
                    "(`ts` ends the minute; the format is described under `trustmesh detect replay`). It is "
                    "kept in the data directory of the replica you ask (each replica records its own agents' "
                    "reports) for --flow-retention; the last minute or so is not written yet. --format edges "
                    "writes one JSON object per edge, summed over the window, as `trustmesh flows --json` "
                    "prints them. Both feed a SIEM or a long-term store, and `trustmesh policy simulate` and "
                    "`policy suggest` read either with --flows FILE.",
        epilog="examples:\n"
               "  trustmesh flows export --since 30d > trace.jsonl\n"
               "  trustmesh detect replay trace.jsonl --config policies/\n"
               "  trustmesh flows export --since 2026-11-01T00:00:00Z --until 2026-11-02T00:00:00Z > day.jsonl\n"
               "  trustmesh flows export --since 30d --format edges > flows.jsonl\n"
               "  trustmesh policy simulate policies/ --flows trace.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--since", metavar="WHEN", help=f"a duration or an ISO time (default {DEFAULT_SINCE})")
    e.add_argument("--until", metavar="WHEN",
                   help="end of the window, a duration back from now or an ISO time (default: now; jsonl only)")
    e.add_argument("--format", choices=("jsonl", "edges"), default="jsonl",
                   help="jsonl: the per-minute trace (default); edges: one line per edge over the window")
    add_socket_flag(e)
    e.set_defaults(func=_export)

    g = commands.add_parser(
        "graph", help="the service graph from observed flows, as JSON, Graphviz DOT or Mermaid",
        description="Nodes are identities and unverified (plaintext) caller addresses; one edge per (source, "
                    "destination, decision) with its ports and connection count. DOT renders with Graphviz as it "
                    "is; Mermaid pastes into Markdown.",
        epilog="examples:\n  trustmesh graph --format dot | dot -Tsvg > mesh.svg\n"
               "  trustmesh graph --since 7d --format mermaid\n  trustmesh graph --format json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--since", metavar="WHEN", help=f"a duration or an ISO time (default {DEFAULT_SINCE})")
    g.add_argument("--format", choices=FORMATS, default="dot", help="dot (default), mermaid or json")
    add_socket_flag(g)
    g.set_defaults(func=_graph)
