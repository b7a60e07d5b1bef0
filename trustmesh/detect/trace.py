"""The flow trace: one flow rollup per line, the input of `trustmesh detect replay`.

    {"ts": "2026-11-01T10:03:00Z", "node": "node-1", "source": "spiffe://example.org/payments",
     "destination": "spiffe://example.org/ledger", "port": 8443, "decision": "allow",
     "connections": 12, "bytes_in": 48000, "bytes_out": 9600}

`ts` ends the (one-minute) window the counts cover; `node` is the node the source ran on
("" when no agent of the source's reported it); an unverified caller's `source` is
`unverified:<address>`. `trustmesh flows export --format jsonl` writes it; anyone may hand
one in, so every field is checked and nothing is trusted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from trustmesh.clock import format_utc, parse_utc
from trustmesh.errors import TrustmeshError
from trustmesh.flows import DECISIONS

UNVERIFIED_PREFIX = "unverified:"
MAX_TEXT = 2048
MAX_COUNT = 2**63 - 1
MAX_LINE_BYTES = 64 * 1024
FIELDS = ("ts", "node", "source", "destination", "port", "decision", "connections", "bytes_in", "bytes_out")


class TraceFormatError(TrustmeshError):
    """A trace line that is not in the documented format; the message names file and line."""


@dataclass(frozen=True, slots=True)
class TraceRecord:
    ts: float  # unix seconds: the end of the window
    node: str
    source: str  # a SPIFFE ID, or unverified:<address>
    destination: str
    port: int
    decision: str  # allow, deny, audit or unverified
    connections: int
    bytes_in: int  # from the source to the destination
    bytes_out: int

    @property
    def unverified(self) -> bool:
        return self.source.startswith(UNVERIFIED_PREFIX)


def record_to_dict(record: TraceRecord) -> dict[str, object]:
    return {"ts": format_utc(record.ts), "node": record.node, "source": record.source,
            "destination": record.destination, "port": record.port, "decision": record.decision,
            "connections": record.connections, "bytes_in": record.bytes_in, "bytes_out": record.bytes_out}


def record_to_line(record: TraceRecord) -> str:
    return json.dumps(record_to_dict(record), separators=(", ", ": ")) + "\n"


def _parse_ts(text: str, cache: dict[str, float]) -> float:
    # Every record of a minute carries the same text: parse it once.
    ts = cache.get(text)
    if ts is None:
        if len(cache) > 4096:
            cache.clear()
        ts = cache[text] = parse_utc(text).timestamp()
    return ts


_DECISIONS = frozenset(DECISIONS)


def record_from_dict(data: object, where: str, ts_cache: dict[str, float] | None = None) -> TraceRecord:
    """One record, every field checked. A replay reads millions: a record that is plainly
    valid, of a minute already seen, is taken in one expression; anything else goes through
    the field-by-field checks that say what is wrong."""
    if type(data) is dict and ts_cache:
        ts_text = data.get("ts")
        ts = ts_cache.get(ts_text) if type(ts_text) is str else None
        node, source, destination = data.get("node", ""), data.get("source"), data.get("destination")
        port, decision = data.get("port"), data.get("decision")
        connections, bytes_in, bytes_out = data.get("connections", 0), data.get("bytes_in", 0), data.get("bytes_out", 0)
        if ts is not None and type(node) is str and type(source) is str and type(destination) is str \
                and source and destination and len(node) <= MAX_TEXT and len(source) <= MAX_TEXT \
                and len(destination) <= MAX_TEXT and type(decision) is str and decision in _DECISIONS \
                and type(port) is int and 0 <= port <= 65535 \
                and type(connections) is int and type(bytes_in) is int and type(bytes_out) is int \
                and 0 <= connections <= MAX_COUNT and 0 <= bytes_in <= MAX_COUNT and 0 <= bytes_out <= MAX_COUNT:
            return TraceRecord(ts, node, source, destination, port, decision, connections, bytes_in, bytes_out)
    return _checked(data, where, ts_cache)


def _checked(data: object, where: str, ts_cache: dict[str, float] | None) -> TraceRecord:
    if not isinstance(data, dict):
        raise TraceFormatError(f"{where}: a trace record is a JSON object with {', '.join(FIELDS)}")

    def text(name: str, *, required: bool = True) -> str:
        if name not in data:
            if required:
                raise TraceFormatError(f"{where}: {name!r} is missing")
            return ""
        value = data[name]
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise TraceFormatError(f"{where}: {name!r} must be text of at most {MAX_TEXT} characters")
        return value

    def number(name: str, high: int = MAX_COUNT, *, default: int | None = 0) -> int:
        value = data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise TraceFormatError(f"{where}: {name!r} must be a whole number from 0 to {high}")
        return value

    try:
        ts = _parse_ts(text("ts"), {} if ts_cache is None else ts_cache)
    except (ValueError, OverflowError) as err:  # OverflowError: year 1 with a zone east of UTC
        raise TraceFormatError(f"{where}: 'ts' must be an ISO 8601 UTC time like 2026-11-01T10:03:00Z") from err
    decision = text("decision")
    if decision not in DECISIONS:
        raise TraceFormatError(f"{where}: 'decision' must be one of {', '.join(DECISIONS)}, got {decision[:20]!r}")
    source, destination = text("source"), text("destination")
    if not source or not destination:
        raise TraceFormatError(f"{where}: 'source' and 'destination' must not be empty")
    port = number("port", 65535, default=None)
    return TraceRecord(ts, text("node", required=False), source, destination, port, decision,
                       number("connections"), number("bytes_in"), number("bytes_out"))


def read_trace(lines: Iterable[str | bytes], source: str) -> Iterator[TraceRecord]:
    """The records of a trace, in file order; blank lines are skipped."""
    cache: dict[str, float] = {}
    for number, line in enumerate(lines, start=1):
        if len(line) > MAX_LINE_BYTES:
            raise TraceFormatError(f"{source} line {number}: longer than {MAX_LINE_BYTES} bytes")
        if not line.strip():
            continue
        try:
            # Decoded here: json.loads on bytes first sniffs their encoding, a third of its time.
            data = json.loads(line.decode() if isinstance(line, bytes) else line)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError too; RecursionError: deep arrays
            raise TraceFormatError(f"{source} line {number}: not JSON ({str(err)[:80]})") from err
        try:
            record = record_from_dict(data, "", cache)
        except TraceFormatError as err:  # where it is, named only when it is wrong (the hot path)
            raise TraceFormatError(f"{source} line {number}{err}") from None
        yield record
