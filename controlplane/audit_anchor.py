"""Anchoring the audit chain outside the store, so that truncation and wiping are detectable.

The chain's HMAC links stop anyone without the KEK from editing or forging events, but not
from *removing* them: cutting the tail (and pointing the head at the new last event), or
deleting the whole log, leaves a chain that verifies. So the server writes a checkpoint of
the head it has seen, ``{"seq", "hash", "time", "mac"}`` (one JSON line, MAC under a key
derived from the KEK), to a place outside the store that the operator picks: a file (ideally
on another machine's mount, append-only, or shipped off the host) or syslog. A checkpoint is
written every `every_events` events and at most `interval` after the last event.

``check`` compares the store's chain with the newest checkpoint in the file: the log must
still reach the checkpointed event and hold it unchanged. What remains undetectable is the
loss of the events after the newest checkpoint (at most `every_events`, or `interval`'s
worth), and everything when the file is removed together with the store's log; the README's
threat model says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import stat
import syslog
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trustmesh.clock import format_utc
from trustmesh.controlplane.store.records import AuditEvent
from trustmesh.errors import NotFoundError, StoreError, TrustmeshError
from trustmesh.logs import log_event

log = logging.getLogger("trustmesh.audit")

SYSLOG = "syslog"
OFF = "off"
DEFAULT_FILE = "audit-anchor.jsonl"
# A checkpoint line is ~200 bytes; one a minute for ten years stays far below this.
_MAX_FILE_BYTES = 1 << 30


class AnchorStore(Protocol):
    async def get_audit_head(self) -> AuditEvent | None: ...
    async def get_audit_event(self, seq: int) -> AuditEvent: ...


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: str
    time: float


@dataclass(frozen=True, slots=True)
class AnchorCheck:
    ok: bool
    checkpoint: Checkpoint | None  # the newest checkpoint found (None: none yet)
    reason: str = ""


class AnchorError(TrustmeshError):
    """The checkpoint file cannot be used (unwritable, unreadable, or a line that is not ours)."""


class AuditAnchor:
    """Writes checkpoints of the audit head and checks the chain against the newest one."""

    def __init__(self, target: str, key: bytes, *, every_events: int = 100, interval: float = 60.0) -> None:
        self.target = target  # a file path, "syslog" or "off"
        self._key = key
        self._every = every_events
        self._interval = interval
        self._last: Checkpoint | None = None  # the newest checkpoint written or read
        self._pending: AuditEvent | None = None  # the newest event seen but not yet anchored
        self._wake = asyncio.Event()
        self.broken = ""  # why checkpoints stopped: the chain no longer agrees with the anchor

    @property
    def last(self) -> Checkpoint | None:
        """The newest checkpoint written or read."""
        return self._last

    @property
    def path(self) -> Path | None:
        return None if self.target in (SYSLOG, OFF) else Path(self.target)

    def _mac(self, seq: int, hash_: str, at: float) -> str:
        body = json.dumps({"seq": seq, "hash": hash_, "time": at}, sort_keys=True, separators=(",", ":"))
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def line(self, cp: Checkpoint) -> str:
        return json.dumps({"seq": cp.seq, "hash": cp.hash, "time": cp.time, "at": format_utc(cp.time),
                           "mac": self._mac(cp.seq, cp.hash, cp.time)}, sort_keys=True, separators=(",", ":"))

    def read_latest(self) -> Checkpoint | None:
        """The newest checkpoint in the file (None when there is no file or it is empty).

        Every line must carry a valid MAC and the seqs must never go down: a line that is
        not ours means the anchor itself was tampered with, which is an error, not a skip.
        """
        path = self.path
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > _MAX_FILE_BYTES:
                    raise AnchorError(f"audit anchor {path} is larger than {_MAX_FILE_BYTES} bytes; rotate it")
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise AnchorError(f"cannot read audit anchor {path}: {err.strerror}") from err
        latest: Checkpoint | None = None
        for n, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                cp = Checkpoint(int(obj["seq"]), str(obj["hash"]), float(obj["time"]))
                ok = hmac.compare_digest(str(obj["mac"]), self._mac(cp.seq, cp.hash, cp.time))
            except (ValueError, KeyError, TypeError) as err:
                raise AnchorError(f"audit anchor {path} line {n} is not a checkpoint ({err})") from None
            if not ok:
                raise AnchorError(f"audit anchor {path} line {n} fails its MAC: the anchor was edited")
            if latest is not None and cp.seq < latest.seq:
                raise AnchorError(f"audit anchor {path} line {n} goes back from event {latest.seq} to {cp.seq}")
            latest = cp
        return latest

    async def check(self, store: AnchorStore) -> AnchorCheck:
        """Does the store's chain still hold the newest checkpointed event?"""
        try:
            cp = self.read_latest()
        except AnchorError as err:
            return AnchorCheck(False, None, str(err))
        if cp is None:
            return AnchorCheck(True, None)
        self._last = self._last if self._last is not None and self._last.seq > cp.seq else cp
        try:
            head = await store.get_audit_head()
        except StoreError as err:
            return AnchorCheck(False, cp, f"the audit head is unreadable ({err})")
        when = format_utc(cp.time)
        if head is None or head.seq < cp.seq:
            return AnchorCheck(False, cp, (
                f"the audit log ends at event {head.seq if head else 0} but the anchor {self.target} recorded event "
                f"{cp.seq} at {when}: events were removed from the end or the log was wiped"))
        try:
            event = await store.get_audit_event(cp.seq)
        except (NotFoundError, StoreError):
            return AnchorCheck(False, cp, f"event {cp.seq}, anchored at {when}, is missing from the audit log")
        if not hmac.compare_digest(event.hash, cp.hash):
            return AnchorCheck(False, cp, (
                f"event {cp.seq} differs from the one anchored at {when}: the log was cut back and rewritten"))
        return AnchorCheck(True, cp)

    # -- writing ------------------------------------------------------------------------

    def probe(self) -> None:
        """Fail at start, not at the first checkpoint, when the anchor file cannot be written."""
        if self.path is None:
            return
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        except OSError as err:
            raise AnchorError(f"cannot write the audit anchor {self.path}: {err.strerror}; create its directory, "
                              "fix its permissions, or choose another --audit-anchor (a file, syslog or off)") from err

    def note(self, event: AuditEvent) -> None:
        """Called after every append: anchor now every `every_events` events, else soon."""
        if self.target == OFF or self.broken:
            return
        if self._last is not None and event.seq <= self._last.seq:
            # The chain went back below what was anchored: someone cut it. Keep the anchor
            # as the evidence; `audit verify` reports it.
            self.broken = (f"event {event.seq} was appended after event {self._last.seq} had been anchored: "
                           "the audit log was cut back")
            log_event(log, "audit.anchor_broken", logging.ERROR, reason=self.broken)
            return
        self._pending = event
        if self._last is None or event.seq - self._last.seq >= self._every:
            self._wake.set()

    async def flush(self) -> None:
        """Write a checkpoint of the newest noted event, if it is newer than the last one."""
        ev = self._pending
        if ev is None or self.broken or (self._last is not None and ev.seq <= self._last.seq):
            return
        cp = Checkpoint(ev.seq, ev.hash, ev.time)
        text = self.line(cp)
        try:
            await asyncio.to_thread(self._write, text)
        except OSError as err:
            log_event(log, "audit.anchor_write_failed", logging.ERROR, target=self.target, error=err.strerror)
            return
        self._last = cp

    def _write(self, text: str) -> None:
        if self.target == SYSLOG:
            syslog.openlog("trustmesh", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
            syslog.syslog(syslog.LOG_NOTICE, "audit-checkpoint " + text)
            return
        path = self.path
        assert path is not None
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(0, f"{path} is not a regular file")
            os.write(fd, text.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    async def run(self, stop: asyncio.Event) -> None:
        """Write checkpoints until `stop`: on every `every_events` events, or `interval` after one.
        The server flushes once more after its listeners have stopped, for the last events."""
        if self.target == OFF:
            return
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({woken, stopping}, timeout=self._interval, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                self._wake.clear()
                await self.flush()
        finally:
            stopping.cancel()
