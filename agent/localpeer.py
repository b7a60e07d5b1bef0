"""Which processes hold the other end of a local connection, from the kernel.

The agent's outbound listeners speak with a service's SVID, so they must know who connected.
Nothing the caller says is used.

- **Loopback TCP** has no SO_PEERCRED. The kernel still knows the client's socket: it is the
  one whose local address is the peer address we accepted and whose remote address is ours.
  sock_diag looks it up by that four-tuple (a hash lookup, microseconds); where the kernel has
  no tcp_diag, ``/proc/net/tcp`` and ``/proc/net/tcp6`` are read whole instead, as ``ss`` does
  (milliseconds: the kernel walks its whole table). Either gives the socket's inode and its
  ``sk_uid``, the fsuid of whoever created it (only CAP_CHOWN can change it), fixed like
  SO_PEERCRED's credentials.
- **A unix socket** gives the connecting process's credentials through SO_PEERCRED; the
  client socket's inode comes from sock_diag (``UNIX_DIAG_PEER``), as ``ss -x`` reads it.

Either way the *holders* are every process with a descriptor linking to ``socket:[INODE]``
(``ss -p`` reads ``/proc/*/fd`` the same way), because a descriptor outlives the process that
made it: a caller may fork, keep the socket in a child and exec something else. The lookup
returns all of them; `PinnedHolder` then checks one, and the listener admits a connection only
when every holder passes (see trustmesh.agent.proxy.listeners).

Cost and floods: finding the holders reads the descriptor tables of root's and the socket
owner's processes, O(their descriptors), a few milliseconds. Lookups that arrive while a scan
runs wait for the next one and share it, so a flood of connections costs one scan per scan
time, not one per connection; scans are batched per socket owner, so one user's flood (or
vast descriptor table) slows only the checks of that user's own sockets.

pid reuse: a pid found in the scan is only a number. `PinnedHolder` opens a pidfd to whatever
process has that pid now, checks that this process still holds the socket and started when
the scanned one did, and `PinnedHolder.confirm` checks after the caller's selectors were read
that the pidfd's process is still alive (a pid is not reused while its process exists), so
everything read from /proc/PID in between was that process.

What this does not see, and why that is safe: processes in another pid namespace, descriptor
tables other than a process's main one (a thread that unshared its table with CLONE_FILES),
and processes under a uid that is neither the socket's owner nor root (see find_holders). A
socket none of whose holders is visible is refused. An extra holder can be hidden only by a
process of the socket owner's own uid (which could ptrace the visible holder anyway) or be
handed the socket by one (which could relay its bytes anyway). Without root (or
CAP_SYS_PTRACE) other users' descriptor tables cannot be read: run the agent as root, as the
Workload API needs for /proc/PID/exe.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from trustmesh.agent.workload_attestor import (
    PeerCredentials,
    SocketLike,
    WorkloadAttestationError,
    _start_time,  # the one reading of a process's start time (pid reuse), shared with attestation
    peer_credentials,
)
from trustmesh.errors import TrustmeshError

# sock_diag (linux/sock_diag.h, linux/unix_diag.h, linux/netlink.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_UDIAG_SHOW_PEER = 0x04
_UNIX_DIAG_PEER = 2
_NO_COOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_RTATTR = struct.Struct("=HH")
_INET_DIAG_REQ = struct.Struct("=BBBBI")  # inet_diag_req_v2 up to its inet_diag_sockid
_INET_DIAG_MSG_SIZE = 72  # inet_diag_msg: 4 bytes, the 48-byte sockid, expires, queues, uid, inode
_INET_DIAG_UID_OFFSET = 64
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


class LocalPeerError(TrustmeshError):
    """The caller could not be tied to processes on this node; `reason` is a short, fixed
    label (for metrics and aggregated audit), the message says what happened."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Holder:
    """A process seen holding the socket, and its start time when it was seen."""

    pid: int
    start_time: str


@dataclass(frozen=True)
class LocalPeer:
    """The client end of a local connection: its socket's inode (0 where the kernel cannot
    tell: a unix socket without unix_diag), the uid the kernel recorded for it (sk_uid for
    TCP, SO_PEERCRED for unix) and every process holding it."""

    inode: int
    uid: int
    holders: tuple[Holder, ...]


Endpoint = tuple[bytes, int]  # (16-byte IPv6 address, IPv4 as ::ffff:a.b.c.d; port)


def endpoint(host: str, port: int) -> Endpoint:
    """(host, port) as the kernel's tables compare it: IPv4 and IPv4-mapped IPv6 are one."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv4Address):
        address = ipaddress.IPv6Address(_V4_MAPPED + address.packed)
    return address.packed, port


def _table_endpoint(text: str) -> Endpoint:
    """`0100007F:1F90` from /proc/net/tcp{,6}: each 32-bit word of the address is printed
    in the host's byte order, the port in hex."""
    hex_address, _, hex_port = text.partition(":")
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        raw = _V4_MAPPED + raw
    return raw, int(hex_port, 16)


@dataclass(frozen=True)
class SocketRow:
    local: Endpoint
    remote: Endpoint
    uid: int
    inode: int


def parse_tcp_table(text: str) -> Iterator[SocketRow]:
    """The rows of /proc/net/tcp or /proc/net/tcp6 (a header line, then
    `sl local rem st queues timer retrnsmt uid timeout inode ...`)."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            yield SocketRow(_table_endpoint(fields[1]), _table_endpoint(fields[2]), int(fields[7]), int(fields[9]))
        except ValueError:
            continue  # a line this parser does not know is no row of ours


@dataclass(frozen=True)
class TcpQuery:
    """An accepted TCP connection, by the address it came from and the one it reached."""

    peer: Endpoint
    ours: Endpoint


def _diag_request(family: int, body: bytes) -> bytes | None:
    """One sock_diag exact lookup: the answer's payload, or None when there is no such socket."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body)
        data = nl.recv(65536)
    if len(data) < _NLMSGHDR.size:
        raise OSError("short sock_diag answer")
    length, kind = _NLMSGHDR.unpack_from(data)[:2]
    if kind == _NLMSG_ERROR:
        code = struct.unpack_from("=i", data, _NLMSGHDR.size)[0] if len(data) >= _NLMSGHDR.size + 4 else 0
        if -code == errno.ENOENT:
            return None
        raise OSError(-code, os.strerror(-code))
    return data[_NLMSGHDR.size:min(length, len(data))]


def _inet_diag(query: TcpQuery) -> SocketRow | None:
    """The client socket of `query` by an exact sock_diag lookup (a hash lookup in the kernel,
    where reading /proc/net/tcp walks the whole table: microseconds instead of milliseconds)."""
    (peer, peer_port), (ours, our_port) = query.peer, query.ours
    if peer.startswith(_V4_MAPPED) and ours.startswith(_V4_MAPPED):
        family, src, dst = socket.AF_INET, peer[12:] + bytes(12), ours[12:] + bytes(12)
    else:
        family, src, dst = socket.AF_INET6, peer, ours
    body = (_INET_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
            + struct.pack("!HH", peer_port, our_port) + src + dst
            + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE))
    answer = _diag_request(family, body)
    if answer is None or len(answer) < _INET_DIAG_MSG_SIZE:
        return None
    uid, inode = struct.unpack_from("=II", answer, _INET_DIAG_UID_OFFSET)
    return SocketRow(query.peer, query.ours, uid, inode)


def inet_diag_works() -> bool:
    """Whether sock_diag answers TCP lookups here (a kernel without tcp_diag says ENOENT for
    every socket, which must not read as "no such socket"): look up a connection of our own."""
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=1) as client:
                accepted, _ = server.accept()
                with accepted:
                    host, port = client.getsockname()
                    row = _inet_diag(TcpQuery(endpoint(host, port), endpoint(*server.getsockname())))
                    return row is not None and row.inode == os.fstat(client.fileno()).st_ino
    except OSError:
        return False


def find_tcp_sockets(queries: Iterable[TcpQuery], proc: str = "/proc",
                     netlink: bool = True) -> dict[TcpQuery, SocketRow]:
    """The client sockets of these connections that exist (inode 0, TIME_WAIT, counts as none)."""
    found: dict[TcpQuery, SocketRow] = {}
    if netlink:
        for query in queries:
            row = _inet_diag(query)
            if row is not None and row.inode:  # inode 0: TIME_WAIT, or no socket file any more
                found[query] = row
        return found
    # Without sock_diag, as ss does: read the whole tables (/proc/net/tcp{,6}) once for the batch.
    wanted = {(q.peer, q.ours): q for q in queries}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{table}", encoding="ascii", errors="replace") as handle:
                text = handle.read()
        except FileNotFoundError:
            continue  # a kernel without IPv6
        for row in parse_tcp_table(text):
            match = wanted.get((row.local, row.remote))
            if match is not None and row.inode:
                found[match] = row
    return found


def find_holders(sockets: Mapping[int, int], proc: str = "/proc", skip: int | None = None) -> dict[int, list[Holder]]:
    """Every process with a descriptor on each socket of `sockets` ({inode: owner uid}), in one
    pass over /proc/*/fd, except the process `skip` (the agent: its own table grows with its
    load, and it never holds a caller's socket).

    Only processes running as one of the sockets' owners or as root are looked at (/proc/PID
    belongs to the process's effective uid, or to root when it is not dumpable), which spares
    reading every other user's descriptors. A holder under a third uid can only have received
    the socket from a process of its owner (descriptor passing, or a fork that changed uid,
    which takes root): a process that can pass the socket on could relay its bytes anyway."""
    links = {f"socket:[{inode}]": inode for inode in sockets}
    found: dict[int, list[Holder]] = {inode: [] for inode in sockets}
    if not links:
        return found
    owners = {0, *sockets.values()}
    pids = []
    with os.scandir(proc) as entries:
        for entry in entries:
            if not entry.name.isdigit() or int(entry.name) == skip:
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid in owners:
                    pids.append(int(entry.name))
            except OSError:
                continue  # gone
    for pid in sorted(pids):
        try:
            fd_dir = os.open(f"{proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue  # gone, or a table we may not read (see the module docstring)
        try:
            hits = _hits(fd_dir, links)
            if not hits:
                continue
            try:
                start = _start_time(proc, pid)
            except WorkloadAttestationError:
                continue  # exited: it holds nothing any more
            # Read after the start time, the descriptor still there means the process that
            # started then holds the socket; a pid taken over meanwhile gets no start time,
            # so it is kept as a holder nobody can pin and the connection is refused.
            if _hits(fd_dir, {target: inode for target, inode in links.items() if inode in hits.values()}) != hits:
                start = ""
        except OSError:
            continue
        finally:
            os.close(fd_dir)
        for inode in set(hits.values()):
            found[inode].append(Holder(pid, start))
    return found


def _hits(fd_dir: int, links: dict[str, int]) -> dict[str, int]:
    """{descriptor name: inode} of the descriptors in `fd_dir` that link to one of `links`."""
    hits: dict[str, int] = {}
    for name in os.listdir(fd_dir):
        try:
            inode = links.get(os.readlink(name, dir_fd=fd_dir))
        except OSError:
            continue  # closed meanwhile
        if inode is not None:
            hits[name] = inode
    return hits


class UnixSocket(SocketLike, Protocol):
    """An accepted unix socket (asyncio hands out a TransportSocket, not a `socket.socket`)."""

    def fileno(self) -> int: ...


def unix_peer_inode(sock: UnixSocket) -> int | None:
    """The inode of the client socket connected to our unix socket `sock` (sock_diag
    UNIX_DIAG_PEER), or None where the kernel has no unix_diag."""
    ours = os.fstat(sock.fileno()).st_ino
    try:
        answer = _diag_request(socket.AF_UNIX, _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ours,
                                                                   _UDIAG_SHOW_PEER, _NO_COOKIE, _NO_COOKIE))
    except OSError:
        return None
    if answer is None or len(answer) < _UNIX_DIAG_MSG.size or _UNIX_DIAG_MSG.unpack_from(answer)[4] != ours:
        return None
    offset = _UNIX_DIAG_MSG.size
    while offset + _RTATTR.size <= len(answer):
        attr_len, attr_type = _RTATTR.unpack_from(answer, offset)
        if attr_len < _RTATTR.size:
            break
        if attr_type == _UNIX_DIAG_PEER and attr_len >= _RTATTR.size + 4:
            peer: int = struct.unpack_from("=I", answer, offset + _RTATTR.size)[0]
            return peer or None
        offset += (attr_len + 3) & ~3
    return None


K = TypeVar("K")
V = TypeVar("V")


class _Batcher(Generic[K, V]):
    """Runs `work(keys)` in a thread for every key asked for while its previous run ran, so a
    flood of lookups costs one run per run time, not one per lookup."""

    def __init__(self, work: Callable[[list[K]], Mapping[K, V]]) -> None:
        self._work = work
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.runs = 0

    async def get(self, key: K) -> V:
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())  # held here until it is done
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, {}
            self.runs += 1
            try:
                results = await asyncio.to_thread(self._work, list(batch))
            except BaseException as err:
                for future in (f for futures in batch.values() for f in futures if not f.done()):
                    if isinstance(err, Exception):
                        future.set_exception(err)
                    else:
                        future.cancel()
                if not isinstance(err, Exception):
                    raise
                continue
            for key, futures in batch.items():
                for future in futures:
                    if not future.done():  # a waiter that hung up was cancelled
                        future.set_result(results[key])


class PeerResolver:
    """Resolves callers to their holders. `proc` is where /proc is read (tests point it at a
    fake tree); `netlink` says whether sock_diag answers (None: probed once); the agent passes
    passes its own pid as `skip` (see find_holders).

    Holder scans are batched per socket owner: each uid has its own batch, which reads root's
    and that uid's processes. A user who floods the listener with connections, or keeps a vast
    descriptor table, slows only the checks of its own sockets, never another uid's."""

    def __init__(self, proc: str = "/proc", netlink: bool | None = None, skip: int | None = None) -> None:
        self._proc = proc
        self._skip = skip
        self._netlink = netlink
        self._probe: asyncio.Future[bool] | None = None
        self._tables: _Batcher[TcpQuery, SocketRow | None] = _Batcher(self._read_tables)
        self._holders: dict[int, _Batcher[int, tuple[Holder, ...]]] = {}

    @property
    def scans(self) -> int:
        """How many holder scans ran (tests and the benchmark read it)."""
        return sum(b.runs for b in self._holders.values())

    def _read_tables(self, queries: list[TcpQuery]) -> dict[TcpQuery, SocketRow | None]:
        found = find_tcp_sockets(queries, self._proc, netlink=False)
        return {q: found.get(q) for q in queries}

    async def tcp(self, peer: tuple[str, int], ours: tuple[str, int]) -> LocalPeer:
        """The holders of the client socket of an accepted TCP connection: `peer` is the
        address the connection came from, `ours` the address it reached."""
        query = TcpQuery(endpoint(*peer), endpoint(*ours))
        if self._netlink is None:
            if self._probe is None:  # one probe, however many callers arrive meanwhile
                self._probe = asyncio.ensure_future(asyncio.to_thread(inet_diag_works))
            self._netlink = await asyncio.shield(self._probe)
        try:
            if self._netlink:
                row = find_tcp_sockets([query], self._proc).get(query)  # one hash lookup: no thread needed
            else:
                row = await self._tables.get(query)
        except OSError as err:
            raise LocalPeerError("unreadable", f"cannot look the caller's socket up: {err}") from err
        if row is None:
            raise LocalPeerError("no_socket", "the caller's socket is not in this node's socket table "
                                 "(it closed, or it is in another network namespace)")
        return await self._holders_of(row.inode, row.uid)

    async def unix(self, sock: UnixSocket) -> tuple[LocalPeer, PeerCredentials]:
        """The holders of the client socket of an accepted unix connection, and SO_PEERCRED."""
        try:
            creds = peer_credentials(sock)
        except WorkloadAttestationError as err:
            raise LocalPeerError("no_credentials", str(err)) from err
        peer_inode = unix_peer_inode(sock)
        if peer_inode is not None:
            return await self._holders_of(peer_inode, creds.uid), creds
        # No unix_diag in this kernel: the connecting process is all the kernel tells us.
        try:
            connector = Holder(creds.pid, _start_time(self._proc, creds.pid))
        except WorkloadAttestationError as err:
            raise LocalPeerError("gone", f"the caller (pid {creds.pid}) is gone") from err
        return LocalPeer(0, creds.uid, (connector,)), creds

    async def _holders_of(self, inode: int, uid: int) -> LocalPeer:
        batcher = self._holders.get(uid)
        if batcher is None:
            def work(inodes: list[int]) -> dict[int, tuple[Holder, ...]]:
                found = find_holders(dict.fromkeys(inodes, uid), self._proc, self._skip)
                return {i: tuple(found[i]) for i in inodes}

            batcher = self._holders[uid] = _Batcher(work)
        try:
            holders = await batcher.get(inode)
        except OSError as err:
            raise LocalPeerError("unreadable", f"cannot read {self._proc}: {err}") from err
        if not holders:
            raise LocalPeerError("no_process", f"no process on this node visibly holds the caller's socket "
                                 f"(inode {inode}, uid {uid})")
        return LocalPeer(inode, uid, holders)


class _PidfdOpen(Protocol):
    def __call__(self, pid: int, flags: int = ..., /) -> int: ...


def _ids(proc: str, pid: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((real uid, effective uid), (real gid, effective gid)) from /proc/PID/status."""
    uids: tuple[int, int] | None = None
    gids: tuple[int, int] | None = None
    try:
        with open(f"{proc}/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"Uid:"):
                    real, effective = line.split()[1:3]
                    uids = (int(real), int(effective))
                elif line.startswith(b"Gid:"):
                    real, effective = line.split()[1:3]
                    gids = (int(real), int(effective))
    except (OSError, ValueError) as err:
        raise LocalPeerError("gone", f"process {pid} is gone") from err
    if uids is None or gids is None:
        raise LocalPeerError("gone", f"process {pid} shows no ids")
    return uids, gids


def socket_descriptors(proc: str, pid: int, inode: int) -> list[str] | None:
    """The descriptor numbers under which `pid` holds socket `inode`; None when its table
    cannot be read."""
    target = f"socket:[{inode}]"
    directory = f"{proc}/{pid}/fd"
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    found = []
    for name in names:
        try:
            if os.readlink(f"{directory}/{name}") == target:
                found.append(name)
        except OSError:
            continue  # closed meanwhile (listdir's own descriptor, for one)
    return found


def _holds(proc: str, pid: int, inode: int) -> bool:
    return bool(socket_descriptors(proc, pid, inode))


class PinnedHolder:
    """One holder of a peer socket, checked and held by a pidfd: its credentials for
    selector matching are its own effective ids, which must be the socket's uid."""

    def __init__(self, peer: LocalPeer, holder: Holder, proc: str = "/proc",
                 pidfd_open: _PidfdOpen | None = None) -> None:
        self._proc = proc
        self._holder = holder
        self._pidfd: int | None = None
        pid = holder.pid
        if not holder.start_time:
            raise LocalPeerError("pid_reused", f"process {pid} was replaced while the socket was looked up")
        opener = pidfd_open if pidfd_open is not None else getattr(os, "pidfd_open", None)
        if opener is not None:
            try:
                self._pidfd = opener(pid)
            except ProcessLookupError as err:
                raise LocalPeerError("gone", f"process {pid} is gone") from err
            except OSError:
                self._pidfd = None  # no pidfds (before Linux 5.3): start times alone
        try:
            self._check_start()
            # With the pidfd open, /proc/PID is that process: check it (still) holds the socket.
            if peer.inode and not _holds(proc, pid, peer.inode):
                raise LocalPeerError("gone", f"process {pid} no longer holds the caller's socket")
            (ruid, euid), (rgid, egid) = _ids(proc, pid)
            if ruid != euid or rgid != egid:
                # A set-user/group-ID program holding a socket someone else may have opened is
                # the classic confused deputy (its error messages written to our socket).
                raise LocalPeerError("setid", f"process {pid} runs set-user/group-ID (uid {ruid}/{euid}, "
                                     f"gid {rgid}/{egid})")
            if euid != peer.uid:
                raise LocalPeerError("uid_changed", f"process {pid} runs as uid {euid}, but the caller's socket is "
                                     f"uid {peer.uid}'s")
            self.credentials = PeerCredentials(pid, euid, egid)
        except BaseException:
            self.close()
            raise

    def _check_start(self) -> None:
        try:
            now = _start_time(self._proc, self._holder.pid)
        except WorkloadAttestationError as err:
            raise LocalPeerError("gone", str(err)) from err
        if now != self._holder.start_time:
            raise LocalPeerError("pid_reused", f"process {self._holder.pid} was replaced (pid reuse)")

    def confirm(self) -> None:
        """After reading /proc/PID: the pinned process is still the one that holds the socket."""
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, 0)
            except ProcessLookupError as err:
                raise LocalPeerError("gone", f"process {self._holder.pid} exited while it was checked") from err
        self._check_start()

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __enter__(self) -> PinnedHolder:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
