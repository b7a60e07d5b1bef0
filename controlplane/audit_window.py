"""At most one audit event per key (an agent, a source address) per interval: what others can
make us record, aggregated, so they cannot choose how many events the log gets.

Leading edge: the first thing recorded for a key after a quiet interval is written at once
(a denial shows within seconds); what comes later in the interval is summed into a pending
summary and written when the interval since the key's last event has passed. Used by the
agents' flow reports (flow_audit.py) and the anonymous attestation failures
(attestation.py); each says what a summary holds and how it becomes an event.

Memory is bounded by the caller's summaries and by the keys with something pending or an
event in the current interval; keys that went quiet are forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, Self, TypeVar

from trustmesh.logs import log_event

log = logging.getLogger("trustmesh.audit_window")


class Summary(Protocol):
    @property
    def worth_auditing(self) -> bool:
        """False when nothing in it needs an event (e.g. only allowed traffic)."""
        ...

    def merge(self, other: Self) -> None:
        """Add what `other` holds (recorded while this one was being written, and failed)."""
        ...


S = TypeVar("S", bound=Summary)


class AuditWindow(Generic[S]):
    """Summaries per key; `write(key, summary)` records one event for it."""

    def __init__(self, interval: float, new: Callable[[], S], write: Callable[[str, S], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._new = new
        self._write = write
        self._clock = clock
        self._pending: dict[str, S] = {}
        self._last_event: dict[str, float] = {}  # key -> when its last event was written
        self._lock = asyncio.Lock()

    def pending(self, key: str) -> S:
        """The summary being gathered for `key` (a new one when there is none)."""
        summary = self._pending.get(key)
        if summary is None:
            summary = self._pending[key] = self._new()
        return summary

    def has(self, key: str) -> bool:
        """True when something is pending for `key`."""
        return key in self._pending

    def __len__(self) -> int:
        """How many keys have something pending."""
        return len(self._pending)

    def discard(self, key: str) -> None:
        """Drop what is pending for `key` (nothing in it is worth an event)."""
        self._pending.pop(key, None)

    async def offer(self, key: str) -> None:
        """Write `key`'s summary now if its last event is an interval old (or it has none)."""
        if self._due(key):
            await self._emit(key)

    def _due(self, key: str) -> bool:
        last = self._last_event.get(key)
        return last is None or self._clock() - last >= self._interval

    async def _emit(self, key: str, *, force: bool = False) -> None:
        async with self._lock:  # one writer at a time: nothing is audited twice
            if not force and not self._due(key):
                return  # another caller wrote this key's event while we waited for the lock
            summary = self._pending.pop(key, None)
            if summary is None or not summary.worth_auditing:
                return
            try:
                await self._write(key, summary)
            except Exception as err:  # noqa: BLE001 - the store may be down: keep it for the next tick
                later = self._pending.get(key)
                if later is not None:
                    summary.merge(later)
                self._pending[key] = summary
                log_event(log, "audit_window_write_failed", level=logging.WARNING, key=key, error=str(err))
                return
            self._last_event[key] = self._clock()

    async def flush_due(self) -> None:
        """Write the summaries whose interval has passed, and forget keys that went quiet."""
        for key in [k for k in self._pending if self._due(k)]:
            await self._emit(key)
        now = self._clock()
        for key in [k for k, t in self._last_event.items() if now - t >= self._interval and k not in self._pending]:
            del self._last_event[key]

    async def run(self, stop: asyncio.Event) -> None:
        """Flush due summaries until `stop`; then write what is pending, so nothing is lost."""
        tick = max(0.1, min(self._interval / 4, 5.0))
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=tick)
            except TimeoutError:
                pass
            await self.flush_due()
        for key in list(self._pending):
            await self._emit(key, force=True)
