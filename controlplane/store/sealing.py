"""Record integrity: every security-relevant record carries a MAC under a key derived from the KEK.

Someone who can write the store (the SQLite file, or the etcd port) but does not hold the
key-encryption key must not be able to mint identities by writing rows: a join-token hash,
an entry marked admin, a lifted ban, a rewritten policy. So each value under a sealed prefix
is stored as ``payload || TAG || hex(HMAC-SHA256(k_kind, key || 0x00 || payload))`` where
``k_kind`` is derived from the KEK with one HKDF label per record kind and the MAC covers the
record's key, so a valid record cannot be moved under another key or kind.

The layer sits between the typed ``Store`` and the backend, so every read path (get, range,
transaction responses, the watch) checks and every write path seals, in one place. A record
that fails is never handed up: it reads as absent (``get`` and transaction reads give None,
``range`` and the watch leave it out), which every caller already treats as "refuse", and
each failure goes to the hook the server installs (ERROR log, metric, audit). The MAC is
deterministic, so a value compare in a transaction seals its operand the same way and still
compares equal.

What a MAC cannot see is a *replay*: an older, validly sealed value put back under its own
key. The records where that matters (a lifted ban, a rolled-back policy head) are checked
against the audit chain by controlplane/replay.py; the audit chain itself is anchored
outside the store by controlplane/audit_anchor.py.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from trustmesh.controlplane.store.kv import (
    Compare,
    Event,
    EventType,
    KeyValue,
    KVBackend,
    Op,
    OpResponse,
    Put,
    StoreMember,
    Target,
    TxnResult,
)
from trustmesh.errors import StoreError

# The trailer is text so that a stored record stays readable with sqlite3 or etcdctl.
TAG = b"\n~trustmesh-mac-v1:"
_HEX = 64
_TRAILER = len(TAG) + _HEX


class RecordIntegrityError(StoreError):
    """A stored record failed its integrity check: it was written without the KEK."""

    def __init__(self, failure: IntegrityFailure) -> None:
        self.failure = failure
        super().__init__(
            f"stored {failure.kind} record {failure.key!r} failed its integrity check ({failure.reason}); "
            "it was not written by this control plane and is not used: run `trustmesh audit verify` "
            "and restore the record from a backup"
        )


@dataclass(frozen=True, slots=True)
class IntegrityFailure:
    kind: str  # e.g. "node", "entry"
    key: str  # the store key, below the backend's namespace
    reason: str  # "no MAC", "MAC mismatch"


FailureHook = Callable[[IntegrityFailure], Awaitable[None]]


class RecordSealer:
    """Seals and opens the values of the record kinds it is given (prefix -> kind)."""

    def __init__(self, derive: Callable[[str], bytes], kinds: Sequence[tuple[str, str]]) -> None:
        # Longest prefix first, so "policy/revisions/" wins over a shorter "policy/".
        self._kinds = sorted(kinds, key=lambda pk: -len(pk[0]))
        self._keys = {kind: derive(f"record-mac:{kind}") for _, kind in kinds}

    def kind_of(self, key: str) -> str | None:
        """The record kind of `key`, or None when the key is not sealed (audit, CA journal)."""
        for prefix, kind in self._kinds:
            if key == prefix or (prefix.endswith("/") and key.startswith(prefix)):
                return kind
        return None

    def _mac(self, kind: str, key: str, payload: bytes) -> bytes:
        return hmac.new(self._keys[kind], key.encode() + b"\x00" + payload, hashlib.sha256).hexdigest().encode()

    def seal(self, key: str, payload: bytes) -> bytes:
        kind = self.kind_of(key)
        return payload if kind is None else payload + TAG + self._mac(kind, key, payload)

    def open(self, key: str, stored: bytes) -> bytes:
        """The payload of a sealed value; RecordIntegrityError when it is not ours."""
        kind = self.kind_of(key)
        if kind is None:
            return stored
        payload, mac = split(stored)
        if mac is None:
            raise RecordIntegrityError(IntegrityFailure(kind, key, "it carries no MAC"))
        if not hmac.compare_digest(mac, self._mac(kind, key, payload)):
            raise RecordIntegrityError(IntegrityFailure(kind, key, "its MAC does not match its key and content"))
        return payload


def split(stored: bytes) -> tuple[bytes, bytes | None]:
    """(payload, mac) of a sealed value; (stored, None) when it has no trailer."""
    if len(stored) >= _TRAILER and stored[-_TRAILER:-_HEX] == TAG:
        return stored[:-_TRAILER], stored[-_HEX:]
    return stored, None


class SealingKV:
    """A KVBackend that seals on the way in and checks on the way out."""

    def __init__(self, inner: KVBackend, sealer: RecordSealer, on_failure: FailureHook) -> None:
        self.inner = inner
        self.sealer = sealer
        self._on_failure = on_failure

    async def _opened(self, kv: KeyValue) -> KeyValue | None:
        try:
            return replace(kv, value=self.sealer.open(kv.key, kv.value))
        except RecordIntegrityError as err:
            await self._on_failure(err.failure)
            return None

    async def get(self, key: str) -> KeyValue | None:
        kv = await self.inner.get(key)
        return None if kv is None else await self._opened(kv)

    async def range(self, prefix: str, *, limit: int | None = None,
                    start_after: str | None = None) -> list[KeyValue]:
        out = []
        for kv in await self.inner.range(prefix, limit=limit, start_after=start_after):
            opened = await self._opened(kv)
            if opened is not None:
                out.append(opened)
        return out

    def _seal_compare(self, c: Compare) -> Compare:
        if c.target is Target.VALUE and isinstance(c.operand, bytes):
            return replace(c, operand=self.sealer.seal(c.key, c.operand))
        return c

    def _seal_op(self, op: Op) -> Op:
        return replace(op, value=self.sealer.seal(op.key, op.value)) if isinstance(op, Put) else op

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        result = await self.inner.txn([self._seal_compare(c) for c in compares],
                                      [self._seal_op(o) for o in success], [self._seal_op(o) for o in failure])
        responses = []
        for r in result.responses:
            # A record read back inside a transaction is used like any other: one that fails
            # its check reads as absent (the callers then refuse), never as its content.
            responses.append(r if r.kv is None else OpResponse(kv=await self._opened(r.kv), deleted=r.deleted))
        return replace(result, responses=tuple(responses))

    async def current_revision(self) -> int:
        return await self.inner.current_revision()

    async def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[list[Event], None]:
        async for events in self.inner.watch(prefix, start_revision):
            out = []
            for ev in events:
                if ev.type is EventType.DELETE or self.sealer.kind_of(ev.key) is None:
                    out.append(ev)
                    continue
                try:
                    out.append(replace(ev, value=self.sealer.open(ev.key, ev.value)))
                except RecordIntegrityError as err:
                    # Left out: followers keep the last good version of the record.
                    await self._on_failure(err.failure)
            if out:
                yield out

    async def compact(self, revision: int) -> None:
        await self.inner.compact(revision)

    async def lease_grant(self, ttl: int) -> int:
        return await self.inner.lease_grant(ttl)

    async def lease_keepalive(self, lease: int) -> int:
        return await self.inner.lease_keepalive(lease)

    async def lease_revoke(self, lease: int) -> None:
        await self.inner.lease_revoke(lease)

    async def members(self) -> list[StoreMember]:
        return await self.inner.members()

    async def close(self) -> None:
        await self.inner.close()
