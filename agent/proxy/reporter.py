"""Decision telemetry: per (source, destination, port, decision, rule, route) counters with the
bytes each way (a tcp listener's connections, route ""; an http listener's requests, route the
method and the deciding rule's path pattern), and per (kind, subject, peer, reason) counters of
connections refused before any decision (a failed handshake, a local caller that is not the
service), flushed to the control plane in batches. The server sums the first into its flow
rollups (`trustmesh flows`) and audits denials and refusals as this agent's claim, aggregated
per agent and interval.

Counting never blocks a connection: a failed flush (the server out of reach) keeps the
counters for the next one, so an outage loses nothing as long as memory allows. Memory is
bounded: when a table is full, what is dropped first is a NEW key (an edge not seen since the
last successful flush), counted only in the metrics (`trustmesh_flow_keys_dropped_total`);
keys already held keep counting connections and bytes. A failed flush puts its counters back
ahead of those counted while it was in flight, and the bound holds there too: the keys that
were waiting are kept, and a key first seen during the failed send is the one dropped. An
unverified key carries the client's host, not its port, so one client is one key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from trustmesh._proto.trustmesh.v1 import node_pb2, types_pb2
from trustmesh.logs import log_event
from trustmesh.metrics import Registry
from trustmesh.policy import Decision
from trustmesh.spiffeid import SpiffeId

log = logging.getLogger("trustmesh.flows")

FLUSH_SECONDS = 2.0
_K = TypeVar("_K")

MAX_KEYS = 10_000
MAX_REFUSAL_KEYS = 1_000  # refusal keys carry attacker-chosen addresses: fewer of them
BATCH = 5_000  # counters per report (the server takes at most 10,000)


@dataclass
class _Count:
    count: int
    first: float
    last: float
    bytes_in: int = 0  # from the source to the destination
    bytes_out: int = 0


# allow; deny; audit (allowed only because the allowlist is in audit mode); unverified (a
# plaintext client of a permissive listener: no identity, its address host instead).
FlowKind = str
# (source ID or "", destination ID, port, kind, rule, client host or "", route or ""): the route
# ("GET /transactions/*", "POST") only for an HTTP request, so requests and connections to one
# port are separate keys, and one key counts either connections or requests.
FlowKey = tuple[str, str, int, FlowKind, str, str, str]
_WIRE: dict[FlowKind, tuple[node_pb2.FlowDecision, types_pb2.PolicyMode]] = {
    "allow": (node_pb2.FLOW_DECISION_ALLOW, types_pb2.POLICY_MODE_ENFORCE),
    "audit": (node_pb2.FLOW_DECISION_ALLOW, types_pb2.POLICY_MODE_AUDIT),
    "deny": (node_pb2.FLOW_DECISION_DENY, types_pb2.POLICY_MODE_ENFORCE),
    "unverified": (node_pb2.FLOW_DECISION_UNVERIFIED, types_pb2.POLICY_MODE_UNSPECIFIED),
}


def kind_of(decision: Decision) -> FlowKind:
    if not decision.allowed:
        return "deny"
    return "audit" if decision.audit_only else "allow"


class FlowReporter:
    def __init__(self, send: Callable[[node_pb2.ReportFlowsRequest], Awaitable[object]], metrics: Registry) -> None:
        self._send = send
        self._counts: dict[FlowKey, _Count] = {}
        self._refusals: dict[tuple[str, str, str, str], _Count] = {}
        self._decisions = metrics.counter("trustmesh_policy_decisions_total", "connection decisions",
                                          ["destination", "decision", "rule"])
        self._refused = metrics.counter("trustmesh_connections_refused_total",
                                        "connections refused before any policy decision", ["kind", "reason"])
        self._dropped = metrics.counter("trustmesh_flow_keys_dropped_total",
                                        "reports counted only in metrics because the pending report was full",
                                        ["table"])

    def report(self, source: SpiffeId | None, destination: SpiffeId, port: int, decision: Decision,
               client_host: str = "", route: str = "", request_id: str = "") -> FlowKey:
        """Count one connection's (or HTTP request's) decision; the key it was counted under,
        for its bytes later. `client_host`: where an inbound connection came from, so the server
        can tell which node the source ran on (one key per source host, not per connection).
        `route`: an HTTP request's route label, never its path (one key per route, not per
        URL); `request_id`: the ID its response carries, logged with a denial so an operator
        handed a 403 can find why."""
        self._decisions.inc(destination=str(destination), decision=decision.verdict.lower(), rule=decision.rule)
        if not decision.allowed or decision.audit_only:
            http = {name: value for name, value in (("route", route), ("request_id", request_id)) if value}
            log_event(log, "connection_denied" if not decision.allowed else "audit_would_deny",
                      level=logging.WARNING, source=source or "unverified", destination=destination, port=port,
                      rule=decision.rule, reason=decision.reason, **http)
        key = (str(source) if source else "", str(destination), port, kind_of(decision), decision.rule, client_host,
               route)
        self._count(key, connections=1)
        return key

    def unverified(self, destination: SpiffeId, port: int, client_host: str, route: str = "") -> FlowKey:
        """Count a plaintext client a permissive listener forwarded (a connection, or an HTTP
        request of `route`): no identity, no policy decision, just where it came from (the
        host: one key per client, not per connection)."""
        self._decisions.inc(destination=str(destination), decision="unverified", rule="")
        key = ("", str(destination), port, "unverified", "", client_host, route)
        self._count(key, connections=1)
        return key

    def traffic(self, key: FlowKey, bytes_in: int, bytes_out: int) -> None:
        """Add bytes a connection counted under `key` moved since it was last metered (at
        close, and every minute while it stays open); no connection is counted."""
        if bytes_in or bytes_out:
            self._count(key, connections=0, bytes_in=bytes_in, bytes_out=bytes_out)

    def _count(self, key: FlowKey, *, connections: int, bytes_in: int = 0, bytes_out: int = 0) -> None:
        now = time.time()
        entry = self._counts.get(key)
        if entry is None:
            if len(self._counts) >= MAX_KEYS:
                self._dropped.inc(table="decisions")  # bounded memory under a flood
                return
            self._counts[key] = _Count(connections, now, now, bytes_in, bytes_out)
        else:
            entry.count += connections
            entry.last = now
            entry.bytes_in += bytes_in
            entry.bytes_out += bytes_out

    def refused(self, kind: str, subject: str, peer: str, reason: str) -> None:
        """Count a connection refused before any policy decision. `kind` and `reason` are
        our own short words (they label a metric); `subject` is the listener's service and
        `peer` who tried (a source address, or a local caller's uid and pid)."""
        self._refused.inc(kind=kind, reason=reason)
        key = (kind, subject, peer, reason)
        now = time.time()
        entry = self._refusals.get(key)
        if entry is None:
            if len(self._refusals) >= MAX_REFUSAL_KEYS:
                self._dropped.inc(table="refusals")
                return
            self._refusals[key] = _Count(1, now, now)
        else:
            entry.count += 1
            entry.last = now

    async def flush(self) -> None:
        if not self._counts and not self._refusals:
            return
        counts, self._counts = self._counts, {}
        refusals, self._refusals = self._refusals, {}
        # In reports of at most BATCH counters: the server refuses larger ones, and a report it
        # refuses would be kept and resent for ever.
        flows, refused = list(counts.items()), list(refusals.items())
        while flows or refused:
            batch, flows = flows[:BATCH], flows[BATCH:]
            refusal_batch, refused = refused[:BATCH - len(batch)], refused[BATCH - len(batch):]
            request = node_pb2.ReportFlowsRequest(
                counters=[
                    node_pb2.FlowCounter(
                        source_id=src, destination_id=dst, port=port, decision=_WIRE[kind][0], rule=rule,
                        mode=_WIRE[kind][1], count=c.count, first_seen=int(c.first), last_seen=int(c.last),
                        bytes_in=c.bytes_in, bytes_out=c.bytes_out, source_address=host, route=route)
                    for (src, dst, port, kind, rule, host, route), c in batch
                ],
                refusals=[
                    node_pb2.RefusalCounter(kind=kind, subject=subject, peer=peer, reason=reason, count=c.count,
                                            first_seen=int(c.first), last_seen=int(c.last))
                    for (kind, subject, peer, reason), c in refusal_batch
                ],
            )
            try:
                await self._send(request)
            except grpc.aio.AioRpcError as err:
                # Keep this batch and the ones not sent yet for the next flush, ahead of the keys
                # counted while the send was in flight (which may not push the table past its bound).
                self._counts, lost = _merge_back(dict(batch + flows), self._counts, MAX_KEYS)
                if lost:
                    self._dropped.inc(lost, table="decisions")
                self._refusals, lost = _merge_back(dict(refusal_batch + refused), self._refusals,
                                                   MAX_REFUSAL_KEYS)
                if lost:
                    self._dropped.inc(lost, table="refusals")
                log_event(log, "flow_report_failed", level=logging.WARNING, code=err.code().name)
                return

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()


def _merge_back(unsent: dict[_K, _Count], newer: dict[_K, _Count], limit: int) -> tuple[dict[_K, _Count], int]:
    """The counters a failed flush could not send, with those counted while it was in flight
    added in; a key new to both that would pass `limit` is dropped (the new edge goes first,
    as in `_count`). Returns the table and how many keys were dropped."""
    merged, dropped = dict(unsent), 0
    for key, c in newer.items():
        older = merged.get(key)
        if older is not None:
            older.count += c.count
            older.last = max(older.last, c.last)
            older.bytes_in += c.bytes_in
            older.bytes_out += c.bytes_out
        elif len(merged) < limit:
            merged[key] = c
        else:
            dropped += 1
    return merged, dropped
