"""Flow rollups: who talked to whom, per edge and hour, bounded by edges, not by traffic.

Agents report counters every few seconds (ReportFlows). Each replica sums what it receives
per (hour, edge) in memory and, every `--flow-rollup-interval`, writes the hours that changed
to the store as sealed records `flows/<hour>/<replica>/<shard>`: a replica's edges of one hour
spread over SHARDS records, so the writes per interval are bounded by the shards, whatever
the traffic or the number of agents (one transaction per interval). A query reads every
replica's records for the window, with this replica's unflushed sums in place of its own
stored ones, so `trustmesh flows` sees what every replica received; idle, nothing is read.
A restart loses at most one interval (a new process is a new replica name; what the old one
stored stays and counts). The leader, once an hour, merges every replica's hours of each day
that ended over two hours ago into one record set for the day, and days into weeks once the
week ended seven days ago (a 30-day window then reads about 10 record sets, not 720), and
deletes what fell out of `--flow-retention` by key prefix, without reading it. A window that
reaches into a merged day or week starts where it starts (the answer says so).

Reports are the agents' claims. A counter is kept only when the reporting agent runs the
source or the destination (one of the entries it may use names it): a compromised agent can
misreport its own workloads' traffic, not invent traffic between others' (which `policy
suggest` would turn into rules). Times come from the server's clock, the agent's only within
the last interval, so a report cannot land in another hour.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from trustmesh.controlplane.flow_audit import FlowCounter
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import FlowRow, FlowShard, RegistrationEntry
from trustmesh.controlplane.store.store import HOURS_PER
from trustmesh.errors import InvalidArgumentError, StoreError
from trustmesh.flows import DECISIONS, Flow, valid_route
from trustmesh.logs import log_event
from trustmesh.spiffeid import SpiffeId

log = logging.getLogger("trustmesh.flows")

HOUR = 3600
SHARDS = 16  # records per replica and hour; each holds about MAX_EDGES_PER_HOUR / SHARDS edges
MAX_EDGES_PER_HOUR = 50_000  # per replica; past it, new edges are counted as dropped
MAX_ROWS_PER_RECORD = 4_000  # about 600 KB of JSON
KEEP_HOURS = 2  # hours kept in memory after their last write (the current and the previous one)
COMPACT_AFTER_HOURS = 2  # a day's hours are merged into the day this long after it ended
KEEP_DAYS = 7  # days are merged into their week once the week ended this many days ago
COMPACTED = "compacted"  # the replica name of merged days and weeks


class AuthorizedEntries(Protocol):
    """What the registry view answers: the entries an agent may use."""

    def authorized_for(self, agent: str) -> list[RegistrationEntry]: ...


@dataclass(frozen=True)
class FlowQuery:
    since: float = 0.0  # unix seconds; 0: everything retained
    source: str = ""
    destination: str = ""
    decision: str = ""

    def matches(self, source: str, destination: str, decision: str) -> bool:
        return ((not self.source or source == self.source)
                and (not self.destination or destination == self.destination)
                and (not self.decision or decision == self.decision))


@dataclass(frozen=True)
class FlowWindow:
    flows: list[Flow]
    since: float  # hour-aligned start of what was read
    until: float


def decision_of(counter: FlowCounter) -> str:
    if counter.unverified:
        return "unverified"
    if counter.denied:
        return "deny"
    return "audit" if counter.audit_mode else "allow"


# source, destination, port, decision, rule, source address, route (an HTTP request's; "" for a connection)
EdgeKey = tuple[str, str, int, str, str, str, str]


class _Sums:
    """Per-edge sums: a small list per edge ([connections, bytes in, bytes out, first seen,
    last seen]), a Flow only per edge at the end (a 30-day window can hold hundreds of
    thousands of stored rows). An hour's sums in memory, and a query's, are both one of these."""

    def __init__(self, query: FlowQuery | None = None) -> None:
        self._query = query or FlowQuery()
        self._acc: dict[EdgeKey, list[Any]] = {}

    def __len__(self) -> int:
        return len(self._acc)

    def __contains__(self, key: EdgeKey) -> bool:
        return key in self._acc

    def add(self, key: EdgeKey, conns: int, bytes_in: int, bytes_out: int, first: float, last: float) -> None:
        sums = self._acc.get(key)
        if sums is None:
            self._acc[key] = [conns, bytes_in, bytes_out, first, last]
            return
        sums[0] += conns
        sums[1] += bytes_in
        sums[2] += bytes_out
        if first < sums[3]:
            sums[3] = first
        if last > sums[4]:
            sums[4] = last

    def add_rows(self, rows: list[FlowRow]) -> None:
        """Stored rows (records.FlowRow), the ones the query wants."""
        wanted = self._query.matches
        for src, dst, port, decision, rule, conns, bytes_in, bytes_out, first, last, address, route in rows:
            if wanted(src, dst, decision):
                self.add((src, dst, port, decision, rule, address, route), conns, bytes_in, bytes_out, first, last)

    def add_sums(self, other: _Sums) -> None:
        for key, sums in other._acc.items():
            if self._query.matches(key[0], key[1], key[3]):
                self.add(key, *sums)

    def flows(self) -> list[Flow]:
        """The edges' flows, in edge order."""
        return [Flow(k[0], k[1], k[2], k[3], k[4], a[0], a[1], a[2], float(a[3]), float(a[4]), k[5], k[6])
                for k, a in sorted(self._acc.items())]


def _checked(cache: dict[str, bool], text: str, parse: Callable[[str], object]) -> bool:
    """Whether `parse` accepts `text` (it raises ValueError if not), asked once per text."""
    known = cache.get(text)
    if known is None:
        try:
            parse(text)
            known = True
        except ValueError:  # InvalidSpiffeIdError is one
            known = False
        cache[text] = known
    return known


class _Validity:
    """SPIFFE IDs where identities belong; for an unverified caller no ID and an IP address;
    a route, if any, of the one shape agents send (flows.valid_route): all of them are printed
    in tables, graphs and suggested files' comments, so nothing else gets in. A report names
    few distinct IDs and addresses many times: each is parsed once."""

    def __init__(self) -> None:
        self._ids: dict[str, bool] = {}
        self._addresses: dict[str, bool] = {}

    def counter(self, c: FlowCounter) -> bool:
        if not _checked(self._ids, c.destination_id, SpiffeId.parse):
            return False
        if not valid_route(c.route):  # a length check and one regular expression: no cache needed
            return False
        if c.unverified:
            return not c.source_id and _checked(self._addresses, c.source_address, ipaddress.ip_address)
        return _checked(self._ids, c.source_id, SpiffeId.parse)


class FlowRollups:
    def __init__(self, rt: ServerRuntime, view: AuthorizedEntries, replica: str) -> None:
        self._rt = rt
        self._view = view
        self._replica = replica
        self._hours: dict[int, _Sums] = {}  # this replica's sums of the recent hours
        self._dirty: set[int] = set()
        self._maintained_hour: int | None = None  # the leader's: the hour of its last compaction
        metrics = rt.metrics
        self._kept = metrics.counter("trustmesh_flow_edges_reported_total", "flow counters added to the rollups")
        self._dropped = metrics.counter("trustmesh_flow_counters_dropped_total",
                                        "flow counters not kept in the rollups, by reason", ["reason"])
        self._writes = metrics.counter("trustmesh_flow_rollup_writes_total", "flow rollup records written")

    # --- ingestion ---------------------------------------------------------------------------

    def add(self, agent: str, counters: Sequence[FlowCounter]) -> list[tuple[FlowCounter, bool]]:
        """Sum an agent's (already validated) counters into this hour's rollup. Returns the
        counters kept, each with whether the agent runs its source (for the detectors)."""
        if not counters:
            return []
        own = {str(e.spiffe_id) for e in self._view.authorized_for(agent)}
        now = self._rt.clock()
        hour = int(now // HOUR)
        edges = self._hours.setdefault(hour, _Sums())
        oldest = max(hour * HOUR, now - self._rt.config.flow_rollup_interval.total_seconds() - 60)
        valid = _Validity()
        dropped: dict[str, int] = {}
        kept: list[tuple[FlowCounter, bool]] = []
        for c in counters:
            if not valid.counter(c):
                dropped["malformed"] = dropped.get("malformed", 0) + 1
                continue
            if c.source_id not in own and c.destination_id not in own:
                dropped["not_the_agents"] = dropped.get("not_the_agents", 0) + 1
                continue
            key = (c.source_id, c.destination_id, c.port, decision_of(c), c.rule,
                   c.source_address if c.unverified else "", c.route)
            if key not in edges and len(edges) >= MAX_EDGES_PER_HOUR:
                dropped["too_many_edges"] = dropped.get("too_many_edges", 0) + 1
                continue
            edges.add(key, c.count, c.bytes_in, c.bytes_out, min(max(float(c.first_seen), oldest), now),
                      min(max(float(c.last_seen), oldest), now))
            kept.append((c, c.source_id in own))
        for reason, count in dropped.items():
            self._dropped.inc(count, reason=reason)
        self._kept.inc(len(kept))
        self._dirty.add(hour)
        return kept

    # --- persistence -------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write the hours that changed since the last flush (one transaction per 100 records)."""
        dirty, self._dirty = self._dirty, set()
        shards = [shard for hour in sorted(dirty)
                  for shard in _shards(self._hours[hour].flows() if hour in self._hours else [], hour,
                                       self._replica)]
        try:
            await self._rt.store.put_flow_shards(shards)
        except StoreError:
            self._dirty |= dirty  # try again next time; the sums are still here
            raise
        self._writes.inc(len(shards))
        current = int(self._rt.clock() // HOUR)
        for hour in [h for h in self._hours if h < current - KEEP_HOURS + 1 and h not in self._dirty]:
            del self._hours[hour]

    async def run(self, stop: asyncio.Event) -> None:
        """Flush every interval until `stop`, then once more."""
        interval = self._rt.config.flow_rollup_interval.total_seconds()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
            try:
                await self.flush()
            except StoreError as err:
                log_event(log, "flow_rollup_write_failed", level=logging.WARNING, error=str(err),
                          hint="kept in memory; retried at the next interval")

    # --- reading -----------------------------------------------------------------------------

    async def query(self, query: FlowQuery) -> FlowWindow:
        if query.decision and query.decision not in DECISIONS:
            raise InvalidArgumentError(f"--decision {query.decision[:20]!r}: one of {', '.join(DECISIONS)}")
        now = self._rt.clock()
        retention = self._rt.config.flow_retention.total_seconds()
        since = max(query.since, now - retention) if query.since > 0 else now - retention
        since_hour = int(since // HOUR)
        stored = await self._rt.store.list_flow_rows(since_hour)
        compacted = {(level, period) for level, period, _, _ in stored if level != "hour"}
        sums, start = _Sums(query), since_hour
        for level, period, replica, rows in stored:
            if _covered(level, period, compacted):
                continue  # already in a day or week the leader merged it into
            if level == "hour" and replica == self._replica and period in self._hours:
                continue  # ours: the fresher copy in memory below
            sums.add_rows(rows)
            start = min(start, period * HOURS_PER[level])
        for hour, edges in self._hours.items():
            if hour >= since_hour and not _covered("hour", hour, compacted):
                sums.add_sums(edges)
        # A window reaching into merged days or weeks starts where the first of them starts.
        return FlowWindow(sums.flows(), start * HOUR, now)

    # --- compaction and retention (the leader) ---------------------------------------------

    async def maintain(self) -> None:
        """Once an hour: merge hours into days and days into weeks, then drop what fell out of
        `--flow-retention`. Reads nothing between hours (the leader calls this every round)."""
        now_hour = int(self._rt.clock() // HOUR)
        if now_hour == self._maintained_hour:
            return
        await self.compact(now_hour)
        await self.prune(now_hour)
        self._maintained_hour = now_hour

    async def compact(self, now_hour: int) -> None:
        """Merge every replica's hours of each day that ended long enough ago (no replica writes
        it any more) into that day, and the days of each week older than KEEP_DAYS into that week,
        so a 30-day window reads about 10 records per edge instead of 720. Idempotent: a period
        merged before a crash is not merged twice (its parts are only deleted)."""
        settle = max(COMPACT_AFTER_HOURS, 2 * int(self._rt.config.flow_rollup_interval.total_seconds() // HOUR) + 1)
        for level, into, last in (("hour", "day", (now_hour - settle) // 24),
                                  ("day", "week", (now_hour // 24 - KEEP_DAYS) // 7)):
            per = HOURS_PER[into] // HOURS_PER[level]
            oldest = await self._rt.store.oldest_flow_period(level)
            while oldest is not None and oldest // per < last:
                target = oldest // per
                if not await self._rt.store.flow_rows_of(into, target):
                    sums = _Sums()
                    for period in range(target * per, (target + 1) * per):
                        for _, rows in await self._rt.store.flow_rows_of(level, period):
                            sums.add_rows(rows)
                    await self._rt.store.put_flow_shards(_shards(sums.flows(), target, COMPACTED), into)
                await self._rt.store.delete_flow_periods(level, target * per, (target + 1) * per)
                log_event(log, "flows_compacted", into=into, period=target, start=target * HOURS_PER[into] * HOUR)
                oldest = await self._rt.store.oldest_flow_period(level)

    async def prune(self, now_hour: int | None = None) -> None:
        """Delete what fell out of `--flow-retention`: hours before the cutoff, and days and weeks
        that ended before it (a week is kept until all of it has)."""
        if now_hour is None:
            now_hour = int(self._rt.clock() // HOUR)
        cutoff = now_hour - int(self._rt.config.flow_retention.total_seconds() // HOUR)
        for level in ("hour", "day", "week"):
            end = cutoff // HOURS_PER[level]  # periods before this one ended before the cutoff
            oldest = await self._rt.store.oldest_flow_period(level)
            if oldest is not None and oldest < end:
                await self._rt.store.delete_flow_periods(level, oldest, end)
                log_event(log, "flows_pruned", rollup=level, periods=end - oldest, before=end * HOURS_PER[level] * HOUR)


def _covered(level: str, period: int, compacted: set[tuple[str, int]]) -> bool:
    first_hour = period * HOURS_PER[level]
    return any((upper, first_hour // HOURS_PER[upper]) in compacted
               for upper in ("day", "week") if HOURS_PER[upper] > HOURS_PER[level])


def _shards(flows: list[Flow], period: int, replica: str) -> list[FlowShard]:
    """`flows` spread over records by edge: SHARDS of them, more when a merged day or week holds
    so many edges that a record would grow past MAX_ROWS_PER_RECORD (etcd refuses requests of
    more than 1.5 MiB)."""
    count = max(SHARDS, -(-len(flows) // MAX_ROWS_PER_RECORD))
    parts: list[list[Flow]] = [[] for _ in range(count)]
    for flow in flows:
        parts[zlib.crc32(repr(flow.key).encode()) % count].append(flow)
    return [FlowShard(period, replica, i, tuple(part)) for i, part in enumerate(parts) if part]


__all__ = ["FlowQuery", "FlowRollups", "FlowWindow", "decision_of"]
