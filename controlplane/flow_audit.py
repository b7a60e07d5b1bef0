"""Agents' flow reports in the audit log: what an agent claims, aggregated and rate-limited.

A flow report is what an agent says its listeners saw; the server cannot check it, and a
compromised agent can say anything. So an agent must not be able to choose how many audit
events there are, how large they are, or make its words look like the server's own
findings. Each agent gets at most one ``flows.reported`` event per interval, labelled as
its claim, that sums up everything it reported since its previous event: totals by
decision, refusals before any decision (failed handshakes, local callers that are not the
service) and the largest flows and refusals, clipped. The first report after a quiet
interval is audited at once, so a denial shows within seconds; what comes later in the
interval waits for the next event. Reports of allowed traffic only are counted in the
metrics, never audited.

Memory is bounded: at most MAX_KEYS distinct flows and refusals are kept per agent between
events (what arrives past that is still summed in the totals, and counted as `unlisted`),
and only agents that reported since their last event are held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trustmesh.clip import CLAIMED, clip
from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.audit_window import AuditWindow

KIND = "flows.reported"
CLAIM = "reported by the agent; not observed by the server"
MAX_KEYS = 1_000  # distinct flows, and distinct refusals, kept per agent between two events
TOP = 20  # flows and refusals listed in one event, largest counts first


@dataclass(frozen=True)
class FlowCounter:
    """Connections (or HTTP requests) with the same (source, destination, port, decision, rule,
    mode, route) counted over [first_seen, last_seen] by an agent's listeners."""

    source_id: str
    destination_id: str
    port: int
    denied: bool  # denied by the policy (with audit mode the connection still went through)
    audit_mode: bool
    rule: str
    count: int
    first_seen: int
    last_seen: int
    bytes_in: int = 0  # from the source to the destination
    bytes_out: int = 0
    unverified: bool = False  # a plaintext client of a permissive listener: no identity, just an address
    source_address: str = ""
    route: str = ""  # an HTTP request's route label ("GET /transactions/*"); "" for a connection


@dataclass(frozen=True)
class RefusalCounter:
    """Connections an agent refused before any policy decision, per (kind, subject, peer,
    reason): `handshake` (subject: the listener's service, peer: the source address) or
    `outbound_caller` (subject: the service, peer: the local caller's uid and pid) or
    `workload_api` (a local caller the agent's socket refused: uid and pid)."""

    kind: str
    subject: str
    peer: str
    reason: str
    count: int
    first_seen: int
    last_seen: int


@dataclass
class _Pending:
    """What one agent reported since its last event."""

    allowed: int = 0
    denied: int = 0
    would_deny: int = 0
    refused: int = 0
    unlisted: int = 0  # counts whose keys did not fit in MAX_KEYS
    flows: dict[tuple[str, str, str, int, str], int] = field(default_factory=dict)
    refusals: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    first_seen: int | None = None
    last_seen: int | None = None

    @property
    def worth_auditing(self) -> bool:
        return bool(self.denied or self.would_deny or self.refused)

    def seen(self, first: int, last: int) -> None:
        self.first_seen = first if self.first_seen is None else min(self.first_seen, first)
        self.last_seen = last if self.last_seen is None else max(self.last_seen, last)

    def add_flow(self, c: FlowCounter) -> None:
        if not c.denied and not c.audit_mode:
            self.allowed += c.count
            return
        if c.denied:
            self.denied += c.count
        else:
            self.would_deny += c.count
        self.seen(c.first_seen, c.last_seen)
        decision = "deny" if c.denied else "audit-deny"
        key = (decision, clip(c.source_id or "unverified", CLAIMED), clip(c.destination_id, CLAIMED), c.port,
               clip(c.rule, CLAIMED))
        self.unlisted += _add(self.flows, key, c.count)

    def add_refusal(self, r: RefusalCounter) -> None:
        self.refused += r.count
        self.seen(r.first_seen, r.last_seen)
        key = (clip(r.kind, CLAIMED), clip(r.subject, CLAIMED), clip(r.peer, CLAIMED), clip(r.reason, CLAIMED))
        self.unlisted += _add(self.refusals, key, r.count)

    def merge(self, other: _Pending) -> None:
        """Add what `other` holds (reported while this one was being written, and failed)."""
        self.allowed += other.allowed
        self.denied += other.denied
        self.would_deny += other.would_deny
        self.refused += other.refused
        self.unlisted += other.unlisted
        for fkey, n in other.flows.items():
            self.unlisted += _add(self.flows, fkey, n)
        for rkey, n in other.refusals.items():
            self.unlisted += _add(self.refusals, rkey, n)
        if other.first_seen is not None and other.last_seen is not None:
            self.seen(other.first_seen, other.last_seen)

    def details(self) -> dict[str, Any]:
        flows = sorted(self.flows.items(), key=lambda kv: -kv[1])
        refusals = sorted(self.refusals.items(), key=lambda kv: -kv[1])
        return {
            "claim": CLAIM,
            "denied": self.denied,
            "would_deny": self.would_deny,
            "refused": self.refused,
            "allowed": self.allowed,
            "first_seen": _iso(self.first_seen),
            "last_seen": _iso(self.last_seen),
            "distinct_flows": len(self.flows),
            "distinct_refusals": len(self.refusals),
            "unlisted": self.unlisted + sum(n for _, n in flows[TOP:]) + sum(n for _, n in refusals[TOP:]),
            "flows": [{"decision": d, "source": s, "destination": dst, "port": p, "rule": rule, "count": n}
                      for (d, s, dst, p, rule), n in flows[:TOP]],
            "refusals": [{"kind": k, "subject": s, "peer": p, "reason": why, "count": n}
                         for (k, s, p, why), n in refusals[:TOP]],
        }


def _add(table: dict[Any, int], key: Any, count: int) -> int:
    """Add `count` under `key`; returns what could not be listed (the table is full)."""
    if key in table:
        table[key] += count
        return 0
    if len(table) >= MAX_KEYS:
        return count
    table[key] = count
    return 0


def _iso(seconds: int | None) -> str:
    if seconds is None:
        return ""
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return ""  # an agent's timestamp out of any real range: not worth an error


class FlowAudit:
    """Turns agents' reports into at most one `flows.reported` event per agent per interval
    (audit_window.py: the first after a quiet interval at once, the rest summed)."""

    def __init__(self, audit: AuditLog, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._audit = audit
        self._window: AuditWindow[_Pending] = AuditWindow(interval, _Pending, self._write, clock)

    async def add(self, agent: str, counters: Sequence[FlowCounter], refusals: Sequence[RefusalCounter]) -> None:
        """Take one report; audit it at once when the agent's last event is an interval old."""
        pending = self._window.pending(agent)
        for c in counters:
            pending.add_flow(c)
        for r in refusals:
            pending.add_refusal(r)
        if not pending.worth_auditing:
            # Only allowed traffic: the metrics have it; keep nothing.
            self._window.discard(agent)
            return
        await self._window.offer(agent)

    async def _write(self, agent: str, pending: _Pending) -> None:
        outcome = "denied" if pending.denied else ("would-deny" if pending.would_deny else "refused")
        await self._audit.record(KIND, actor=agent, subject=agent, outcome=outcome, **pending.details())

    async def flush_due(self) -> None:
        """Write the events whose interval has passed, and forget agents that went quiet."""
        await self._window.flush_due()

    async def run(self, stop: asyncio.Event) -> None:
        """Flush due events until `stop`; then write what is pending, so nothing reported is lost."""
        await self._window.run(stop)
