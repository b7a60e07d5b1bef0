"""The embedded backend: the KV interface on one SQLite file, for a single server.

One dedicated thread owns the connection and runs every statement, so the sqlite3 module's
thread rules hold and transactions are naturally serialised. Watches read the change log
and sleep on an asyncio.Condition that every committing transaction wakes: there is no
polling. Only watchers in this process are woken, which is why SQLite is the single-server
backend and etcd the one for several replicas.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from trustmesh.controlplane.store.kv import (
    CompactedError,
    Compare,
    Delete,
    DeletePrefix,
    Event,
    EventType,
    Get,
    KeyValue,
    LeaseNotFoundError,
    Op,
    OpResponse,
    Put,
    StoreMember,
    TxnResult,
    check_ops,
    prefix_end,
)
from trustmesh.errors import StoreError, StoreUnavailableError

# How many revisions of change history to keep for watchers that fall behind. A watcher
# further behind than this gets CompactedError and re-reads a snapshot.
DEFAULT_HISTORY = 10_000

# How many change rows one watch read fetches; bounds memory for a far-behind watcher.
_WATCH_READ_ROWS = 1_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    rev INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    deleted INTEGER NOT NULL,
    PRIMARY KEY (rev, seq)
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', 1);
-- etcd starts at revision 1; so do we, so that both backends number alike.
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 1);
INSERT OR IGNORE INTO meta (name, value) VALUES ('compact_revision', 0);
"""

T = TypeVar("T")


# How often expired leases are swept while any lease exists.
_LEASE_SWEEP_SECONDS = 0.5


@dataclass
class _Lease:
    ttl: int
    deadline: float  # time.monotonic()
    keys: set[str]


@dataclass(frozen=True)
class _ChangeRow:
    rev: int
    key: str
    value: bytes
    deleted: bool


class SqliteKV:
    """KVBackend on a SQLite file. Build it with ``await SqliteKV.open(path)``."""

    def __init__(self, path: Path, executor: ThreadPoolExecutor, history: int) -> None:
        self._path = path
        self._executor = executor
        self._history = history
        self._conn: sqlite3.Connection | None = None
        self._changed = asyncio.Condition()
        self._head = 0
        self._closed = False
        # Leases live in memory: one process owns the file, and a lease never outlives the
        # process that holds it any more than etcd's outlives its keepalives.
        self._leases: dict[int, _Lease] = {}
        self._key_lease: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path, *, history: int = DEFAULT_HISTORY) -> SqliteKV:
        if history < 1:
            raise ValueError("history must keep at least one revision")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trustmesh-sqlite")
        kv = cls(path, executor, history)
        try:
            kv._head = await kv._run(kv._open_sync)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return kv

    # -- thread plumbing -------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StoreUnavailableError(f"the sqlite store {self._path} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as err:
            raise self._translate(err) from err

    def _translate(self, err: sqlite3.Error) -> StoreError:
        text = str(err)
        if isinstance(err, sqlite3.DatabaseError) and (
            "not a database" in text or "malformed" in text
        ):
            return StoreError(
                f"sqlite store {self._path} is corrupt or not a database ({text}); "
                "restore it from a backup, or move it away to start with an empty store"
            )
        if "readonly" in text or "unable to open" in text or "disk I/O" in text:
            return StoreError(
                f"cannot write the sqlite store {self._path} ({text}); check that the file "
                "and its directory exist and are writable by this user"
            )
        if "locked" in text or "busy" in text:
            return StoreUnavailableError(
                f"sqlite store {self._path} is locked by another process ({text}); "
                "run only one server per data directory, or use etcd for several"
            )
        return StoreError(f"sqlite store {self._path} failed: {text}")

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "used before open"
        return self._conn

    def _open_sync(self) -> int:
        if not self._path.exists():
            # Create the file ourselves so it is 0600 from its first byte; SQLite gives
            # the -wal and -shm files the same mode as the database file.
            try:
                fd = os.open(self._path, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            except OSError as err:
                raise StoreError(
                    f"cannot create the sqlite store {self._path} ({err.strerror}); "
                    "check that the data directory exists and is writable by this user"
                ) from err
            else:
                os.close(fd)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is
        # exactly one txn() call and nothing is committed behind our back.
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            schema = self._meta(conn, "schema")
            if schema != 1:
                raise StoreError(
                    f"sqlite store {self._path} has schema version {schema}, this server "
                    "understands 1; run the matching trustmesh version"
                )
            head = self._meta(conn, "revision")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return head

    @staticmethod
    def _meta(conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    # -- reads -----------------------------------------------------------------------

    @staticmethod
    def _row_to_kv(row: tuple[bytes, bytes, int, int, int]) -> KeyValue:
        key, value, create_rev, mod_rev, version = row
        return KeyValue(bytes(key).decode(), bytes(value), create_rev, mod_rev, version)

    def _get_sync(self, conn: sqlite3.Connection, key: str) -> KeyValue | None:
        row = conn.execute(
            "SELECT key, value, create_rev, mod_rev, version FROM kv WHERE key = ?",
            (key.encode(),),
        ).fetchone()
        return None if row is None else self._row_to_kv(row)

    async def get(self, key: str) -> KeyValue | None:
        await self._sweep_leases()
        return await self._run(lambda: self._get_sync(self._db(), key))

    async def range(
        self, prefix: str, *, limit: int | None = None, start_after: str | None = None
    ) -> list[KeyValue]:
        await self._sweep_leases()
        low = prefix.encode()
        sql = "SELECT key, value, create_rev, mod_rev, version FROM kv WHERE key >= ?"
        args: list[object] = [low]
        if start_after is not None:
            sql += " AND key > ?"
            args.append(start_after.encode())
        high = prefix_end(low)
        if high is not None:
            sql += " AND key < ?"
            args.append(high)
        sql += " ORDER BY key"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)

        def read() -> list[KeyValue]:
            return [self._row_to_kv(r) for r in self._db().execute(sql, args).fetchall()]

        return await self._run(read)

    async def current_revision(self) -> int:
        return await self._run(lambda: self._meta(self._db(), "revision"))

    # -- writes ----------------------------------------------------------------------

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        check_ops(success)
        check_ops(failure)
        await self._sweep_leases()
        for op in (*success, *failure):
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseNotFoundError(op.lease)
        result = await self._raw_txn(compares, success, failure)
        self._track_leases(success if result.succeeded else failure)
        return result

    async def _raw_txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        result = await self._run(lambda: self._txn_sync(list(compares), success, failure))
        if result.revision > self._head:
            async with self._changed:
                self._head = max(self._head, result.revision)
                self._changed.notify_all()
        return result

    # -- leases ----------------------------------------------------------------------

    def _track_leases(self, ops: Sequence[Op]) -> None:
        """Record which keys the ops just run attached to or detached from a lease."""
        for op in ops:
            if isinstance(op, Put | Delete):
                old = self._key_lease.pop(op.key, None)
                if old is not None and old in self._leases:
                    self._leases[old].keys.discard(op.key)
                if isinstance(op, Put) and op.lease:
                    self._key_lease[op.key] = op.lease
                    self._leases[op.lease].keys.add(op.key)
            elif isinstance(op, DeletePrefix):
                for key in [k for k in self._key_lease if k.startswith(op.prefix)]:
                    lease = self._key_lease.pop(key)
                    if lease in self._leases:
                        self._leases[lease].keys.discard(key)

    async def _end_lease(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None or not lease.keys:
            return
        keys = sorted(lease.keys)
        for key in keys:
            self._key_lease.pop(key, None)
        # One transaction, so watchers see the whole lease end at one revision.
        await self._raw_txn([], [Delete(key) for key in keys])

    async def _sweep_leases(self) -> None:
        now = time.monotonic()
        for lease_id in [i for i, lease in self._leases.items() if lease.deadline <= now]:
            await self._end_lease(lease_id)

    async def _sweep_forever(self) -> None:
        # Expiry must happen even when nobody calls the store (a crashed holder), so that
        # watchers of a leased key learn of it.
        while self._leases and not self._closed:
            await asyncio.sleep(_LEASE_SWEEP_SECONDS)
            try:
                await self._sweep_leases()
            except StoreError:
                pass  # the store is closing or failing; the next call reports it
        self._sweeper = None

    async def lease_grant(self, ttl: int) -> int:
        if ttl < 1:
            raise ValueError(f"a lease must last at least 1 second, not {ttl}")
        if self._closed:
            raise StoreUnavailableError(f"the sqlite store {self._path} is closed")
        lease_id = secrets.randbits(62) | 1
        self._leases[lease_id] = _Lease(ttl, time.monotonic() + ttl, set())
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="sqlite-lease-sweeper")
        return lease_id

    async def lease_keepalive(self, lease: int) -> int:
        await self._sweep_leases()
        found = self._leases.get(lease)
        if found is None:
            return 0
        found.deadline = time.monotonic() + found.ttl
        return found.ttl

    async def lease_revoke(self, lease: int) -> None:
        await self._end_lease(lease)

    def _txn_sync(
        self, compares: list[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            succeeded = all(c.holds(self._get_sync(conn, c.key)) for c in compares)
            ops = success if succeeded else failure
            current = self._meta(conn, "revision")
            new_rev = current + 1
            responses, changes = self._apply(conn, ops, new_rev)
            if changes:
                conn.executemany(
                    "INSERT INTO changes (rev, seq, key, value, deleted) VALUES (?, ?, ?, ?, ?)",
                    [
                        (new_rev, seq, c.key.encode(), c.value, int(c.deleted))
                        for seq, c in enumerate(changes)
                    ],
                )
                conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (new_rev,))
                self._trim_history(conn, new_rev)
                current = new_rev
            conn.execute("COMMIT")
        except BaseException:
            # Anything going wrong (including a failed COMMIT) leaves nothing written.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return TxnResult(succeeded, current, tuple(responses))

    def _apply(
        self, conn: sqlite3.Connection, ops: Sequence[Op], rev: int
    ) -> tuple[list[OpResponse], list[_ChangeRow]]:
        responses: list[OpResponse] = []
        changes: list[_ChangeRow] = []
        for op in ops:
            if isinstance(op, Get):
                responses.append(OpResponse(kv=self._get_sync(conn, op.key)))
            elif isinstance(op, Put):
                old = self._get_sync(conn, op.key)
                create_rev = rev if old is None else old.create_revision
                version = 1 if old is None else old.version + 1
                conn.execute(
                    "INSERT OR REPLACE INTO kv (key, value, create_rev, mod_rev, version) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (op.key.encode(), op.value, create_rev, rev, version),
                )
                changes.append(_ChangeRow(rev, op.key, op.value, False))
                responses.append(OpResponse())
            elif isinstance(op, Delete):
                cur = conn.execute("DELETE FROM kv WHERE key = ?", (op.key.encode(),))
                if cur.rowcount:
                    changes.append(_ChangeRow(rev, op.key, b"", True))
                responses.append(OpResponse(deleted=cur.rowcount))
            elif isinstance(op, DeletePrefix):
                keys = self._keys_with_prefix(conn, op.prefix)
                for key in keys:
                    conn.execute("DELETE FROM kv WHERE key = ?", (key,))
                    changes.append(_ChangeRow(rev, key.decode(), b"", True))
                responses.append(OpResponse(deleted=len(keys)))
            else:  # pragma: no cover - the Op union is closed
                raise TypeError(f"unknown op {op!r}")
        return responses, changes

    @staticmethod
    def _keys_with_prefix(conn: sqlite3.Connection, prefix: str) -> list[bytes]:
        low = prefix.encode()
        high = prefix_end(low)
        if high is None:
            rows = conn.execute("SELECT key FROM kv WHERE key >= ? ORDER BY key", (low,))
        else:
            rows = conn.execute(
                "SELECT key FROM kv WHERE key >= ? AND key < ? ORDER BY key", (low, high)
            )
        return [bytes(r[0]) for r in rows.fetchall()]

    def _trim_history(self, conn: sqlite3.Connection, head: int) -> None:
        keep_from = head - self._history + 1
        # Trim in steps of 10% of the history so the DELETE is not paid on every write.
        if keep_from - self._meta(conn, "compact_revision") > max(1, self._history // 10):
            self._compact_sync(conn, keep_from)

    @staticmethod
    def _compact_sync(conn: sqlite3.Connection, revision: int) -> None:
        conn.execute("DELETE FROM changes WHERE rev < ?", (revision,))
        conn.execute(
            "UPDATE meta SET value = MAX(value, ?) WHERE name = 'compact_revision'", (revision,)
        )

    async def compact(self, revision: int) -> None:
        def run() -> None:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                head = self._meta(conn, "revision")
                if revision > head:
                    raise StoreError(
                        f"cannot compact at revision {revision}: the store is at {head}"
                    )
                self._compact_sync(conn, revision)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        await self._run(run)

    # -- watch -----------------------------------------------------------------------

    def _read_changes(self, prefix: str, after: int) -> tuple[int, int, list[_ChangeRow]]:
        """(progress, compact_revision, changes under prefix in (after, progress]).

        ``progress`` is the revision up to which the returned changes are complete.
        """
        conn = self._db()
        low = prefix.encode()
        high = prefix_end(low)
        key_filter = " AND key >= ?" + ("" if high is None else " AND key < ?")
        key_args: list[object] = [low] if high is None else [low, high]
        conn.execute("BEGIN")  # one read snapshot for head, compaction mark and rows
        try:
            head = self._meta(conn, "revision")
            compacted = self._meta(conn, "compact_revision")
            rows = conn.execute(
                "SELECT rev, key, value, deleted FROM changes WHERE rev > ?"
                + key_filter
                + " ORDER BY rev, seq LIMIT ?",
                [after, *key_args, _WATCH_READ_ROWS],
            ).fetchall()
            if len(rows) < _WATCH_READ_ROWS:
                return head, compacted, [self._change_row(r) for r in rows]
            # A truncated read may end inside a revision: keep only the revisions seen
            # whole, or, if one revision alone fills the read, read that revision whole.
            last = int(rows[-1][0])
            whole = [self._change_row(r) for r in rows if r[0] < last]
            if whole:
                return last - 1, compacted, whole
            rows = conn.execute(
                "SELECT rev, key, value, deleted FROM changes WHERE rev = ?"
                + key_filter
                + " ORDER BY seq",
                [last, *key_args],
            ).fetchall()
            return last, compacted, [self._change_row(r) for r in rows]
        finally:
            conn.execute("COMMIT")

    @staticmethod
    def _change_row(row: tuple[int, bytes, bytes, int]) -> _ChangeRow:
        return _ChangeRow(int(row[0]), bytes(row[1]).decode(), bytes(row[2]), bool(row[3]))

    def _past(self, revision: int) -> bool:
        """Closed, or changed since `revision`: what a watcher waits for."""
        return self._closed or self._head > revision

    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[list[Event], None]:
        seen = start_revision
        while not self._closed:
            head, compacted, rows = await self._run(partial(self._read_changes, prefix, seen))
            # History before `compacted` is gone: we can serve (seen, head] only if the
            # first revision we need, seen + 1, is still kept.
            if seen + 1 < compacted:
                raise CompactedError(start_revision=seen, compacted_revision=compacted)
            batch: list[Event] = []
            for row in rows:
                if batch and batch[-1].mod_revision != row.rev:
                    yield batch
                    batch = []
                kind = EventType.DELETE if row.deleted else EventType.PUT
                batch.append(Event(kind, row.key, row.value, row.rev))
            if batch:
                yield batch
            seen = max(seen, head)
            async with self._changed:
                await self._changed.wait_for(partial(self._past, seen))
                if self._closed:
                    return

    async def members(self) -> list[StoreMember]:
        # Embedded: one member, this file; it is healthy when it answers a read.
        try:
            await self.current_revision()
        except StoreError as err:
            return [StoreMember("embedded", str(self._path), healthy=False, leader=True, error=str(err))]
        return [StoreMember("embedded", str(self._path), healthy=True, leader=True)]

    async def close(self) -> None:
        if self._closed:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

        def close_connection() -> None:
            # Runs after any statement already queued on the thread, so those finish on
            # an open connection.
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close_connection)
        self._executor.shutdown(wait=True)
