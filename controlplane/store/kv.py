"""The narrow key-value interface that both storage backends implement.

It is modelled on etcd's MVCC store so that the SQLite backend can promise exactly what
etcd promises, and the typed ``Store`` above it is written once:

* one global revision that grows by exactly one for every transaction that changes
  something (a transaction that only reads, or whose writes change nothing, leaves it
  alone);
* every key carries ``create_revision`` (revision of the put that created it),
  ``mod_revision`` (revision of its last put) and ``version`` (puts since creation; a
  missing key has version 0);
* a transaction is compare-then-act: all compares are checked, then either the success
  ops or the failure ops run, atomically;
* a watch yields the changes strictly after a revision, one batch per revision, in
  revision order, and says so (``CompactedError``) when that history is gone.

Keys are ``str`` and compared as their UTF-8 bytes (etcd's order); values are ``bytes``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from trustmesh.errors import StoreError


class CompactedError(StoreError):
    """The history a watch asked for has been compacted away.

    The caller must re-read the current state, then watch from that read's revision.
    """

    def __init__(self, start_revision: int, compacted_revision: int) -> None:
        self.start_revision = start_revision
        self.compacted_revision = compacted_revision
        super().__init__(
            f"changes after revision {start_revision} are no longer kept "
            f"(history starts at revision {compacted_revision}); "
            "re-read the current state and watch from its revision"
        )


class InvalidTxnError(StoreError):
    """A transaction was malformed (a programming error in the caller, never a race)."""


class LeaseNotFoundError(StoreError):
    """A put named a lease that has expired or was revoked; nothing was written."""

    def __init__(self, lease: int) -> None:
        self.lease = lease
        super().__init__(f"lease {lease:x} has expired or was revoked; grant a new lease and retry")


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int


class Target(enum.Enum):
    VERSION = "version"
    MOD = "mod_revision"
    CREATE = "create_revision"
    VALUE = "value"


class CompareOp(enum.Enum):
    EQUAL = "=="
    NOT_EQUAL = "!="
    GREATER = ">"
    LESS = "<"


@dataclass(frozen=True)
class Compare:
    """One precondition of a transaction.

    A missing key compares as version/mod_revision/create_revision 0. A VALUE compare on a
    missing key is always false (etcd's rule), so use ``absent``/``exists`` for existence.
    """

    key: str
    target: Target
    op: CompareOp
    operand: int | bytes

    def __post_init__(self) -> None:
        wants_bytes = self.target is Target.VALUE
        if wants_bytes != isinstance(self.operand, bytes):
            kind = "bytes" if wants_bytes else "int"
            raise InvalidTxnError(
                f"compare on {self.target.value} of {self.key!r} needs a {kind} operand"
            )

    @classmethod
    def absent(cls, key: str) -> Compare:
        return cls(key, Target.VERSION, CompareOp.EQUAL, 0)

    @classmethod
    def exists(cls, key: str) -> Compare:
        return cls(key, Target.VERSION, CompareOp.GREATER, 0)

    @classmethod
    def version(cls, key: str, version: int) -> Compare:
        return cls(key, Target.VERSION, CompareOp.EQUAL, version)

    @classmethod
    def mod_revision(cls, key: str, revision: int) -> Compare:
        return cls(key, Target.MOD, CompareOp.EQUAL, revision)

    @classmethod
    def value(cls, key: str, value: bytes) -> Compare:
        return cls(key, Target.VALUE, CompareOp.EQUAL, value)

    def holds(self, kv: KeyValue | None) -> bool:
        """Evaluate this compare against a key's current state (used by local backends)."""
        actual: int | bytes
        if self.target is Target.VALUE:
            if kv is None:
                return False
            actual = kv.value
        elif kv is None:
            actual = 0
        elif self.target is Target.VERSION:
            actual = kv.version
        elif self.target is Target.MOD:
            actual = kv.mod_revision
        else:
            actual = kv.create_revision
        if self.op is CompareOp.EQUAL:
            return actual == self.operand
        if self.op is CompareOp.NOT_EQUAL:
            return actual != self.operand
        # Same-type operands are guaranteed by __post_init__.
        if self.op is CompareOp.GREATER:
            return actual > self.operand  # type: ignore[operator]
        return actual < self.operand  # type: ignore[operator]


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    # Attach the key to this lease (0: none): it is deleted when the lease ends. A put
    # without a lease detaches the key from any lease it had (etcd's rule).
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


@dataclass(frozen=True)
class DeletePrefix:
    prefix: str


@dataclass(frozen=True)
class Get:
    key: str


Op = Put | Delete | DeletePrefix | Get


@dataclass(frozen=True)
class OpResponse:
    """What one op returned: ``kv`` for a Get (None if absent), ``deleted`` for deletes."""

    kv: KeyValue | None = None
    deleted: int = 0


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    # The store revision after the transaction (its own revision if it wrote anything).
    revision: int
    responses: tuple[OpResponse, ...]


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class Event:
    type: EventType
    key: str
    value: bytes  # empty for DELETE
    mod_revision: int  # the revision of the change (for DELETE: of the deletion)


@dataclass(frozen=True)
class StoreMember:
    """One member of the store as `trustmesh check` shows it: SQLite's one file, or an etcd
    member reached on its client URL."""

    name: str
    endpoint: str
    healthy: bool
    leader: bool = False  # the etcd raft leader (SQLite: its one member)
    error: str = ""  # why it is not healthy


class KVBackend(Protocol):
    """What the typed Store needs from a storage backend."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def range(
        self, prefix: str, *, limit: int | None = None, start_after: str | None = None
    ) -> list[KeyValue]:
        """Keys starting with ``prefix``, sorted by key; ``start_after`` is a full key."""
        ...

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult: ...

    async def current_revision(self) -> int: ...

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[list[Event], None]:
        """Batches of events (one per revision) strictly after ``start_revision``.

        Raises CompactedError if that history is gone. The iterator ends when the backend
        is closed; losing the backend raises StoreUnavailableError.
        """
        ...

    async def compact(self, revision: int) -> None:
        """Forget the change history before ``revision`` (keys keep their values)."""
        ...

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (>= 1); returns its id (never 0)."""
        ...

    async def lease_keepalive(self, lease: int) -> int:
        """Renew the lease; the seconds it now has left, or 0 if it no longer exists."""
        ...

    async def lease_revoke(self, lease: int) -> None:
        """End the lease now, deleting every key attached to it (no error if already gone)."""
        ...

    async def members(self) -> list[StoreMember]:
        """The store's members and whether each answers (read-only; for health checks)."""
        ...

    async def close(self) -> None: ...


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix``.

    None means "no upper bound" (empty prefix, or a prefix of only 0xff bytes).
    """
    buf = bytearray(prefix)
    while buf:
        if buf[-1] < 0xFF:
            buf[-1] += 1
            return bytes(buf)
        buf.pop()
    return None


def check_ops(ops: Sequence[Op]) -> None:
    """Reject what etcd rejects, so both backends refuse the same transactions.

    etcd refuses a transaction that puts one key twice or puts a key that the same
    transaction deletes, because the result would depend on op order.
    """
    puts: set[str] = set()
    for op in ops:
        if isinstance(op, Put):
            if op.key in puts:
                raise InvalidTxnError(f"transaction puts {op.key!r} twice")
            puts.add(op.key)
    for op in ops:
        if isinstance(op, Delete) and op.key in puts:
            raise InvalidTxnError(f"transaction both puts and deletes {op.key!r}")
        if isinstance(op, DeletePrefix):
            clash = sorted(k for k in puts if k.startswith(op.prefix))
            if clash:
                raise InvalidTxnError(
                    f"transaction puts {clash[0]!r} and deletes its prefix {op.prefix!r}"
                )
