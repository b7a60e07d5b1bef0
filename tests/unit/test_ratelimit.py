"""Per-key token buckets (trustmesh/ratelimit.py) and the shared audit window's leading edge
under concurrent callers (controlplane/audit_window.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from trustmesh.controlplane.audit_window import AuditWindow
from trustmesh.ratelimit import KeyedTokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate_per_key() -> None:
    clock = Clock()
    buckets = KeyedTokenBuckets(rate=0.5, burst=3, max_keys=2, clock=clock)
    assert [buckets.allow("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.retry_after("a") == 2.0
    assert buckets.allow("b"), "each key has its own bucket"
    clock.now += 2
    assert buckets.allow("a") and not buckets.allow("a")
    buckets.allow("c")  # a third key: the least recently used ("b") is dropped
    assert len(buckets._buckets) == 2 and "b" not in buckets._buckets  # noqa: SLF001 - the bound is the point


@dataclass
class Count:
    n: int = 0

    @property
    def worth_auditing(self) -> bool:
        return self.n > 0

    def merge(self, other: Count) -> None:
        self.n += other.n


async def test_concurrent_first_failures_give_one_leading_event() -> None:
    written: list[tuple[str, int]] = []

    async def write(key: str, summary: Count) -> None:
        await asyncio.sleep(0.01)  # a store write: others arrive meanwhile
        written.append((key, summary.n))

    window: AuditWindow[Count] = AuditWindow(60, Count, write, Clock())

    async def failure() -> None:
        window.pending("10.0.0.5").n += 1
        await window.offer("10.0.0.5")

    await asyncio.gather(*(failure() for _ in range(10)))
    assert written == [("10.0.0.5", 1)]
    stop = asyncio.Event()
    stop.set()
    await window.run(stop)  # a stopping server writes what is pending
    assert written == [("10.0.0.5", 1), ("10.0.0.5", 9)]
