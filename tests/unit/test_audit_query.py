"""Listing the audit log with filters and pages, and verifying it, over a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.server_runtime import ADMIN, Clock, server_runtime
from trustmesh.controlplane import audit_query
from trustmesh.controlplane.audit_query import AuditQueries, AuditQuery, list_events
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.errors import InvalidArgumentError


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ServerRuntime]:
    clock = Clock(100.0)
    async with server_runtime(tmp_path, clock) as rt:
        # Ten events one second apart: seq 1..10 at times 100..109, kinds a, b, a, b, ...
        for i in range(10):
            clock.now = 100.0 + i
            await rt.audit.record("a" if i % 2 == 0 else "b", actor=ADMIN, subject=str(i))
        yield rt


async def seqs(rt: ServerRuntime, **kw: object) -> tuple[list[int], int]:
    page = await AuditQueries(rt).events(AuditQuery(**kw))  # type: ignore[arg-type]
    return [e.seq for e in page.events], page.next_seq


async def test_everything_oldest_first(runtime: ServerRuntime) -> None:
    assert await seqs(runtime) == (list(range(1, 11)), 0)


async def test_filters(runtime: ServerRuntime) -> None:
    assert await seqs(runtime, kind="b") == ([2, 4, 6, 8, 10], 0)
    assert await seqs(runtime, since_time=105) == ([6, 7, 8, 9, 10], 0)
    assert await seqs(runtime, since_seq=7) == ([8, 9, 10], 0)
    assert await seqs(runtime, kind="a", since_time=103, since_seq=6) == ([7, 9], 0)
    assert await seqs(runtime, kind="nothing") == ([], 0)


async def test_pages(runtime: ServerRuntime) -> None:
    assert await seqs(runtime, limit=4) == ([1, 2, 3, 4], 4)
    assert await seqs(runtime, limit=4, since_seq=4) == ([5, 6, 7, 8], 8)
    assert await seqs(runtime, limit=4, since_seq=8) == ([9, 10], 0)
    # A filtered page reads on until it is full or the log ends.
    assert await seqs(runtime, limit=2, kind="b") == ([2, 4], 4)
    assert await seqs(runtime, limit=2, kind="b", since_seq=4) == ([6, 8], 8)
    assert await seqs(runtime, limit=2, kind="b", since_seq=8) == ([10], 0)


async def test_the_page_size_is_capped(runtime: ServerRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_query, "MAX_AUDIT_PAGE", 3)
    assert await seqs(runtime) == ([1, 2, 3], 3)
    assert await seqs(runtime, limit=1_000_000) == ([1, 2, 3], 3)


async def test_negative_arguments_are_refused(runtime: ServerRuntime) -> None:
    for query in (AuditQuery(limit=-1), AuditQuery(since_seq=-1)):
        with pytest.raises(InvalidArgumentError, match="^limit and since_seq must not be negative$"):
            await list_events(runtime.store, query)


async def test_verify_is_timed(runtime: ServerRuntime) -> None:
    result = await AuditQueries(runtime).verify()
    assert result.ok and result.chain.checked == 10
    assert "trustmesh_audit_verify_seconds_count 1" in runtime.metrics.render()
