"""Flows: who talked to whom, as the agents' listeners saw it, summed per edge.

The one value the server stores (controlplane/flow_store.py), the Admin API carries and the
CLI reads (`trustmesh flows`, `graph`, `policy suggest`, `policy simulate`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from trustmesh.clock import format_utc, parse_utc
from trustmesh.errors import TrustmeshError

# allow; deny; audit: allowed only because the covering allowlist is in audit mode (enforce
# would deny); unverified: a plaintext client of a permissive inbound listener (no identity).
DECISIONS = ("allow", "deny", "audit", "unverified")

# An HTTP request's route as flows carry it: "GET /transactions/*", "GET *" (the deciding rule
# names no paths) or "POST" (no rule matched), never the request's own path. Agents send it,
# and it is printed in tables and files: only this shape gets in, so it can neither hold
# control characters nor grow an edge per distinct path.
MAX_ROUTE_CHARS = 256
_ROUTE = re.compile(r"[A-Z][A-Z0-9_-]{0,31}(?: (?:\*|/[!-~]*))?")


def valid_route(route: str) -> bool:
    """Whether `route` is "" (a connection, not an HTTP request) or a route of that shape."""
    return not route or (len(route) <= MAX_ROUTE_CHARS and _ROUTE.fullmatch(route) is not None)


@dataclass(frozen=True)
class Flow:
    """Connections between two parties on one port with one outcome, summed over a time span;
    for HTTP listeners, requests of one route ("" for connections a tcp listener decided).

    `source` is a SPIFFE ID, or "" for an unverified caller, whose address is then
    `source_address`; `rule` is the deciding allowlist rule ("" or "default deny" when none).
    `connections` counts requests when there is a route. Times are unix seconds; bytes_in
    flows from the source to the destination."""

    source: str
    destination: str
    port: int
    decision: str
    rule: str
    connections: int
    bytes_in: int
    bytes_out: int
    first_seen: float
    last_seen: float
    source_address: str = ""
    route: str = ""

    @property
    def key(self) -> tuple[str, str, int, str, str, str, str]:
        """What makes two flows one edge."""
        return (self.source, self.destination, self.port, self.decision, self.rule, self.source_address,
                self.route)


class FlowFormatError(TrustmeshError):
    """A flows export file (or a server's answer) that is not what `flows export` writes."""


def flow_to_dict(flow: Flow) -> dict[str, object]:
    """One flow as `trustmesh flows --json` and `flows export` print it (times ISO 8601 UTC)."""
    return {"source": flow.source, "source_address": flow.source_address, "destination": flow.destination,
            "port": flow.port, "decision": flow.decision, "rule": flow.rule, "connections": flow.connections,
            "bytes_in": flow.bytes_in, "bytes_out": flow.bytes_out, "first_seen": format_utc(flow.first_seen),
            "last_seen": format_utc(flow.last_seen), "route": flow.route}


def flow_from_dict(data: object, where: str) -> Flow:
    """The inverse of flow_to_dict, for a file someone hands `policy simulate --flows`: every
    field checked, nothing trusted."""
    if not isinstance(data, dict):
        raise FlowFormatError(f"{where}: a flow is a JSON object (one per line, as `trustmesh flows export` writes)")

    def text(name: str, limit: int = 2048) -> str:
        value = data.get(name, "")
        if not isinstance(value, str) or len(value) > limit:
            raise FlowFormatError(f"{where}: {name!r} must be text of at most {limit} characters")
        return value

    def number(name: str, high: int = 2**63 - 1) -> int:
        value = data.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise FlowFormatError(f"{where}: {name!r} must be a whole number from 0 to {high}")
        return value

    def when(name: str) -> float:
        try:
            return parse_utc(text(name, 64)).timestamp()
        except (ValueError, OverflowError) as err:  # OverflowError: year 1 with a zone east of UTC
            raise FlowFormatError(f"{where}: {name!r} must be an ISO 8601 time like 2026-12-01T10:00:00Z") from err

    decision = text("decision", 16)
    if decision not in DECISIONS:
        raise FlowFormatError(f"{where}: 'decision' must be one of {', '.join(DECISIONS)}")
    route = text("route", MAX_ROUTE_CHARS)  # absent from files written before flows had routes
    if not valid_route(route):
        raise FlowFormatError(f"{where}: 'route' must be an HTTP method, optionally followed by a space and "
                              "a path pattern (\"GET /transactions/*\", \"GET *\", \"POST\"), or empty")
    return Flow(text("source"), text("destination"), number("port", 65535), decision, text("rule", 512),
                number("connections"), number("bytes_in"), number("bytes_out"), when("first_seen"),
                when("last_seen"), text("source_address", 256), route)


MAX_EXPORT_BYTES = 256 * 1024 * 1024  # of per-edge lines: each becomes a Flow in memory
MAX_TRACE_EDGES = 1_000_000  # trace lines are summed per edge: memory grows with edges, not lines
TRACE_WINDOW = 60.0  # a trace line's ts ends a one-minute window


def read_jsonl(path: Path) -> list[Flow]:
    """The flows of a `trustmesh flows export` file, line by line in either format: a line with
    "ts" is a per-minute trace record (`--format jsonl`), summed per edge into one Flow (no rule,
    no route; first seen where its first minute began), any other line one edge (`--format
    edges`). The edges come first, in file order, then the trace's, in the order they first
    appear."""
    # Imported here: the trace format itself imports DECISIONS from this module.
    from trustmesh.detect.trace import MAX_LINE_BYTES, UNVERIFIED_PREFIX, TraceFormatError, record_from_dict

    flows: list[Flow] = []
    edge_bytes = 0
    sums: dict[tuple[str, str, int, str, str], list[float]] = {}  # [conns, in, out, first, last] per edge
    ts_cache: dict[str, float] = {}
    try:
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                where = f"{path} line {number}"
                if len(raw) > MAX_LINE_BYTES:
                    raise FlowFormatError(f"{where}: longer than {MAX_LINE_BYTES} bytes")
                if not raw.strip():
                    continue
                try:
                    data = json.loads(raw)
                except (ValueError, RecursionError) as err:  # RecursionError: nested too deep
                    raise FlowFormatError(f"{where}: not JSON ({str(err)[:80]})") from err
                if not (isinstance(data, dict) and "ts" in data):
                    edge_bytes += len(raw)
                    if edge_bytes > MAX_EXPORT_BYTES:
                        raise FlowFormatError(f"{path}: more than {MAX_EXPORT_BYTES // 2**20} MiB of edges; "
                                              "export a shorter window")
                    flows.append(flow_from_dict(data, where))
                    continue
                try:
                    r = record_from_dict(data, where, ts_cache)
                except TraceFormatError as err:
                    raise FlowFormatError(str(err)) from None
                source, address = r.source, ""
                if source.startswith(UNVERIFIED_PREFIX):
                    source, address = "", source.removeprefix(UNVERIFIED_PREFIX)
                key = (source, r.destination, r.port, r.decision, address)
                edge = sums.get(key)
                if edge is None:
                    if len(sums) >= MAX_TRACE_EDGES:
                        raise FlowFormatError(f"{path}: more than {MAX_TRACE_EDGES} edges; export a shorter window")
                    sums[key] = [r.connections, r.bytes_in, r.bytes_out, r.ts - TRACE_WINDOW, r.ts]
                    continue
                edge[0] += r.connections
                edge[1] += r.bytes_in
                edge[2] += r.bytes_out
                edge[3] = min(edge[3], r.ts - TRACE_WINDOW)
                edge[4] = max(edge[4], r.ts)
    except OSError as err:
        raise FlowFormatError(f"cannot read {path}: {err.strerror or err}") from err
    return flows + [Flow(src, dst, port, decision, "", int(s[0]), int(s[1]), int(s[2]), s[3], s[4], address)
                    for (src, dst, port, decision, address), s in sums.items()]
