"""The production backend: the KV interface on an etcd v3 cluster, through ``aetcd``.

aetcd's ``Client`` owns the gRPC channel (and authentication, should we add it); the
requests themselves go through the etcd stubs that aetcd exposes, because its high-level
helpers drop what the KV contract needs: ``transaction`` hides the header revision,
``get_prefix`` has no limit, and ``watch`` flattens events so one transaction's changes
can no longer be told apart. Every key is stored under a namespace so several
deployments (and tests) can share one cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc

from trustmesh.backoff import backoff_ceiling
from trustmesh.controlplane.store.kv import (
    CompactedError,
    Compare,
    CompareOp,
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
    Target,
    TxnResult,
    check_ops,
    prefix_end,
)
from trustmesh.errors import StoreError, StoreUnavailableError
from trustmesh.hostport import split_host_port

DEFAULT_NAMESPACE = "/trustmesh/"
DEFAULT_TIMEOUT = 5.0

# Keys per Range call when listing everything: keeps each response far below gRPC's
# default 4 MiB message limit however large the registry grows.
_PAGE = 500

_TARGETS = {
    Target.VERSION: rpc.Compare.VERSION,
    Target.MOD: rpc.Compare.MOD,
    Target.CREATE: rpc.Compare.CREATE,
    Target.VALUE: rpc.Compare.VALUE,
}
_RESULTS = {
    CompareOp.EQUAL: rpc.Compare.EQUAL,
    CompareOp.NOT_EQUAL: rpc.Compare.NOT_EQUAL,
    CompareOp.GREATER: rpc.Compare.GREATER,
    CompareOp.LESS: rpc.Compare.LESS,
}
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

T = TypeVar("T")


class _HistoryCompactedError(StoreError):
    """A request named a revision etcd has compacted (not a watch: see CompactedError)."""


def parse_endpoints(url: str) -> list[tuple[str, int]]:
    """``etcd://h1:p1,h2:p2`` -> [(h1, p1), (h2, p2)], with errors that say what to fix."""
    scheme, sep, rest = url.partition("://")
    if scheme != "etcd" or not sep:
        raise StoreError(f"etcd store url {url!r} must look like etcd://host:port[,host:port]")
    endpoints: list[tuple[str, int]] = []
    for item in rest.rstrip("/").split(","):
        try:
            host, port = split_host_port(item)
        except ValueError:
            port = 0
        if not port:
            raise StoreError(f"etcd endpoint {item!r} in {url!r} must be host:port, e.g. 127.0.0.1:2379")
        endpoints.append((host, port))
    return endpoints


class EtcdKV:
    """KVBackend on etcd. Build it with ``await EtcdKV.connect(endpoints)``."""

    def __init__(
        self, endpoints: Sequence[tuple[str, int]], namespace: str, timeout: float
    ) -> None:
        if not endpoints:
            raise StoreError("no etcd endpoints given; name at least one host:port")
        if not namespace.endswith("/"):
            namespace += "/"
        self._endpoints = list(endpoints)
        self._ns = namespace.encode()
        self._timeout = timeout
        self._client: Any = None  # aetcd.Client once connected
        self._current = 0  # index of the endpoint in use, or to try first
        self._closed = False
        self._watch_calls: set[Any] = set()  # open watch streams, ended by close()
        self._connect_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        endpoints: Sequence[tuple[str, int]],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> EtcdKV:
        kv = cls(endpoints, namespace, timeout)
        await kv._connected()
        return kv

    # -- connection ------------------------------------------------------------------

    def _names(self) -> str:
        return ", ".join(f"{h}:{p}" for h, p in self._endpoints)

    async def _connected(self) -> Any:
        """The live client, connecting (endpoints in order) if there is none."""
        if self._closed:
            raise StoreUnavailableError("the etcd store is closed")
        if self._client is not None:
            return self._client
        # One connect at a time: concurrent callers after a failure share the new client.
        async with self._connect_lock:
            if self._client is None:
                self._client = await self._first_answering()
            return self._client

    async def _first_answering(self) -> Any:
        problems: list[str] = []
        n = len(self._endpoints)
        for step in range(n):
            index = (self._current + step) % n
            host, port = self._endpoints[index]
            client = aetcd.Client(host=host, port=port, timeout=self._timeout)
            try:
                await client.connect()
                # connect() only builds a channel; one cheap read proves etcd answers.
                await client.kvstub.Range(
                    rpc.RangeRequest(key=self._ns, count_only=True),
                    timeout=self._timeout,
                    metadata=client.metadata,
                )
            except (rpc.AioRpcError, aetcd.ClientError) as err:
                problems.append(f"{host}:{port}: {_describe(err)}")
                await client.close()
                continue
            self._current = index
            return client
        raise StoreUnavailableError(
            f"cannot reach etcd at {self._names()} ({'; '.join(problems)}); check that etcd "
            "is running and that the store url lists its client endpoints"
        )

    async def _drop_client(self, failed: Any) -> None:
        """Forget a failed connection so the next call tries the next endpoint."""
        if self._client is not failed:
            return  # another caller already replaced it
        self._client = None
        self._current = (self._current + 1) % len(self._endpoints)
        await failed.close()

    async def _translate(self, err: rpc.AioRpcError, doing: str, client: Any) -> StoreError:
        details = err.details() or err.code().name
        if err.code() in _UNREACHABLE:
            host, port = self._endpoints[self._current]
            await self._drop_client(client)
            return StoreUnavailableError(
                f"etcd at {host}:{port} did not answer while {doing} ({details}); "
                f"check the etcd cluster ({self._names()}); the next call tries again"
            )
        if "compacted" in details:
            return _HistoryCompactedError(
                f"etcd no longer keeps the revision needed for {doing} ({details}); retry"
            )
        return StoreError(f"etcd refused {doing}: {details}")

    async def _call(self, doing: str, fn: Callable[[Any], Awaitable[T]], *, retry: bool = True) -> T:
        """Run one request; when its member is unreachable, try the next members.

        `retry` must be False for a request that could have taken effect although no
        answer came back and that would do harm applied twice: an unguarded write. Reads,
        lease calls and compare-guarded transactions are safe to repeat (a guarded write
        that did apply fails its compares the second time, which its caller handles as a
        lost race), so one dead member costs them a retry instead of an error.
        """
        attempts = len(self._endpoints) + 1 if retry else 1
        last: StoreError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(backoff_ceiling(attempt, base=0.05, cap=0.5))  # an election takes ~1 s
            try:
                client = await self._connected()
            except StoreUnavailableError as err:
                last = err
                continue
            try:
                return await fn(client)
            except rpc.AioRpcError as err:
                translated = await self._translate(err, doing, client)
                if not isinstance(translated, StoreUnavailableError):
                    raise translated from err
                last = translated
        assert last is not None
        raise last

    # -- keys ------------------------------------------------------------------------

    def _full(self, key: str) -> bytes:
        return self._ns + key.encode()

    def _prefix_range(self, prefix: str) -> tuple[bytes, bytes]:
        low = self._full(prefix)
        # b"\0" as range_end means "every key >= low" in etcd.
        return low, prefix_end(low) or b"\0"

    def _kv(self, raw: Any) -> KeyValue:
        return KeyValue(
            key=bytes(raw.key[len(self._ns) :]).decode(),
            value=bytes(raw.value),
            create_revision=raw.create_revision,
            mod_revision=raw.mod_revision,
            version=raw.version,
        )

    # -- reads -----------------------------------------------------------------------

    def _range(self, request: Any, c: Any) -> Awaitable[Any]:
        return c.kvstub.Range(request, timeout=self._timeout, metadata=c.metadata)  # type: ignore[no-any-return]

    async def get(self, key: str) -> KeyValue | None:
        request = rpc.RangeRequest(key=self._full(key))
        response = await self._call(
            f"reading {key!r}",
            lambda c: c.kvstub.Range(request, timeout=self._timeout, metadata=c.metadata),
        )
        return self._kv(response.kvs[0]) if response.kvs else None

    async def range(
        self, prefix: str, *, limit: int | None = None, start_after: str | None = None
    ) -> list[KeyValue]:
        low, high = self._prefix_range(prefix)
        if start_after is not None:
            # The smallest key after start_after is start_after + NUL.
            low = max(low, self._full(start_after) + b"\0")
        out: list[KeyValue] = []
        pinned = 0  # after the first page, read every page at that page's revision
        while limit is None or len(out) < limit:
            page = _PAGE if limit is None else min(_PAGE, limit - len(out))
            request = rpc.RangeRequest(
                key=low,
                range_end=high,
                limit=page,
                revision=pinned,
                sort_order=rpc.RangeRequest.ASCEND,
                sort_target=rpc.RangeRequest.KEY,
            )
            response = await self._call(f"listing {prefix!r}", partial(self._range, request))
            pinned = pinned or response.header.revision
            out.extend(self._kv(raw) for raw in response.kvs)
            if not response.more or not response.kvs:
                break
            low = bytes(response.kvs[-1].key) + b"\0"
        return out

    async def current_revision(self) -> int:
        request = rpc.RangeRequest(key=self._ns, count_only=True)
        response = await self._call(
            "reading the current revision",
            lambda c: c.kvstub.Range(request, timeout=self._timeout, metadata=c.metadata),
        )
        return int(response.header.revision)

    # -- writes ----------------------------------------------------------------------

    def _compare(self, compare: Compare) -> Any:
        message = rpc.Compare(
            key=self._full(compare.key),
            target=_TARGETS[compare.target],
            result=_RESULTS[compare.op],
        )
        if compare.target is Target.VALUE:
            message.value = compare.operand
        else:
            setattr(message, compare.target.value, compare.operand)
        return message

    def _request(self, op: Op) -> Any:
        if isinstance(op, Put):
            return rpc.RequestOp(request_put=rpc.PutRequest(key=self._full(op.key), value=op.value, lease=op.lease))
        if isinstance(op, Delete):
            request = rpc.DeleteRangeRequest(key=self._full(op.key))
            return rpc.RequestOp(request_delete_range=request)
        if isinstance(op, DeletePrefix):
            low, high = self._prefix_range(op.prefix)
            return rpc.RequestOp(
                request_delete_range=rpc.DeleteRangeRequest(key=low, range_end=high)
            )
        if isinstance(op, Get):
            return rpc.RequestOp(request_range=rpc.RangeRequest(key=self._full(op.key)))
        raise TypeError(f"unknown op {op!r}")  # pragma: no cover - the Op union is closed

    def _response(self, raw: Any) -> OpResponse:
        kind = raw.WhichOneof("response")
        if kind == "response_range":
            kvs = raw.response_range.kvs
            return OpResponse(kv=self._kv(kvs[0]) if kvs else None)
        if kind == "response_delete_range":
            return OpResponse(deleted=int(raw.response_delete_range.deleted))
        return OpResponse()

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        check_ops(success)
        check_ops(failure)
        request = rpc.TxnRequest(
            compare=[self._compare(c) for c in compares],
            success=[self._request(op) for op in success],
            failure=[self._request(op) for op in failure],
        )
        try:
            response = await self._call(
                "running a transaction",
                lambda c: c.kvstub.Txn(request, timeout=self._timeout, metadata=c.metadata),
                retry=bool(compares) or not any(isinstance(op, Put | Delete | DeletePrefix)
                                                for op in (*success, *failure)),
            )
        except StoreError as err:
            leases = [op.lease for op in (*success, *failure) if isinstance(op, Put) and op.lease]
            if leases and "lease not found" in str(err):
                raise LeaseNotFoundError(leases[0]) from err
            raise
        return TxnResult(
            succeeded=bool(response.succeeded),
            revision=int(response.header.revision),
            responses=tuple(self._response(r) for r in response.responses),
        )

    async def compact(self, revision: int) -> None:
        # physical=True returns only once etcd has applied it, so a watch started after
        # this call already sees the compaction.
        request = rpc.CompactionRequest(revision=revision, physical=True)
        try:
            await self._call(
                f"compacting at revision {revision}",
                lambda c: c.kvstub.Compact(request, timeout=self._timeout, metadata=c.metadata),
            )
        except _HistoryCompactedError:
            return  # already compacted at or beyond this revision: nothing to do

    # -- leases ----------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        if ttl < 1:
            raise ValueError(f"a lease must last at least 1 second, not {ttl}")
        request = rpc.LeaseGrantRequest(TTL=ttl)
        response = await self._call(
            "granting a lease",
            lambda c: c.leasestub.LeaseGrant(request, timeout=self._timeout, metadata=c.metadata),
        )
        if response.error:
            raise StoreError(f"etcd refused a lease: {response.error}")
        return int(response.ID)

    async def lease_keepalive(self, lease: int) -> int:
        async def once(client: Any) -> int:
            # LeaseKeepAlive is a stream; one request, one answer renews once. TTL 0 in
            # the answer means etcd no longer knows the lease.
            async for reply in client.leasestub.LeaseKeepAlive(
                [rpc.LeaseKeepAliveRequest(ID=lease)], timeout=self._timeout, metadata=client.metadata
            ):
                return max(0, int(reply.TTL))
            return 0

        return await self._call("renewing a lease", once)

    async def lease_revoke(self, lease: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease)
        try:
            await self._call(
                "revoking a lease",
                lambda c: c.leasestub.LeaseRevoke(request, timeout=self._timeout, metadata=c.metadata),
            )
        except StoreError as err:
            if "lease not found" not in str(err):
                raise

    # -- watch -----------------------------------------------------------------------

    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[list[Event], None]:
        client = await self._connected()
        low, high = self._prefix_range(prefix)
        seen = start_revision
        # One stream per watch (not aetcd's shared Watcher): a slow or failed watcher then
        # never delays another, and each response keeps its revision boundaries.
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=low, range_end=high, start_revision=start_revision + 1
            )
        )
        finished = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            # gRPC sends these from its own task. A direct call.write() would hang forever
            # if the call were cancelled before its headers went out (close() does that).
            # Keep the request side open until the watch ends.
            yield create
            await finished.wait()

        call = rpc.WatchStub(client.channel).Watch(requests(), metadata=client.metadata)
        self._watch_calls.add(call)
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise StoreUnavailableError(
                        f"etcd at {self._names()} ended the watch after revision {seen}; "
                        "watch again from that revision"
                    )
                if response.compact_revision:
                    raise CompactedError(seen, int(response.compact_revision))
                if response.canceled:
                    raise StoreError(f"etcd cancelled the watch: {response.cancel_reason}")
                for batch in self._batches(response.events):
                    seen = batch[0].mod_revision
                    yield batch
        except rpc.AioRpcError as err:
            if self._closed:
                return  # close() ended the stream: end quietly, like SQLite does
            raise (await self._translate(err, "watching", client)) from err
        except asyncio.CancelledError:
            # Closing the channel surfaces in a pending read as CancelledError. Swallow it
            # only when close() caused it, never when this task itself is being cancelled.
            task = asyncio.current_task()
            if self._closed and task is not None and task.cancelling() == 0:
                return
            raise
        finally:
            finished.set()
            self._watch_calls.discard(call)
            call.cancel()

    def _batches(self, events: Any) -> list[list[Event]]:
        batches: list[list[Event]] = []
        for raw in events:
            kind = EventType.DELETE if raw.type == rpc.Event.DELETE else EventType.PUT
            kv = self._kv(raw.kv)
            event = Event(kind, kv.key, kv.value if kind is EventType.PUT else b"", kv.mod_revision)
            if batches and batches[-1][0].mod_revision == event.mod_revision:
                batches[-1].append(event)
            else:
                batches.append([event])
        return batches

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for call in list(self._watch_calls):
            call.cancel()
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _describe(err: BaseException) -> str:
    if isinstance(err, rpc.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err) or type(err).__name__
