"""The per-minute flow trace of this replica: what `trustmesh flows export --format jsonl` writes
and `trustmesh detect replay` reads (the format: trustmesh/detect/trace.py).

The detection service hands every agent report over as trace records (`add`). They are summed
in memory per (minute, node, source, destination, port, decision), the minute being the one
whose end is the record's time rounded up to a whole minute, and every FLUSH_SECONDS the
minutes that have closed (their end GRACE_SECONDS ago) are appended, one line per key, in time
order, to `<data-dir>/trace/YYYY-MM-DD.jsonl`, the file of the minute end's UTC day (mode 0600).
Day files older than `--flow-retention` are deleted whole, once an hour.

The trace is telemetry, like the flow rollups: bounded, and a failure costs trace lines, never
a report. Memory holds at most MAX_KEYS_PER_MINUTE keys per minute; a write that fails keeps
its minutes for the next flush, up to MAX_BACKLOG_MINUTES minutes or MAX_BACKLOG_KEYS keys
(a disk that stays broken costs the oldest ones). Whatever is not kept is counted in
`trustmesh_trace_records_dropped_total{reason}`. Lines are written whole: a failed write is
cut back to where it started, and a line torn by a crash is ended before the next append, so
a reader skips it as one corrupt line.

Each replica records what its own agents reported; an export asks one replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from contextlib import suppress
from datetime import date, datetime, timezone
from pathlib import Path

from trustmesh.detect.trace import MAX_LINE_BYTES, TraceFormatError, TraceRecord, record_from_dict, record_to_line
from trustmesh.errors import InvalidArgumentError, UnavailableError
from trustmesh.logs import log_event
from trustmesh.metrics import Registry

log = logging.getLogger("trustmesh.trace")

MINUTE = 60
DAY = 86_400
SUBDIRECTORY = "trace"  # under the server's data directory
# A minute is written this long after it ended: reports being handled as it closed still land
# in it. Records of a minute already written are dropped ("late"), so files stay in time order.
GRACE_SECONDS = 5.0
FLUSH_SECONDS = 10.0
PRUNE_SECONDS = 3600.0
MAX_KEYS_PER_MINUTE = 50_000  # per replica; the flow rollups keep as many edges per hour
MAX_BACKLOG_MINUTES = 60  # closed minutes kept while writes fail
MAX_BACKLOG_KEYS = 4 * MAX_KEYS_PER_MINUTE  # ... and at most this many keys in them (about 100 MB)
MAX_MINUTES = MAX_BACKLOG_MINUTES + 5  # the backlog and the open minutes (a clock stepped back opens more)
MAX_TS = 253_402_300_740.0  # the last minute end of year 9999, the last a trace line can name

Key = tuple[str, str, str, int, str]  # node, source, destination, port, decision

_DAY_FILE = re.compile(r"(\d{4})-(\d{2})-(\d{2})\.jsonl")


def minute_end(ts: float) -> int:
    """The end of the one-minute window `ts` falls in: `ts` rounded up to a whole minute (a
    time exactly on a minute ends the window before it)."""
    return math.ceil(ts / MINUTE) * MINUTE


def _day_of(ts: float) -> date:
    return datetime.fromtimestamp(ts, timezone.utc).date()


def _day_start(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()


class _Minute:
    """One minute's sums: [connections, bytes in, bytes out] per key, and how many records."""

    __slots__ = ("sums", "records")

    def __init__(self) -> None:
        self.sums: dict[Key, list[int]] = {}
        self.records = 0


class TraceLog:
    def __init__(self, directory: Path, retention: float, metrics: Registry,
                 clock: Callable[[], float] = time.time) -> None:
        """`directory`: where the day files go (`<data-dir>/trace`, created at the first write);
        `retention`: seconds a day file is kept after its day ended (`--flow-retention`)."""
        self.directory = directory
        self._retention = retention
        self._clock = clock
        self._minutes: dict[int, _Minute] = {}  # by minute end (unix seconds)
        # The newest minute end a flush took: later records of it or before are "late".
        self._closed_through = 0
        self._lock = asyncio.Lock()  # one flush at a time (the loop's and the one at stop)
        self._dropped = metrics.counter("trustmesh_trace_records_dropped_total",
                                        "flow trace records not written to the per-minute trace, by reason",
                                        ["reason"])
        self._lines = metrics.counter("trustmesh_trace_lines_written_total", "lines appended to the flow trace")
        self._failures = metrics.counter("trustmesh_trace_write_failures_total",
                                         "flow trace writes that failed (their minutes are kept and retried)")

    # --- recording ---------------------------------------------------------------------------

    def add(self, records: Iterable[TraceRecord]) -> None:
        """Sum `records` into their minutes (in memory; `flush` writes them)."""
        dropped: dict[str, int] = {}
        minutes = self._minutes
        current_end, current = -1, _Minute()
        for r in records:
            ts = r.ts
            if not 0 < ts <= MAX_TS:  # also NaN: no line could carry it
                dropped["malformed"] = dropped.get("malformed", 0) + 1
                continue
            end = minute_end(ts)
            if end != current_end:  # the records of one report share their minute: looked up once
                if end <= self._closed_through:
                    dropped["late"] = dropped.get("late", 0) + 1
                    continue
                found = minutes.get(end)
                if found is None:
                    if len(minutes) >= MAX_MINUTES:
                        dropped["too_many_minutes"] = dropped.get("too_many_minutes", 0) + 1
                        continue
                    found = minutes[end] = _Minute()
                current_end, current = end, found
            key = (r.node, r.source, r.destination, r.port, r.decision)
            sums = current.sums.get(key)
            if sums is None:
                if len(current.sums) >= MAX_KEYS_PER_MINUTE:
                    dropped["too_many_keys"] = dropped.get("too_many_keys", 0) + 1
                    continue
                current.sums[key] = [r.connections, r.bytes_in, r.bytes_out]
            else:
                sums[0] += r.connections
                sums[1] += r.bytes_in
                sums[2] += r.bytes_out
            current.records += 1
        for reason, count in dropped.items():
            self._dropped.inc(count, reason=reason)

    async def flush(self, now: float) -> None:
        """Append every minute that closed by `now` (ended GRACE_SECONDS before it) to the file
        of its day, in time order; `math.inf` writes the open minutes too (at stop). The files
        are written in a worker thread; a day whose write fails keeps its minutes for the next
        flush (bounded: the oldest are dropped past the backlog limits)."""
        async with self._lock:
            cutoff = now - GRACE_SECONDS
            closed = sorted(m for m in self._minutes if m <= cutoff)
            if not closed:
                return
            self._closed_through = max(self._closed_through, closed[-1])
            by_day: dict[date, dict[int, _Minute]] = {}
            for end in closed:
                by_day.setdefault(_day_of(end), {})[end] = self._minutes.pop(end)
            failed = False
            for day, minutes in by_day.items():
                path = self.directory / f"{day.isoformat()}.jsonl"
                try:
                    # add() leaves closed minutes alone, so the thread may read them.
                    lines = await asyncio.to_thread(_append_minutes, path, minutes)
                except OSError as err:
                    failed = True
                    self._minutes.update(minutes)
                    self._failures.inc()
                    log_event(log, "trace_write_failed", level=logging.WARNING, path=str(path),
                              error=err.strerror or str(err), minutes=len(minutes),
                              hint="kept in memory and retried at the next flush")
                    continue
                self._lines.inc(lines)
            if failed:
                self._trim_backlog()

    def _trim_backlog(self) -> None:
        backlog = sorted(m for m in self._minutes if m <= self._closed_through)
        keys = sum(len(self._minutes[m].sums) for m in backlog)
        lost = 0
        while backlog and (len(backlog) > MAX_BACKLOG_MINUTES or keys > MAX_BACKLOG_KEYS):
            minute = self._minutes.pop(backlog.pop(0))
            keys -= len(minute.sums)
            lost += minute.records
        if lost:
            self._dropped.inc(lost, reason="write_failed")
            log_event(log, "trace_backlog_dropped", level=logging.ERROR, records=lost,
                      hint=f"the trace directory {self.directory} has not been writable for a while")

    def prune(self, now: float) -> int:
        """Delete the day files whose day ended more than the retention before `now`; how many."""
        cutoff = now - self._retention
        deleted = 0
        try:
            files = self._day_files()
        except UnavailableError as err:
            log_event(log, "trace_prune_failed", level=logging.WARNING, error=str(err))
            return 0
        for day, path in files:
            if _day_start(day) + DAY > cutoff:
                break  # in day order: the rest are newer
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as err:
                log_event(log, "trace_prune_failed", level=logging.WARNING, path=str(path),
                          error=err.strerror or str(err))
                continue
            deleted += 1
            log_event(log, "trace_pruned", path=str(path))
        return deleted

    async def run(self, stop: asyncio.Event) -> None:
        """Flush every FLUSH_SECONDS and prune every PRUNE_SECONDS until `stop`; then write
        everything, the open minute too (a restart would lose it; the next process may then
        write a second line for the same key and minute, which readers sum)."""
        pruned_at = -math.inf
        while not stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FLUSH_SECONDS)
            if stop.is_set():
                break
            now = self._clock()
            await self.flush(now)
            if now - pruned_at >= PRUNE_SECONDS:
                await asyncio.to_thread(self.prune, now)
                pruned_at = now
        await self.flush(math.inf)

    # --- reading -----------------------------------------------------------------------------

    def _day_files(self) -> list[tuple[date, Path]]:
        """The day files, oldest first; anything else in the directory is left alone."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []  # nothing written yet
        except OSError as err:
            raise UnavailableError(f"cannot list the flow trace directory {self.directory}: "
                                   f"{err.strerror or err}; check its owner and mode (0700)") from err
        found = []
        for name in names:
            match = _DAY_FILE.fullmatch(name)
            if match is None:
                continue
            try:
                day = date(int(match[1]), int(match[2]), int(match[3]))
            except ValueError:
                continue
            found.append((day, self.directory / name))
        return sorted(found)

    def iter_lines(self, since: float, until: float) -> Generator[str, None, None]:
        """The stored lines with since <= ts < until (each ending in a newline), day files in
        order, each file in the order it was written (time order). Lines of minutes not
        flushed yet (the last minute or so) are not included. A corrupt line is skipped with a
        WARNING; a last line without its newline is being written (or was torn by a crash) and
        is skipped silently. Blocking file I/O: call it from a worker thread (`export` does)."""
        ts_cache: dict[str, float] = {}  # every line of a minute carries the same ts text
        for day, path in self._day_files():
            start = _day_start(day)
            if start + DAY <= since or start >= until:
                continue
            try:
                file = path.open("rb")
            except OSError as err:
                log_event(log, "trace_file_unreadable", level=logging.WARNING, path=str(path),
                          error=err.strerror or str(err))
                continue
            corrupt = 0
            with file:
                for number, raw in enumerate(file, start=1):
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        if len(raw) > MAX_LINE_BYTES:
                            raise TraceFormatError(f": longer than {MAX_LINE_BYTES} bytes")
                        record = record_from_dict(json.loads(raw), "", ts_cache)
                    except (ValueError, RecursionError, TraceFormatError) as err:
                        corrupt += 1
                        if corrupt == 1:  # one line per file, not one per line of a damaged file
                            log_event(log, "trace_line_skipped", level=logging.WARNING, path=str(path), line=number,
                                      error=str(err)[:200].lstrip(": "))
                        continue
                    if since <= record.ts < until:
                        yield raw.decode()
            if corrupt > 1:
                log_event(log, "trace_lines_skipped", level=logging.WARNING, path=str(path), lines=corrupt)

    async def export(self, since: float, until: float, chunk_bytes: int) -> AsyncIterator[bytes]:
        """`iter_lines(since, until)` in chunks of whole lines, each at most `chunk_bytes` (or
        one line, if longer), read in a worker thread. `until` may be math.inf (up to now)."""
        if since >= until:
            raise InvalidArgumentError(f"the window is empty: until ({until:.0f}) must come after since ({since:.0f})")
        lines = self.iter_lines(since, until)
        carry: list[bytes] = []  # the line that did not fit the previous chunk

        def next_chunk() -> bytes:
            parts, size = list(carry), sum(len(p) for p in carry)
            carry.clear()
            for line in lines:
                data = line.encode()
                if parts and size + len(data) > chunk_bytes:
                    carry.append(data)
                    break
                parts.append(data)
                size += len(data)
            return b"".join(parts)

        try:
            while chunk := await asyncio.to_thread(next_chunk):
                yield chunk
        finally:
            # Closes the open day file when the client goes away mid-stream. Cancelled while a
            # worker thread still reads, the generator is busy ("already executing"): it is then
            # closed, with its file, when the thread is done and it is collected.
            with suppress(ValueError):
                lines.close()


def _append_minutes(path: Path, minutes: dict[int, _Minute]) -> int:
    """Append the lines of `minutes` (in time order, keys sorted) to `path`; how many lines."""
    lines = [record_to_line(TraceRecord(float(end), *key, *sums))
             for end in sorted(minutes) for key, sums in sorted(minutes[end].sums.items())]
    if lines:
        append_whole(path, "".join(lines).encode())
    return len(lines)


def append_whole(path: Path, data: bytes) -> None:
    """Append `data` (whole lines) to `path`, created 0600 (its directory 0700): all of it or,
    on an error, nothing (the file is cut back to where it was)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Read and write: the last byte is read to tell whether a crash tore the last line.
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, f"{path} is not a regular file")
        size = st.st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a line torn by a crash ends here: readers skip it, not ours after it
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            with suppress(OSError):
                os.ftruncate(fd, size)  # never leave half a line behind
            raise
    finally:
        os.close(fd)


__all__ = ["SUBDIRECTORY", "TraceLog", "minute_end"]
