"""Failed attestations in the audit log: anonymous callers must not choose how much we write.

Anyone who reaches the attestation listener can attempt attestation, with no credentials at
all; unaggregated, 3,000 bad attempts wrote 3,000 audit events (issue 14, hole 8). So, per
source address:

- a token bucket refuses attempts that come too often, before any work, with
  RESOURCE_EXHAUSTED (counted, and summed into the source's next event);
- the failures that reach the checks become at most one `node.attest` event per source per
  interval (audit_window.py): the first after a quiet interval at once, with its reason,
  the rest summed into one event at the end of the interval: how many, by method, outcome,
  subject and reason (the largest first, clipped), and when. Every event names the source.

The metrics count every attempt exactly; only the audit log is aggregated. Memory is bounded:
MAX_SOURCES sources with pending failures (more are summed under OTHER_SOURCES), MAX_REASONS
distinct reasons per source, and the bucket table's own bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trustmesh.clip import CLAIMED, REASON, clip
from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.audit_window import AuditWindow
from trustmesh.errors import ResourceExhaustedError
from trustmesh.metrics import Registry
from trustmesh.ratelimit import KeyedTokenBuckets

KIND = "node.attest"
MAX_SOURCES = 10_000
OTHER_SOURCES = "other sources"  # the key of failures past MAX_SOURCES
MAX_REASONS = 100  # distinct (method, outcome, subject, reason) kept per source between events
TOP = 20  # listed in one event, largest counts first


@dataclass
class _Failures:
    """What one source did since its last event."""

    count: int = 0  # failed attempts that reached the checks
    rate_limited: int = 0  # attempts refused before them
    denied: int = 0
    unlisted: int = 0
    reasons: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    first_seen: float | None = None
    last_seen: float | None = None

    @property
    def worth_auditing(self) -> bool:
        return bool(self.count or self.rate_limited)

    def seen(self, at: float) -> None:
        self.first_seen = at if self.first_seen is None else min(self.first_seen, at)
        self.last_seen = at if self.last_seen is None else max(self.last_seen, at)

    def add(self, method: str, outcome: str, subject: str, reason: str, at: float) -> None:
        self.count += 1
        self.denied += outcome == "denied"
        self.seen(at)
        self._add((clip(method, CLAIMED), outcome, clip(subject, CLAIMED), clip(reason, REASON)), 1)

    def _add(self, key: tuple[str, str, str, str], n: int) -> None:
        if key in self.reasons:
            self.reasons[key] += n
        elif len(self.reasons) < MAX_REASONS:
            self.reasons[key] = n
        else:
            self.unlisted += n

    def merge(self, other: _Failures) -> None:
        self.count += other.count
        self.rate_limited += other.rate_limited
        self.denied += other.denied
        self.unlisted += other.unlisted
        for key, n in other.reasons.items():
            self._add(key, n)
        for at in (other.first_seen, other.last_seen):
            if at is not None:
                self.seen(at)

    def event(self, source: str) -> tuple[str, str, str, dict[str, Any]]:
        """(actor, subject, outcome, details) of this summary's audit event."""
        ranked = sorted(self.reasons.items(), key=lambda kv: -kv[1])
        subjects = {subject for (_, _, subject, _) in self.reasons}
        subject = next(iter(subjects)) if len(subjects) == 1 else ""
        details: dict[str, Any] = {
            "source": source, "count": self.count, "rate_limited": self.rate_limited,
            "first_seen": _iso(self.first_seen), "last_seen": _iso(self.last_seen),
        }
        if len(ranked) == 1 and not self.unlisted:  # one kind of failure (the leading event): as before
            (method, _, _, reason), _ = ranked[0]
            details.update(method=method, reason=reason)
        else:
            details["reasons"] = [{"method": m, "outcome": o, "subject": s, "reason": r, "count": n}
                                  for (m, o, s, r), n in ranked[:TOP]]
            details["unlisted"] = self.unlisted + sum(n for _, n in ranked[TOP:])
        outcome = "denied" if self.denied else ("invalid" if self.count else "rate-limited")
        return f"node:{subject}" if subject else "anonymous", subject, outcome, details


def _iso(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class AttestationFailures:
    """The rate limit and the aggregated audit of failed attestations, per source address."""

    def __init__(self, audit: AuditLog, metrics: Registry, interval: float, *, per_minute: int = 60,
                 burst: int = 20, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """A node attests once, and again only after an eviction or with x509pop; a fleet behind
        one NAT address starting at once gets `burst`, then `per_minute` (0: no limit)."""
        self._audit = audit
        self._clock = clock
        self._window: AuditWindow[_Failures] = AuditWindow(interval, _Failures, self._write, monotonic)
        self._buckets = (KeyedTokenBuckets(per_minute / 60, max(1, burst), MAX_SOURCES, monotonic)
                         if per_minute else None)
        self._limited = metrics.counter("trustmesh_attestations_rate_limited_total",
                                        "attestation attempts refused because their source sent too many")

    def _key(self, source: str) -> str:
        # Past MAX_SOURCES pending sources (an attacker with many addresses), one summary for the rest.
        if len(self._window) >= MAX_SOURCES and not self._window.has(source):
            return OTHER_SOURCES
        return source

    async def admit(self, source: str) -> None:
        """Refuse (RESOURCE_EXHAUSTED) an attempt from a source that attempts too often."""
        if self._buckets is None or self._buckets.allow(source):
            return
        self._limited.inc()
        key = self._key(source)
        summary = self._window.pending(key)
        summary.rate_limited += 1
        summary.seen(self._clock())
        wait = self._buckets.retry_after(source)
        await self._window.offer(key)
        raise ResourceExhaustedError(f"too many attestation attempts from {source or 'this address'}; "
                                     f"retry in {max(1, round(wait))}s")

    async def failed(self, source: str, method: str, outcome: str, subject: str, reason: str) -> None:
        """One attempt that failed a check: audited at once or summed (see the module doc)."""
        key = self._key(source)
        self._window.pending(key).add(method, outcome, subject, reason, self._clock())
        await self._window.offer(key)

    async def _write(self, source: str, failures: _Failures) -> None:
        actor, subject, outcome, details = failures.event(source or "unknown")
        await self._audit.record(KIND, actor=actor, subject=subject, outcome=outcome, **details)

    async def run(self, stop: asyncio.Event) -> None:
        await self._window.run(stop)
