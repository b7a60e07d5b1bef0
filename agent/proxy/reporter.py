"""Decision telemetry: per (source, destination, port, decision, rule) counters, flushed to
the control plane in batches; the server turns denials (and audit-mode would-be denials)
into audit events. Counting never blocks a connection: a full or failed flush keeps the
counters for the next one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from trustmesh._proto.trustmesh.v1 import node_pb2, types_pb2
from trustmesh.logs import log_event
from trustmesh.metrics import Registry
from trustmesh.policy import Decision
from trustmesh.spiffeid import SpiffeId

log = logging.getLogger("trustmesh.flows")

FLUSH_SECONDS = 2.0
MAX_KEYS = 10_000


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
        self._decisions = metrics.counter("trustmesh_policy_decisions_total", "connection decisions",
                                          ["destination", "decision", "rule"])
        self.refused_stub_count = 0  # STUB (issue 13, branch i13-outbound): see refused() below

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
                return  # bounded memory under a flood; the metric above still counts
            self._counts[key] = _Count(1, now, now, decision.audit_only)
        else:
            entry.count += 1
            entry.last = now

    # --- STUB (issue 13, branch i13-outbound) -----------------------------------------------
    # The listeners call refused() for handshake refusals and refused outbound callers. The
    # aggregated, audited implementation is another change of issue 13; this stub, with that
    # exact signature, only counts so the listeners can call it meanwhile. Replace it whole.
    def refused(self, kind: str, subject: str, peer: str, reason: str) -> None:
        self.refused_stub_count += 1

    async def flush(self) -> None:
        if not self._counts:
            return
        counts, self._counts = self._counts, {}
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
            ]
        )
        try:
            await self._send(request)
        except grpc.aio.AioRpcError as err:
            for key, c in counts.items():  # keep them for the next flush
                self._counts.setdefault(key, c)
            log_event(log, "flow_report_failed", level=logging.WARNING, code=err.code().name)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()
