"""Decision telemetry: per (source, destination, port, decision, rule) counters, and per
(kind, subject, peer, reason) counters of connections refused before any decision (a failed
handshake, a local caller that is not the service), flushed to the control plane in batches.
The server audits what it is sent as this agent's claim, aggregated per agent and interval.
Counting never blocks a connection: a full or failed flush keeps the counters for the next
one, and memory is bounded (a key past the limit is counted only in the metrics)."""

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


@dataclass
class _Count:
    count: int
    first: float
    last: float
    audit_only: bool


class FlowReporter:
    def __init__(self, send: Callable[[node_pb2.ReportFlowsRequest], Awaitable[object]], metrics: Registry) -> None:
        self._send = send
        self._counts: dict[tuple[str, str, int, bool, str], _Count] = {}
        self._refusals: dict[tuple[str, str, str, str], _Count] = {}
        self._decisions = metrics.counter("trustmesh_policy_decisions_total", "connection decisions",
                                          ["destination", "decision", "rule"])
        self._refused = metrics.counter("trustmesh_connections_refused_total",
                                        "connections refused before any policy decision", ["kind", "reason"])
        self._dropped = metrics.counter("trustmesh_flow_keys_dropped_total",
                                        "reports counted only in metrics because the pending report was full",
                                        ["table"])

    def report(self, source: SpiffeId | None, destination: SpiffeId, port: int, decision: Decision) -> None:
        self._decisions.inc(destination=str(destination), decision=decision.verdict.lower(), rule=decision.rule)
        if not decision.allowed or decision.audit_only:
            log_event(log, "connection_denied" if not decision.allowed else "audit_would_deny",
                      level=logging.WARNING, source=source or "unverified", destination=destination, port=port,
                      rule=decision.rule, reason=decision.reason)
        key = (str(source) if source else "", str(destination), port, decision.allowed, decision.rule)
        now = time.time()
        entry = self._counts.get(key)
        if entry is None:
            if len(self._counts) >= MAX_KEYS:
                self._dropped.inc(table="decisions")  # bounded memory under a flood
                return
            self._counts[key] = _Count(1, now, now, decision.audit_only)
        else:
            entry.count += 1
            entry.last = now

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
            self._refusals[key] = _Count(1, now, now, False)
        else:
            entry.count += 1
            entry.last = now

    async def flush(self) -> None:
        if not self._counts and not self._refusals:
            return
        counts, self._counts = self._counts, {}
        refusals, self._refusals = self._refusals, {}
        request = node_pb2.ReportFlowsRequest(
            counters=[
                node_pb2.FlowCounter(
                    source_id=src,
                    destination_id=dst,
                    port=port,
                    decision=node_pb2.FLOW_DECISION_ALLOW if allowed else node_pb2.FLOW_DECISION_DENY,
                    rule=rule,
                    mode=types_pb2.POLICY_MODE_AUDIT if c.audit_only else types_pb2.POLICY_MODE_ENFORCE,
                    count=c.count,
                    first_seen=int(c.first),
                    last_seen=int(c.last),
                )
                for (src, dst, port, allowed, rule), c in counts.items()
            ],
            refusals=[
                node_pb2.RefusalCounter(kind=kind, subject=subject, peer=peer, reason=reason, count=c.count,
                                        first_seen=int(c.first), last_seen=int(c.last))
                for (kind, subject, peer, reason), c in refusals.items()
            ],
        )
        try:
            await self._send(request)
        except grpc.aio.AioRpcError as err:
            _merge_back(self._counts, counts)  # keep them for the next flush
            _merge_back(self._refusals, refusals)
            log_event(log, "flow_report_failed", level=logging.WARNING, code=err.code().name)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()


def _merge_back(into: dict[_K, _Count], unsent: dict[_K, _Count]) -> None:
    """Put counters a failed flush could not send back in front of what was counted meanwhile."""
    for key, c in unsent.items():
        newer = into.get(key)
        if newer is None:
            into[key] = c
        else:
            newer.count += c.count
            newer.first = min(newer.first, c.first)
