"""The append-only, hash-chained audit log.

Each event carries the link of the one before it (`prev_hash`) and its own link (`hash`),
an HMAC-SHA256 over the event's canonical JSON and the previous link, keyed by a key
derived from the key-encryption key. So:

- editing, removing or reordering any event breaks the chain at that event, and
- someone who can write to the store but does not hold the KEK cannot re-forge the chain
  after an edit (a plain hash chain could simply be recomputed).

Appends are compare-and-swap on the store's chain head, so several server replicas
extend ONE chain: a replica that loses the race re-reads the head and links again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from trustmesh.controlplane.audit_anchor import AuditAnchor
from trustmesh.controlplane.call_source import call_role, call_source
from trustmesh.controlplane.store.records import AuditEvent, RecordFormatError
from trustmesh.errors import ConflictError
from trustmesh.logs import log_event

log = logging.getLogger("trustmesh.audit")

GENESIS = "0" * 64
_MAX_RETRIES = 50
_PAGE = 1000


class AuditStore(Protocol):
    async def append_audit_event(self, event: AuditEvent) -> AuditEvent: ...
    async def get_audit_head(self) -> AuditEvent | None: ...
    async def list_audit_events(self, since_seq: int = 0, limit: int | None = None) -> list[AuditEvent]: ...


def _canonical(seq: int, at: float, kind: str, actor: str, subject: str, outcome: str,
               details: dict[str, Any], prev_hash: str) -> bytes:
    # float(): the store hands time back as a float, so an int clock must link the same way.
    body = {"seq": seq, "time": float(at), "kind": kind, "actor": actor, "subject": subject,
            "outcome": outcome, "details": details, "prev_hash": prev_hash}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def link(key: bytes, seq: int, at: float, kind: str, actor: str, subject: str, outcome: str,
         details: dict[str, Any], prev_hash: str) -> str:
    """The chain link of one event (pure)."""
    return hmac.new(key, _canonical(seq, at, kind, actor, subject, outcome, details, prev_hash),
                    hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_broken_seq: int = 0
    reason: str = ""


def verify_events(key: bytes, events: list[AuditEvent], *, prev_hash: str = GENESIS,
                  expect_seq: int = 1) -> VerifyResult:
    """Check a run of events starting at `expect_seq` whose predecessor's link is `prev_hash`."""
    checked = 0
    for ev in events:
        if ev.seq != expect_seq:
            what = "removed or moved" if ev.seq > expect_seq else "duplicated or reordered"
            return VerifyResult(False, checked, expect_seq,
                                f"event {expect_seq} is missing: found event {ev.seq} where {expect_seq} "
                                f"should be (an event was {what})")
        if ev.prev_hash != prev_hash:
            return VerifyResult(False, checked, ev.seq,
                                f"event {ev.seq} does not link to event {ev.seq - 1} (reordered or replaced)")
        want = link(key, ev.seq, ev.time, ev.kind, ev.actor, ev.subject, ev.outcome, ev.details, ev.prev_hash)
        if not hmac.compare_digest(want, ev.hash):
            return VerifyResult(
                False, checked, ev.seq, f"event {ev.seq} was edited: its content does not match its link"
            )
        prev_hash, expect_seq = ev.hash, ev.seq + 1
        checked += 1
    return VerifyResult(True, checked)


class AuditLog:
    """Records events and verifies the chain. One instance per server process."""

    def __init__(self, store: AuditStore, key: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 32:
            raise ValueError("the audit key must be at least 32 bytes")
        self._store = store
        self._key = key
        self._clock = clock
        self._lock = asyncio.Lock()
        self._head: AuditEvent | None = None
        self._head_loaded = False
        # Checkpoints of the head outside the store (audit_anchor.py); the server sets it.
        self.anchor: AuditAnchor | None = None

    async def record(
        self, kind: str, *, actor: str, subject: str = "", outcome: str = "ok", **details: Any
    ) -> AuditEvent:
        """Append one event. Retries on a lost race with another replica; never half-writes."""
        async with self._lock:
            for _ in range(_MAX_RETRIES):
                if not self._head_loaded:
                    self._head = await self._store.get_audit_head()
                    self._head_loaded = True
                prev = self._head
                seq = 1 if prev is None else prev.seq + 1
                prev_hash = GENESIS if prev is None else prev.hash
                at = round(float(self._clock()), 6)
                if "source" not in details and call_source.get():
                    details["source"] = call_source.get()
                if "role" not in details and call_role.get():
                    details["role"] = call_role.get()
                clean = json.loads(json.dumps(details, sort_keys=True, default=str))
                event = AuditEvent(
                    seq=seq,
                    time=at,
                    kind=kind,
                    actor=actor,
                    subject=subject,
                    outcome=outcome,
                    details=clean,
                    prev_hash=prev_hash,
                    hash=link(self._key, seq, at, kind, actor, subject, outcome, clean, prev_hash),
                )
                try:
                    self._head = await self._store.append_audit_event(event)
                except ConflictError:
                    self._head_loaded = False  # another replica appended: re-read the head
                    continue
                log_event(log, "audit", kind=kind, actor=actor, subject=subject, outcome=outcome, seq=seq)
                if self.anchor is not None:
                    self.anchor.note(event)
                return self._head
            raise ConflictError(
                f"could not append audit event {kind!r} after {_MAX_RETRIES} tries; the audit head is changing too fast"
            )

    async def verify(self) -> VerifyResult:
        """Walk the whole chain page by page and check that the head is its last event."""
        prev_hash, expect, total = GENESIS, 1, 0
        last: AuditEvent | None = None
        page_size = _PAGE
        while True:
            try:
                page = await self._store.list_audit_events(since_seq=expect - 1, limit=page_size)
            except RecordFormatError as err:
                if page_size > 1:
                    page_size = 1  # walk one event at a time up to the unreadable one
                    continue
                # Overwritten with something that is not an event at all: tampering too.
                return VerifyResult(False, total, expect, f"event {expect} is unreadable ({err}); it was overwritten")
            if not page:
                break
            result = verify_events(self._key, page, prev_hash=prev_hash, expect_seq=expect)
            total += result.checked
            if not result.ok:
                return VerifyResult(False, total, result.first_broken_seq, result.reason)
            last = page[-1]
            prev_hash, expect = last.hash, last.seq + 1
        try:
            head = await self._store.get_audit_head()
        except RecordFormatError as err:
            return VerifyResult(
                False, total, (last.seq + 1) if last else 1, f"the chain head is unreadable ({err}); it was overwritten"
            )
        if head is None and last is None:
            return VerifyResult(True, 0)
        if head is None or last is None or head.seq != last.seq or head.hash != last.hash:
            head_seq = head.seq if head else 0
            return VerifyResult(
                False,
                total,
                (last.seq + 1) if last else 1,
                f"the chain head names event {head_seq} but the log ends at event "
                f"{last.seq if last else 0} (events were removed from the end)",
            )
        return VerifyResult(True, total)
