"""Flow rollups: who talked to whom, per edge and hour, bounded by edges, not by traffic.

Agents report counters every few seconds (ReportFlows). Each replica sums what it receives
per (hour, edge) in memory and, every `--flow-rollup-interval`, writes the hours that changed
to the store as sealed records `flows/<hour>/<replica>/<shard>`: a replica's edges of one hour
spread over SHARDS records, so the writes per interval are bounded by the shards, whatever
the traffic or the number of agents (one transaction per interval). A query reads every
replica's records for the window, with this replica's unflushed sums in place of its own
stored ones, so `trustmesh flows` sees what every replica received; idle, nothing is read.
A restart loses at most one interval (a new process is a new replica name; what the old one
stored stays and counts). The leader deletes hours older than `--flow-retention`, by key
prefix, without reading them.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from trustmesh.controlplane.flow_audit import FlowCounter
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import FlowShard, RegistrationEntry
from trustmesh.errors import InvalidArgumentError, InvalidSpiffeIdError, StoreError
from trustmesh.flows import DECISIONS, Flow, merge
from trustmesh.logs import log_event
from trustmesh.spiffeid import SpiffeId

log = logging.getLogger("trustmesh.flows")

HOUR = 3600
SHARDS = 16  # records per replica and hour; each holds about MAX_EDGES_PER_HOUR / SHARDS edges
MAX_EDGES_PER_HOUR = 50_000  # per replica; past it, new edges are counted as dropped
KEEP_HOURS = 2  # hours kept in memory after their last write (the current and the previous one)


class AuthorizedEntries(Protocol):
    """What the registry view answers: the entries an agent may use."""

    def authorized_for(self, agent: str) -> list[RegistrationEntry]: ...


@dataclass(frozen=True)
class FlowQuery:
    since: float = 0.0  # unix seconds; 0: everything retained
    source: str = ""
    destination: str = ""
    decision: str = ""

    def matches(self, flow: Flow) -> bool:
        return ((not self.source or flow.source == self.source)
                and (not self.destination or flow.destination == self.destination)
                and (not self.decision or flow.decision == self.decision))


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


def _well_formed(c: FlowCounter) -> bool:
    """SPIFFE IDs where identities belong; for an unverified caller no ID and an IP address
    (it is printed in tables, graphs and suggested files' comments: nothing else gets in)."""
    try:
        SpiffeId.parse(c.destination_id)
        if c.unverified:
            ipaddress.ip_address(c.source_address)
            return not c.source_id
        SpiffeId.parse(c.source_id)
    except (InvalidSpiffeIdError, ValueError):
        return False
    return True


class FlowRollups:
    def __init__(self, rt: ServerRuntime, view: AuthorizedEntries, replica: str) -> None:
        self._rt = rt
        self._view = view
        self._replica = replica
        self._hours: dict[int, dict[tuple[str, str, int, str, str, str], Flow]] = {}
        self._dirty: set[int] = set()
        self._pruned_to: int | None = None  # the leader's: hours before this are gone
        metrics = rt.metrics
        self._kept = metrics.counter("trustmesh_flow_edges_reported_total", "flow counters added to the rollups")
        self._dropped = metrics.counter("trustmesh_flow_counters_dropped_total",
                                        "flow counters not kept in the rollups, by reason", ["reason"])
        self._writes = metrics.counter("trustmesh_flow_rollup_writes_total", "flow rollup records written")

    # --- ingestion ---------------------------------------------------------------------------

    def add(self, agent: str, counters: Sequence[FlowCounter]) -> None:
        """Sum an agent's (already validated) counters into this hour's rollup."""
        if not counters:
            return
        own = {str(e.spiffe_id) for e in self._view.authorized_for(agent)}
        now = self._rt.clock()
        hour = int(now // HOUR)
        edges = self._hours.setdefault(hour, {})
        oldest = max(hour * HOUR, now - self._rt.config.flow_rollup_interval.total_seconds() - 60)
        for c in counters:
            if not _well_formed(c):
                self._dropped.inc(reason="malformed")
                continue
            if c.source_id not in own and c.destination_id not in own:
                self._dropped.inc(reason="not_the_agents")
                continue
            flow = Flow(c.source_id, c.destination_id, c.port, decision_of(c), c.rule, c.count, c.bytes_in,
                        c.bytes_out, min(max(float(c.first_seen), oldest), now),
                        min(max(float(c.last_seen), oldest), now), c.source_address if c.unverified else "")
            known = edges.get(flow.key)
            if known is None and len(edges) >= MAX_EDGES_PER_HOUR:
                self._dropped.inc(reason="too_many_edges")
                continue
            edges[flow.key] = flow if known is None else known.merged(flow)
            self._kept.inc()
        self._dirty.add(hour)

    # --- persistence -------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write the hours that changed since the last flush (one transaction per 100 records)."""
        dirty, self._dirty = self._dirty, set()
        shards = []
        for hour in sorted(dirty):
            parts: list[list[Flow]] = [[] for _ in range(SHARDS)]
            for key, flow in self._hours.get(hour, {}).items():
                parts[zlib.crc32(repr(key).encode()) % SHARDS].append(flow)
            shards += [FlowShard(hour, self._replica, i, tuple(part)) for i, part in enumerate(parts) if part]
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
        flows = [f for shard in await self._rt.store.list_flow_shards(since_hour)
                 if not (shard.replica == self._replica and shard.hour in self._hours)
                 for f in shard.edges]
        flows += [f for hour, edges in self._hours.items() if hour >= since_hour for f in edges.values()]
        return FlowWindow([f for f in merge(flows) if query.matches(f)], since_hour * HOUR, now)

    # --- retention (the leader) ------------------------------------------------------------

    async def prune(self) -> None:
        """Delete the hours that fell out of `--flow-retention`: the first time from the oldest
        stored hour (one key read), then only the hours that fell out since."""
        cutoff = int((self._rt.clock() - self._rt.config.flow_retention.total_seconds()) // HOUR)
        start = self._pruned_to
        if start is None:
            start = await self._rt.store.oldest_flow_hour()
            if start is None:
                self._pruned_to = cutoff
                return
        if start < cutoff:
            await self._rt.store.delete_flow_hours(start, cutoff)
            log_event(log, "flow_hours_pruned", hours=cutoff - start, before=cutoff * HOUR)
        self._pruned_to = max(start, cutoff)


__all__ = ["FlowQuery", "FlowRollups", "FlowWindow", "decision_of"]
