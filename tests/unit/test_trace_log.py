"""The per-minute flow trace on a replica's disk (controlplane/trace_log.py): minutes, sums,
what a flush writes and when, day files, retention, reading a window back, a damaged file,
a failing disk, and the bounds."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import stat
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest

from trustmesh.controlplane import trace_log as module
from trustmesh.controlplane.trace_log import GRACE_SECONDS, TraceLog, minute_end
from trustmesh.detect.trace import TraceRecord, read_trace, record_to_line
from trustmesh.errors import InvalidArgumentError
from trustmesh.flows import Flow, read_jsonl
from trustmesh.metrics import Registry

TD = "spiffe://example.org"
WEB, LEDGER = f"{TD}/web", f"{TD}/ledger"
DAY0 = datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp()  # a UTC midnight
T0 = DAY0 + 10 * 3600  # 2026-11-01T10:00:00Z
RETENTION = 2 * 86_400.0


def rec(ts: float, source: str = WEB, *, node: str = "node-1", port: int = 8443, decision: str = "allow",
        conns: int = 1, bytes_in: int = 10, bytes_out: int = 100) -> TraceRecord:
    return TraceRecord(ts, node, source, LEDGER, port, decision, conns, bytes_in, bytes_out)


def make(tmp_path: Path, clock: Callable[[], float] = lambda: T0) -> tuple[TraceLog, Registry]:
    metrics = Registry()
    return TraceLog(tmp_path / "trace", RETENTION, metrics, clock), metrics


def dropped(metrics: Registry, reason: str) -> float:
    return metrics.counter("trustmesh_trace_records_dropped_total", "", ["reason"]).value(reason=reason)


def stored(trace: TraceLog, day: str = "2026-11-01") -> list[TraceRecord]:
    path = trace.directory / f"{day}.jsonl"
    with path.open("rb") as lines:
        return list(read_trace(lines, str(path)))


def test_a_record_belongs_to_the_minute_its_time_rounds_up_to() -> None:
    assert minute_end(T0) == T0  # exactly on a minute: the window that ends there
    assert minute_end(T0 + 0.001) == T0 + 60
    assert minute_end(T0 + 59.9) == T0 + 60
    assert minute_end(T0 + 60) == T0 + 60
    assert minute_end(T0 - 1) == T0


async def test_records_are_summed_per_minute_and_key_and_a_flush_writes_closed_minutes_only(tmp_path: Path) -> None:
    trace, metrics = make(tmp_path)
    trace.add([rec(T0 + 1), rec(T0 + 30, conns=2, bytes_in=5, bytes_out=7), rec(T0 + 60)])  # one minute, summed
    trace.add([rec(T0 + 20, node="node-2"), rec(T0 + 20, port=9090), rec(T0 + 20, decision="deny"),
               rec(T0 + 61)])  # three more keys of the first minute; one record of the next
    await trace.flush(T0 + 60 + GRACE_SECONDS - 0.1)  # the first minute has not closed yet
    assert not trace.directory.exists()
    await trace.flush(T0 + 60 + GRACE_SECONDS)
    first = stored(trace)
    assert [r.ts for r in first] == [T0 + 60] * 4
    summed = next(r for r in first if (r.node, r.port, r.decision) == ("node-1", 8443, "allow"))
    assert (summed.connections, summed.bytes_in, summed.bytes_out) == (4, 25, 207)
    assert {(r.node, r.port, r.decision, r.connections) for r in first} == {
        ("node-1", 8443, "allow", 4), ("node-2", 8443, "allow", 1), ("node-1", 9090, "allow", 1),
        ("node-1", 8443, "deny", 1)}
    await trace.flush(T0 + 100)  # nothing closed since: nothing written twice
    assert len(stored(trace)) == 4
    await trace.flush(T0 + 130)
    assert [r.ts for r in stored(trace)] == [T0 + 60] * 4 + [T0 + 120]  # appended, in time order
    assert metrics.counter("trustmesh_trace_lines_written_total", "").value() == 5
    assert stat.S_IMODE(os.stat(trace.directory / "2026-11-01.jsonl").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(trace.directory).st_mode) == 0o700


async def test_a_late_record_of_a_written_minute_is_dropped_and_counted(tmp_path: Path) -> None:
    trace, metrics = make(tmp_path)
    trace.add([rec(T0 + 30)])
    await trace.flush(T0 + 70)
    trace.add([rec(T0 + 45), rec(T0 + 90)])  # the first minute is written: files stay in time order
    await trace.flush(T0 + 130)
    assert [(r.ts, r.connections) for r in stored(trace)] == [(T0 + 60, 1), (T0 + 120, 1)]
    assert dropped(metrics, "late") == 1


async def test_each_minute_goes_to_the_file_of_its_utc_day(tmp_path: Path) -> None:
    trace, _ = make(tmp_path)
    midnight = DAY0 + 86_400
    trace.add([rec(midnight - 90), rec(midnight - 30), rec(midnight + 30)])
    await trace.flush(midnight + 120)
    assert [r.ts for r in stored(trace, "2026-11-01")] == [midnight - 60]
    # 23:59:30 ends its minute at midnight: the next day's file, as its ts says.
    assert [r.ts for r in stored(trace, "2026-11-02")] == [midnight, midnight + 60]
    assert (trace.directory / "2026-11-02.jsonl").read_text().startswith('{"ts": "2026-11-02T00:00:00Z"')


async def test_day_files_past_the_retention_are_deleted_whole(tmp_path: Path) -> None:
    trace, _ = make(tmp_path)
    for day in range(5):
        trace.add([rec(DAY0 + day * 86_400 + 3600)])
    await trace.flush(DAY0 + 5 * 86_400)
    (trace.directory / "notes.txt").write_text("not ours")
    names = sorted(p.name for p in trace.directory.iterdir())
    assert names == [f"2026-11-0{d}.jsonl" for d in range(1, 6)] + ["notes.txt"]
    # Now 2026-11-05T12:00Z, two days kept: the 1st and 2nd ended more than 48 h ago.
    assert trace.prune(DAY0 + 4.5 * 86_400) == 2
    assert sorted(p.name for p in trace.directory.iterdir()) == [
        "2026-11-03.jsonl", "2026-11-04.jsonl", "2026-11-05.jsonl", "notes.txt"]
    assert trace.prune(DAY0 + 4.5 * 86_400) == 0


async def test_iter_lines_returns_the_window_in_time_order(tmp_path: Path) -> None:
    trace, _ = make(tmp_path)
    times = [T0 + 30, T0 + 90, T0 + 150, T0 + 86_400 + 30]
    trace.add([rec(ts) for ts in times])
    trace.add([rec(T0 + 170, source=f"{TD}/batch")])
    await trace.flush(T0 + 2 * 86_400)
    every = list(trace.iter_lines(0, math.inf))
    assert [json.loads(line)["ts"] for line in every] == [
        "2026-11-01T10:01:00Z", "2026-11-01T10:02:00Z", "2026-11-01T10:03:00Z", "2026-11-01T10:03:00Z",
        "2026-11-02T10:01:00Z"]
    assert all(line.endswith("\n") for line in every)
    window = list(trace.iter_lines(T0 + 120, T0 + 180))  # since <= ts < until
    assert [json.loads(line)["ts"] for line in window] == ["2026-11-01T10:02:00Z"]
    assert list(trace.iter_lines(T0 + 86_400, math.inf)) == every[-1:]
    assert list(trace.iter_lines(T0 + 3 * 86_400, math.inf)) == []
    assert list(make(tmp_path / "empty")[0].iter_lines(0, math.inf)) == []  # no directory yet


async def test_a_corrupt_line_is_skipped_with_a_warning_and_a_torn_one_is_ended(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trace, _ = make(tmp_path)
    trace.add([rec(T0 + 30)])
    await trace.flush(T0 + 70)
    path = trace.directory / "2026-11-01.jsonl"
    with path.open("a") as f:
        f.write('{"ts": "garbage"}\n[[[[\n' + "[" * 100_000 + "\n")
        f.write('{"ts": "2026-11-01T10:02:00Z", "no')  # a crash mid-line: no newline
    caplog.set_level(logging.WARNING, logger="trustmesh.trace")
    assert len(list(trace.iter_lines(0, math.inf))) == 1  # the torn line is not read (it may be in writing)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["trace_line_skipped", "trace_lines_skipped"]  # one line per file, then a count
    fields = [getattr(r, "fields", {}) for r in caplog.records]
    assert fields[0]["line"] == 2 and fields[1]["lines"] == 3
    # The next append ends the torn line first, so what follows it stays readable.
    trace.add([rec(T0 + 90)])
    await trace.flush(T0 + 130)
    assert [json.loads(line)["ts"] for line in trace.iter_lines(0, math.inf)] == [
        "2026-11-01T10:01:00Z", "2026-11-01T10:02:00Z"]


def _failing_disk(monkeypatch: pytest.MonkeyPatch, written: int = 10) -> list[int]:
    """os.write on a trace file writes `written` bytes, then fails with ENOSPC (a full disk);
    every other file is written as usual. Returns the list of failures, to count them."""
    real = os.write
    failures: list[int] = []

    def write(fd: int, data: bytes | memoryview) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
            return real(fd, data)
        if len(data) > written:
            real(fd, bytes(data[:written]))
        failures.append(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    return failures


async def test_a_failed_write_leaves_no_half_line_and_keeps_the_sums(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace, metrics = make(tmp_path)
    trace.add([rec(T0 + 30)])
    await trace.flush(T0 + 70)
    before = (trace.directory / "2026-11-01.jsonl").read_bytes()
    trace.add([rec(T0 + 90, conns=2), rec(T0 + 100, conns=3)])
    with monkeypatch.context() as patch:
        failures = _failing_disk(patch)
        await trace.flush(T0 + 130)
        assert failures
    assert (trace.directory / "2026-11-01.jsonl").read_bytes() == before  # cut back: no half line
    assert metrics.counter("trustmesh_trace_write_failures_total", "").value() == 1
    trace.add([rec(T0 + 150)])  # the next minute still comes in meanwhile
    await trace.flush(T0 + 190)  # the disk works again: both minutes, in order, sums intact
    assert [(r.ts, r.connections) for r in stored(trace)] == [(T0 + 60, 1), (T0 + 120, 5), (T0 + 180, 1)]
    assert dropped(metrics, "write_failed") == 0


async def test_a_disk_that_stays_broken_costs_the_oldest_minutes_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "MAX_BACKLOG_MINUTES", 3)
    trace, metrics = make(tmp_path)
    with monkeypatch.context() as patch:
        _failing_disk(patch, written=0)
        for minute in range(6):
            trace.add([rec(T0 + minute * 60 + 30, conns=minute + 1), rec(T0 + minute * 60 + 31, source=f"{TD}/b")])
            await trace.flush(T0 + minute * 60 + 70)
    assert dropped(metrics, "write_failed") == 6  # three minutes of two records
    await trace.flush(T0 + 1000)
    assert [r.connections for r in stored(trace) if r.source == WEB] == [4, 5, 6]  # the newest three


async def test_memory_is_bounded_per_minute_and_in_minutes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "MAX_KEYS_PER_MINUTE", 3)
    monkeypatch.setattr(module, "MAX_MINUTES", 2)
    trace, metrics = make(tmp_path)
    trace.add([rec(T0 + 30, port=p) for p in range(1, 6)])  # five keys, room for three
    trace.add([rec(T0 + 30, port=1, conns=4)])  # a known key still sums
    trace.add([rec(T0 + 90), rec(T0 + 150), rec(float("nan")), rec(0.0)])  # a third minute: no room
    assert dropped(metrics, "too_many_keys") == 2
    assert dropped(metrics, "too_many_minutes") == 1
    assert dropped(metrics, "malformed") == 2
    await trace.flush(T0 + 1000)
    assert [(r.ts, r.port, r.connections) for r in stored(trace)] == [
        (T0 + 60, 1, 5), (T0 + 60, 2, 1), (T0 + 60, 3, 1), (T0 + 120, 8443, 1)]


async def test_export_sends_whole_lines_in_bounded_chunks(tmp_path: Path) -> None:
    trace, _ = make(tmp_path)
    trace.add([rec(T0 + 30 + i, port=i + 1) for i in range(25)])
    await trace.flush(T0 + 100)
    every = "".join(trace.iter_lines(0, math.inf)).encode()
    line = len(record_to_line(rec(T0 + 60, port=10)).encode())
    chunks = [c async for c in trace.export(0, math.inf, 3 * line + 5)]
    assert b"".join(chunks) == every and len(chunks) == 9
    assert all(c.endswith(b"\n") and len(c) <= 3 * line + 5 for c in chunks)
    assert [c async for c in trace.export(0, math.inf, 1)] == every.splitlines(keepends=True)  # one line each
    assert [c async for c in trace.export(T0 + 3600, math.inf, 1000)] == []
    with pytest.raises(InvalidArgumentError, match="window is empty"):
        [c async for c in trace.export(T0 + 60, T0, 1000)]


async def test_run_flushes_on_its_interval_and_everything_at_stop(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "FLUSH_SECONDS", 0.01)
    now = [T0 + 120.0]
    trace, _ = make(tmp_path, lambda: now[0])
    (tmp_path / "trace").mkdir(mode=0o700)
    (tmp_path / "trace" / "2026-10-01.jsonl").write_text("")  # a month old: pruned at the first round
    trace.add([rec(T0 + 30), rec(T0 + 110)])  # a closed minute, and the open one
    stop = asyncio.Event()
    task = asyncio.create_task(trace.run(stop))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if (tmp_path / "trace" / "2026-11-01.jsonl").exists():
            break
    assert [r.ts for r in stored(trace)] == [T0 + 60]
    assert not (tmp_path / "trace" / "2026-10-01.jsonl").exists()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [r.ts for r in stored(trace)] == [T0 + 60, T0 + 120]  # the open minute too, at stop


async def test_policy_simulate_reads_a_trace_export_as_flows(tmp_path: Path) -> None:
    trace, _ = make(tmp_path)
    trace.add([rec(T0 + 30, conns=2), rec(T0 + 30, node="node-2", conns=1),  # two nodes: one edge
               rec(T0 + 90, conns=3, bytes_in=1, bytes_out=2),
               rec(T0 + 90, "unverified:10.0.0.7", node="", decision="unverified")])
    await trace.flush(T0 + 200)
    export = tmp_path / "trace.jsonl"
    export.write_text("".join(trace.iter_lines(0, math.inf)))
    assert read_jsonl(export) == [
        Flow(WEB, LEDGER, 8443, "allow", "", 6, 21, 202, T0, T0 + 120),
        Flow("", LEDGER, 8443, "unverified", "", 1, 10, 100, T0 + 60, T0 + 120, "10.0.0.7")]


async def test_an_export_left_mid_stream_closes_cleanly(tmp_path: Path) -> None:
    trace, _ = make(tmp_path)
    trace.add([rec(T0 + 30, port=p) for p in range(1, 11)])
    await trace.flush(T0 + 100)
    stream = trace.export(0, math.inf, 1)
    first = await anext(stream)
    await stream.aclose()  # the client went away: the day file is closed, nothing raised
    assert first == next(trace.iter_lines(0, math.inf)).encode()
