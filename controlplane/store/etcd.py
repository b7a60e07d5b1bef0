"""The production backend: the KV interface on an etcd v3 cluster, through ``aetcd``'s stubs.

Only etcd's generated gRPC stubs come from aetcd. Its ``Client`` is not used: it opens
plaintext channels only (no TLS, no client certificate) and never renews its auth token,
and its high-level helpers drop what the KV contract needs (``transaction`` hides the
header revision, ``get_prefix`` has no limit, ``watch`` flattens events so one
transaction's changes can no longer be told apart). ``_Connection`` is one channel to one
member, TLS and authenticated when the operator says so (``EtcdSecurity``), and every call
(reads, transactions, leases, watches) goes through it. Every key is stored under a
namespace so several deployments (and tests) can share one cluster.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

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
    StoreMember,
    Target,
    TxnResult,
    check_ops,
    prefix_end,
)
from trustmesh.errors import StoreError, StoreUnavailableError
from trustmesh.files import read_private_file
from trustmesh.hostport import join_host_port, split_host_port

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


class _TokenRenewed(StoreUnavailableError):
    """etcd refused a request for an expired auth token, unrun; a new token is in place."""


# etcd://: TLS when --etcd-ca/--etcd-cert/--etcd-key say so; etcd+https://: always TLS;
# etcd+http://: plaintext, and refused together with TLS flags.
SCHEMES = ("etcd", "etcd+https", "etcd+http")
_MAX_PASSWORD_BYTES = 4096


@dataclass(frozen=True)
class EtcdSecurity:
    """The operator's choice of how trustmesh proves itself to etcd and checks etcd back:
    paths from --etcd-ca, --etcd-cert, --etcd-key, --etcd-user and --etcd-password-file."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password_file: Path | None = None

    def problem(self, scheme: str) -> str | None:
        """What is wrong with these settings for a store url of this scheme, or None."""
        if (self.cert is None) != (self.key is None):
            return "--etcd-cert and --etcd-key go together: give both (the client certificate and its key) or neither"
        if (self.user is None) != (self.password_file is None):
            return "--etcd-user and --etcd-password-file go together: give both or neither"
        tls = self.tls_requested or scheme == "etcd+https"
        if scheme == "etcd+http" and self.tls_requested:
            return ("the store url says etcd+http:// (plaintext) but --etcd-ca/--etcd-cert/--etcd-key ask for TLS; "
                    "use etcd:// or etcd+https://")
        if self.user is not None and not tls:
            return ("--etcd-user would send its password to etcd in clear; use TLS to etcd "
                    "(--etcd-ca FILE, or an etcd+https:// store url)")
        return None

    @property
    def tls_requested(self) -> bool:
        return any(p is not None for p in (self.ca, self.cert, self.key))


@dataclass(frozen=True)
class _Access:
    """EtcdSecurity with its files read (once, at startup): what each connection uses."""

    tls: bool = False
    roots: bytes | None = None
    roots_source: str = ""  # for messages: which file the server certificate is checked against
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    cert_source: str = ""
    user: str | None = None
    password: str | None = field(default=None, repr=False)


def _read_access(security: EtcdSecurity, scheme: str) -> _Access:
    if (problem := security.problem(scheme)) is not None:
        raise StoreError(problem)
    tls = security.tls_requested or scheme == "etcd+https"
    roots = chain = key = None
    roots_source = cert_source = ""
    if tls:
        if security.ca is not None:
            roots, roots_source = _read_public(security.ca, "--etcd-ca"), f"--etcd-ca {security.ca}"
        else:
            # No --etcd-ca: the host's CA store, as OpenSSL finds it (on Debian
            # /etc/ssl/certs/ca-certificates.crt), not gRPC's own bundled list.
            paths = ssl.get_default_verify_paths()
            system = paths.cafile or paths.openssl_cafile
            try:
                roots = Path(system).read_bytes()
            except OSError as err:
                raise StoreError(f"TLS to etcd without --etcd-ca checks etcd's certificate against the system CA "
                                 f"file {system}, which cannot be read ({err.strerror}); give --etcd-ca FILE") from err
            roots_source = f"the system CA file {system} (no --etcd-ca given)"
        if security.cert is not None and security.key is not None:
            chain = _read_public(security.cert, "--etcd-cert")
            key = read_private_file(security.key, "--etcd-key", limit=1 << 16)
            cert_source = f"--etcd-cert {security.cert}"
    password = None
    if security.password_file is not None:
        raw = read_private_file(security.password_file, "--etcd-password-file", limit=_MAX_PASSWORD_BYTES)
        password = raw.decode(errors="replace").rstrip("\r\n")
        if not password:
            raise StoreError(f"--etcd-password-file {security.password_file} is empty; write the etcd "
                             "user's password in it")
    return _Access(tls, roots, roots_source, chain, key, cert_source, security.user, password)


def _read_public(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StoreError(f"cannot read {flag} {path}: {err.strerror}") from err
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise StoreError(f"{flag} {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return data


class _Connection:
    """One gRPC channel to one etcd member, the stubs on it, and the auth token (if any)
    that every request carries as metadata."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.kvstub = rpc.KVStub(channel)
        self.leasestub = rpc.LeaseStub(channel)
        self.metadata: tuple[tuple[str, str], ...] | None = None

    async def close(self) -> None:
        await self.channel.close()


def parse_endpoints(url: str) -> list[tuple[str, int]]:
    """``etcd://h1:p1,h2:p2`` -> [(h1, p1), (h2, p2)], with errors that say what to fix."""
    scheme, sep, rest = url.partition("://")
    if scheme not in SCHEMES or not sep:
        raise StoreError(f"etcd store url {url!r} must look like etcd://host:port[,host:port] "
                         "(or etcd+https://, always TLS)")
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
        self, endpoints: Sequence[tuple[str, int]], namespace: str, timeout: float, access: _Access | None = None
    ) -> None:
        if not endpoints:
            raise StoreError("no etcd endpoints given; name at least one host:port")
        if not namespace.endswith("/"):
            namespace += "/"
        self._endpoints = list(endpoints)
        self._ns = namespace.encode()
        self._timeout = timeout
        self._access = access or _Access()
        self._client: _Connection | None = None  # once connected
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
        security: EtcdSecurity | None = None,
        scheme: str = "etcd",
    ) -> EtcdKV:
        """Connect to the first endpoint that answers and proves it may use the namespace.

        Every refusal (TLS either way, user or password, a role without the namespace) is
        one StoreUnavailableError naming its cause and what to do, after at most `timeout`
        per endpoint."""
        kv = cls(endpoints, namespace, timeout, _read_access(security or EtcdSecurity(), scheme))
        await kv._connected()
        return kv

    # -- connection ------------------------------------------------------------------

    def _names(self) -> str:
        return ", ".join(f"{h}:{p}" for h, p in self._endpoints)

    async def _connected(self) -> _Connection:
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

    def _channel(self, host: str, port: int) -> grpc.aio.Channel:
        target = join_host_port(host, port)
        access = self._access
        if not access.tls:
            return grpc.aio.insecure_channel(target)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=access.roots, private_key=access.private_key, certificate_chain=access.cert_chain)
        return grpc.aio.secure_channel(target, credentials)

    async def _authenticate(self, client: _Connection) -> None:
        """Sign in as --etcd-user: etcd answers with a token that every request then carries."""
        access = self._access
        if access.user is None:
            return
        request = rpc.AuthenticateRequest(name=access.user, password=access.password or "")
        reply = await rpc.AuthStub(client.channel).Authenticate(request, timeout=self._timeout)
        client.metadata = (("token", reply.token),)

    async def _check_access(self, client: _Connection) -> None:
        """Prove that this connection may read and write the whole namespace, without writing.

        etcd checks the permissions of every operation in a transaction, whichever branch
        runs, so a transaction whose compare can never hold (a key's version below 0) and
        whose success branch deletes the namespace checks read and write rights on all of
        it and changes nothing. A role limited to another prefix, or read-only, fails here
        at startup instead of at the first write."""
        low, high = self._prefix_range("")
        never = rpc.Compare(key=self._ns, target=rpc.Compare.VERSION, result=rpc.Compare.LESS, version=0)
        request = rpc.TxnRequest(
            compare=[never],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=low, range_end=high))],
        )
        reply = await client.kvstub.Txn(request, timeout=self._timeout, metadata=client.metadata)
        if reply.succeeded:  # pragma: no cover - a version is never negative
            raise StoreError("etcd ran a transaction whose compare cannot hold; refusing to use it")

    async def _first_answering(self) -> _Connection:
        problems: list[str] = []
        n = len(self._endpoints)
        unreachable = True
        for step in range(n):
            index = (self._current + step) % n
            host, port = self._endpoints[index]
            client = _Connection(self._channel(host, port))
            try:
                await self._authenticate(client)
                await self._check_access(client)
            except rpc.AioRpcError as err:
                cause, reachable = self._explain(err)
                unreachable = unreachable and not reachable
                problems.append(f"{join_host_port(host, port)}: {cause}")
                await client.close()
                continue
            self._current = index
            return client
        hint = ("; check that etcd is running and that the store url lists its client endpoints"
                if unreachable else "")
        if n == 1:
            raise StoreUnavailableError(f"cannot use etcd at {problems[0]}{hint}")
        raise StoreUnavailableError(f"cannot use etcd at {self._names()} ({'; '.join(problems)}){hint}")

    def _explain(self, err: rpc.AioRpcError) -> tuple[str, bool]:
        """What a refused first request means, and what to do; and whether etcd answered at all."""
        details = err.details() or err.code().name
        access = self._access
        ns = self._ns.decode()
        if access.tls:
            if "CERTIFICATE_VERIFY_FAILED" in details:
                return (f"etcd's certificate is not signed by a CA in {access.roots_source}; give --etcd-ca "
                        "the CA that signed etcd's --cert-file", True)
            if "Hostname Verification" in details or "Peer name" in details:
                return ("etcd's certificate does not name this address; use the host name or IP address that "
                        "is in its subject alternative names in the store url", True)
            if any(s in details for s in ("BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "TSI_DATA_CORRUPTED",
                                          "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")):
                if access.cert_chain is None:
                    return ("etcd demands a client certificate (--client-cert-auth); give --etcd-cert and "
                            "--etcd-key", True)
                return (f"etcd refused trustmesh's client certificate ({access.cert_source}); use one signed "
                        "by a CA in etcd's --trusted-ca-file, for client authentication", True)
            if "WRONG_VERSION_NUMBER" in details or "Handshake read failed" in details:
                return ("etcd does not answer TLS here; if it serves plaintext, configure its "
                        "--cert-file/--key-file (trustmesh will not send credentials in clear)", True)
        elif "Socket closed" in details:
            return ("etcd closed the connection: does it serve TLS? Then use --etcd-ca FILE "
                    "(or an etcd+https:// store url)", True)
        if "authentication failed" in details or "invalid user" in details.lower():
            return (f"etcd refused user {access.user!r} and the password in --etcd-password-file "
                    "(wrong user or password); fix the file or the user in etcd", True)
        if "authentication is not enabled" in details:
            return ("--etcd-user is given but etcd has authentication disabled, so anyone who reaches it can "
                    "write the store; run `etcdctl auth enable` (or drop --etcd-user)", True)
        if "user name is empty" in details or "user name not found" in details:
            return ("etcd requires authentication; give --etcd-user and --etcd-password-file (or a client "
                    "certificate whose common name is an etcd user)", True)
        if err.code() == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details:
            who = f"user {access.user!r}" if access.user else "this client"
            return (f"etcd denies {who} read and write on the prefix {ns}; grant a role "
                    f"`etcdctl role grant-permission ROLE readwrite {ns} --prefix=true`", True)
        return _describe(err), err.code() not in _UNREACHABLE

    async def _drop_client(self, failed: _Connection) -> None:
        """Forget a failed connection so the next call tries the next endpoint."""
        if self._client is not failed:
            return  # another caller already replaced it
        self._client = None
        self._current = (self._current + 1) % len(self._endpoints)
        await failed.close()

    async def _translate(self, err: rpc.AioRpcError, doing: str, client: _Connection) -> StoreError:
        details = err.details() or err.code().name
        if err.code() == grpc.StatusCode.UNAUTHENTICATED and "auth token" in details and self._access.user:
            # etcd's token expired (after --auth-token-ttl idle, or a JWT's lifetime): sign in
            # again on the same channel, so open watches stay, and let the caller retry.
            try:
                await self._authenticate(client)
            except rpc.AioRpcError as again:
                return StoreUnavailableError(
                    f"etcd's auth token expired while {doing} and signing in again failed: {self._explain(again)[0]}")
            return _TokenRenewed(f"etcd's auth token expired while {doing}; signed in again, retry")
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
        attempt = 0
        extra = 1  # one more try after a renewed token, whatever `retry` says
        while attempt < attempts:
            if attempt:
                await asyncio.sleep(backoff_ceiling(attempt, base=0.05, cap=0.5))  # an election takes ~1 s
            attempt += 1
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
                if isinstance(translated, _TokenRenewed) and attempt == attempts and extra:
                    # etcd refused the request before running it: one more try, even for a write.
                    attempts, extra = attempts + 1, 0
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
            if err.code() == grpc.StatusCode.CANCELLED and self._client is not client:
                # Another call found this member dead and dropped its connection, which
                # cancels this stream locally ("Locally cancelled by application"): the
                # member is unreachable, so watch again from `seen` on the next one.
                raise StoreUnavailableError(
                    f"etcd's connection was replaced while watching (a member stopped answering); "
                    f"watch again from revision {seen}") from err
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

    # -- health ----------------------------------------------------------------------

    async def members(self) -> list[StoreMember]:
        """The cluster's members (from the member we use), each asked for its status on its
        own client URL, with this store's TLS settings and token: a member that does not
        answer, or reports an alarm (e.g. NOSPACE), is unhealthy."""
        listed = await self._call("listing the etcd members", lambda c: rpc.ClusterStub(c.channel).MemberList(
            rpc.MemberListRequest(), timeout=self._timeout, metadata=c.metadata))
        client = await self._connected()
        return list(await asyncio.gather(*(self._member(m, client.metadata) for m in listed.members)))

    async def _member(self, member: Any, metadata: tuple[tuple[str, str], ...] | None) -> StoreMember:
        name = member.name or f"{member.ID:x}"
        url = member.clientURLs[0] if member.clientURLs else ""
        if not url:
            return StoreMember(name, "", healthy=False, error="has no client URL (not started yet?)")
        try:
            host, port = split_host_port(url.partition("://")[2].rstrip("/"))
        except ValueError:
            return StoreMember(name, url, healthy=False, error=f"client URL {url!r} is not host:port")
        channel = self._channel(host, port)
        try:
            status = await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=min(self._timeout, 3.0),
                                                               metadata=metadata)
        except rpc.AioRpcError as err:
            return StoreMember(name, url, healthy=False, error=_describe(err))
        finally:
            await channel.close()
        errors = "; ".join(status.errors)
        return StoreMember(name, url, healthy=not errors, leader=status.leader == status.header.member_id,
                           error=errors)

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
