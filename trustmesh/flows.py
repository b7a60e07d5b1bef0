"""Flows: who talked to whom, as the agents' listeners saw it, summed per edge.

The one value the server stores (controlplane/flow_store.py), the Admin API carries and the
CLI reads (`trustmesh flows`, `graph`, `policy suggest`, `policy simulate`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trustmesh.clock import format_utc, parse_utc
from trustmesh.errors import TrustmeshError

# allow; deny; audit: allowed only because the covering allowlist is in audit mode (enforce
# would deny); unverified: a plaintext client of a permissive inbound listener (no identity).
DECISIONS = ("allow", "deny", "audit", "unverified")


@dataclass(frozen=True)
class Flow:
    """Connections between two parties on one port with one outcome, summed over a time span.

    `source` is a SPIFFE ID, or "" for an unverified caller, whose address is then
    `source_address`; `rule` is the deciding allowlist rule ("" or "default deny" when none).
    Times are unix seconds; bytes_in flows from the source to the destination."""

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

    @property
    def key(self) -> tuple[str, str, int, str, str, str]:
        """What makes two flows one edge."""
        return (self.source, self.destination, self.port, self.decision, self.rule, self.source_address)


class FlowFormatError(TrustmeshError):
    """A flows export file (or a server's answer) that is not what `flows export` writes."""


def flow_to_dict(flow: Flow) -> dict[str, object]:
    """One flow as `trustmesh flows --json` and `flows export` print it (times ISO 8601 UTC)."""
    return {"source": flow.source, "source_address": flow.source_address, "destination": flow.destination,
            "port": flow.port, "decision": flow.decision, "rule": flow.rule, "connections": flow.connections,
            "bytes_in": flow.bytes_in, "bytes_out": flow.bytes_out, "first_seen": format_utc(flow.first_seen),
            "last_seen": format_utc(flow.last_seen)}


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
        except ValueError as err:
            raise FlowFormatError(f"{where}: {name!r} must be an ISO 8601 time like 2026-12-01T10:00:00Z") from err

    decision = text("decision", 16)
    if decision not in DECISIONS:
        raise FlowFormatError(f"{where}: 'decision' must be one of {', '.join(DECISIONS)}")
    return Flow(text("source"), text("destination"), number("port", 65535), decision, text("rule", 512),
                number("connections"), number("bytes_in"), number("bytes_out"), when("first_seen"),
                when("last_seen"), text("source_address", 256))


MAX_EXPORT_BYTES = 256 * 1024 * 1024


def read_jsonl(path: Path) -> list[Flow]:
    """The flows of a `trustmesh flows export --format jsonl` file."""
    try:
        if path.stat().st_size > MAX_EXPORT_BYTES:
            raise FlowFormatError(f"{path}: larger than {MAX_EXPORT_BYTES // 2**20} MiB; export a shorter window")
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FlowFormatError(f"cannot read {path}: {err}") from err
    flows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as err:
            raise FlowFormatError(f"{path} line {number}: not JSON ({err.args[0][:80]})") from err
        flows.append(flow_from_dict(data, f"{path} line {number}"))
    return flows
