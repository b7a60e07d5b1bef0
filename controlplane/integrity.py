"""What the server does when a stored record fails its integrity check, and when it may
seal an existing store for the first time.

The check itself lives in store/sealing.py; this is the reaction: an ERROR line (at most one
a minute per record), the counter ``trustmesh_store_integrity_failures_total{kind}``, and an
audit event ``store.integrity_failure`` (at most one an hour per record, and at most 60 a
minute in all, the rest counted into the next one: a store writer who plants many bad rows,
which every listing reads again, must not flood the log they are reported in).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.audit_anchor import AuditAnchor
from trustmesh.controlplane.replay import ReplayGuard
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store import Store
from trustmesh.controlplane.store.sealing import IntegrityFailure
from trustmesh.logs import RateLimitedLog, log_event
from trustmesh.metrics import Registry

log = logging.getLogger("trustmesh.store")

SEALED_EVENT = "store.sealed"
FAILURE_EVENT = "store.integrity_failure"
ACTOR = "trustmesh:server"
_WINDOW = 60.0
_AUDIT_PER_RECORD = 3600.0
_AUDIT_PER_MINUTE = 60


class IntegrityMonitor:
    """The failure hook the store calls; audit and metrics are attached once they exist."""

    def __init__(self, metrics: Registry, clock: Callable[[], float] = time.monotonic) -> None:
        self._failures = metrics.counter("trustmesh_store_integrity_failures_total",
                                         "stored records that failed their MAC check and were not used", ["kind"])
        self._lines = RateLimitedLog(log, _WINDOW, clock=clock)
        self._audited: dict[tuple[str, str], float] = {}
        self._minute = (0.0, 0)  # (start of the current minute, events audited in it)
        self._suppressed = 0
        self._clock = clock
        self.audit: AuditLog | None = None

    async def __call__(self, failure: IntegrityFailure) -> None:
        self._failures.inc(kind=failure.kind)
        self._lines.log((failure.kind, failure.key), "store.integrity_failure", logging.ERROR,
                        record_kind=failure.kind, record_key=failure.key[:200], reason=failure.reason)
        now = self._clock()
        mark = (failure.kind, failure.key)
        if self.audit is None or now - self._audited.get(mark, float("-inf")) < _AUDIT_PER_RECORD:
            return
        started, count = self._minute
        if now - started >= _WINDOW:
            started, count = now, 0
        if count >= _AUDIT_PER_MINUTE:
            self._suppressed += 1
            return
        self._minute = (started, count + 1)
        if len(self._audited) > 4096:
            self._audited = {k: t for k, t in self._audited.items() if now - t < _AUDIT_PER_RECORD}
        self._audited[mark] = now
        suppressed, self._suppressed = self._suppressed, 0
        await self.audit.record(FAILURE_EVENT, actor=ACTOR, subject=failure.key[:200], outcome="denied",
                                record_kind=failure.kind, reason=failure.reason,
                                **({"others_not_audited": suppressed} if suppressed else {}))


async def was_sealed_before(store: Store) -> bool:
    """Does the audit chain say this store's records were sealed already?

    Asked only when the seal marker is missing: either the store predates record MACs (seal
    it now) or someone deleted the marker to have rows written without the KEK sealed on
    the next start. The chain cannot be forged without the KEK, so it tells the two apart.
    """
    since = 0
    while True:
        page = await store.list_audit_events(since_seq=since, limit=1000)
        if not page:
            return False
        if any(e.kind == SEALED_EVENT for e in page):
            return True
        since = page[-1].seq


async def protect(rt: ServerRuntime, derive: Callable[[str], bytes]) -> AuditAnchor:
    """Seal the store's records (upgrading a store that predates MACs) and anchor the audit
    chain; call before anything else reads the registry. Returns the anchor to run."""
    cfg = rt.config
    anchor = AuditAnchor(cfg.audit_anchor_target, derive("audit-anchor"), every_events=cfg.audit_anchor_every,
                         interval=cfg.audit_anchor_interval.total_seconds())
    anchor.probe()  # before anything is written: a start that fails leaves the store as it was
    # Checked before this start appends anything: an append onto a cut chain would hide the cut.
    check = await anchor.check(rt.store)
    if not check.ok:
        anchor.broken = check.reason
        rt.metrics.counter("trustmesh_audit_anchor_failures_total",
                           "times the audit chain did not hold its checkpoint outside the store").inc()
        log_event(log, "audit.anchor_mismatch", logging.ERROR, reason=check.reason)
        await rt.audit.record("audit.anchor_mismatch", actor=ACTOR, subject="audit", outcome="denied",
                              reason=check.reason, anchor=anchor.target)
    rt.audit.anchor = anchor
    monitor = IntegrityMonitor(rt.metrics)
    monitor.audit = rt.audit

    async def may_upgrade() -> bool:
        return not await was_sealed_before(rt.store)

    async def sealed(records: int) -> None:
        log_event(log, "store.sealed", records=records)
        await rt.audit.record(SEALED_EVENT, actor=ACTOR, subject="store", records=records)

    await rt.store.seal_records(derive, monitor, may_upgrade=may_upgrade, on_sealed=sealed)
    guard = ReplayGuard(monitor)
    await guard.load(lambda since, limit: rt.store.list_audit_events(since_seq=since, limit=limit))
    rt.store.replay = guard
    return anchor
