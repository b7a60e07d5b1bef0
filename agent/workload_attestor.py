"""Workload attestation: who is on the other end of the Workload API socket, from the kernel.

SO_PEERCRED gives the caller's pid, uid and gid as the kernel recorded them at connect();
/proc gives its executable. Nothing the caller says is used. Selectors:

- ``unix:uid:N`` and ``unix:gid:N`` from SO_PEERCRED (the effective ids at connect time);
- ``unix:user:NAME`` and ``unix:group:NAME`` when the passwd/group databases name them;
- ``unix:path:/abs/exe`` from /proc/PID/exe and ``unix:sha256:HEX`` of that very file
  (hashed once per (device, inode, size, mtime), at most ``MAX_HASH_BYTES``). A binary
  deleted since it started gets neither: its path names nothing any more. A script's
  executable is its interpreter, as with every attestor built on /proc/PID/exe.

Supplementary groups are deliberately not selectors: /proc/PID/status shows the groups
of now, not of connect time, and folding them into ``unix:gid`` would let an entry meant
for one primary group match every member of it (SPIRE keeps them as a separate type,
which trustmesh.selectors does not define).

pid reuse: the pid from SO_PEERCRED is only a number. Where the kernel offers
SO_PEERPIDFD (Linux 6.5+) we hold a pidfd to the very process that connected and check,
before and after reading /proc, that it is still alive under that pid, so /proc/PID can
only have been that process. Everywhere, the start time in /proc/PID/stat is read before
and after; a change, or a process that is gone, fails attestation. Without a pidfd a
process that exited and whose pid was taken before the first read cannot be told apart;
that window is as wide as the time between connect() and the first request.

Without root (or CAP_SYS_PTRACE) /proc/PID/exe of another user's process cannot be read;
such callers get no path or sha256 selectors, only the uid/gid ones.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import os
import pwd
import socket
import stat
from collections import OrderedDict
from collections.abc import Callable

from trustmesh.errors import TrustmeshError
from trustmesh.peercred import PeerCredentials as PeerCredentials
from trustmesh.peercred import PeerCredentialsError
from trustmesh.peercred import SocketLike as SocketLike
from trustmesh.peercred import peer_credentials as read_peer_credentials

MAX_HASH_BYTES = 1 << 30
HASH_CACHE_SIZE = 4096
# Not in Python 3.11's socket module; the value is the same on every Linux architecture
# that uses the generic socket option numbers (x86, arm, riscv, ...).
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_DELETED = " (deleted)"


class WorkloadAttestationError(TrustmeshError):
    """The caller could not be attested (Workload API: UNAVAILABLE, so clients retry)."""


def peer_credentials(sock: SocketLike) -> PeerCredentials:
    try:
        return read_peer_credentials(sock)
    except PeerCredentialsError as err:
        raise WorkloadAttestationError(str(err)) from err


def _peer_pidfd(sock: SocketLike) -> int | None:
    """A pidfd of the process that connected, or None where the kernel has no SO_PEERPIDFD."""
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError:
        return None  # ENOPROTOOPT before Linux 6.5: fall back to start times alone
    return fd if isinstance(fd, int) and fd >= 0 else None


def _pidfd_pid(pidfd: int) -> int:
    """The pid the pidfd's process has in our namespace; -1 once it has exited."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError) as err:
        raise WorkloadAttestationError(f"cannot read the caller's pidfd: {err}") from err
    raise WorkloadAttestationError("the kernel shows no pid for the caller's pidfd")


def _start_time(proc: str, pid: int) -> str:
    """Field 22 of /proc/PID/stat, counted after the parenthesised command name, which may
    itself hold spaces and parentheses (so split after the last ')')."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise WorkloadAttestationError(f"process {pid} is gone") from err
    fields = data[data.rfind(b")") + 1:].split()
    if len(fields) < 20:
        raise WorkloadAttestationError(f"cannot read the start time of process {pid}")
    return fields[19].decode("ascii", "replace")


def _names(uid: int, gid: int) -> list[str]:
    out = []
    try:
        out.append(f"unix:user:{pwd.getpwuid(uid).pw_name}")
    except KeyError:
        pass  # a uid without a passwd entry (common in containers): uid selectors only
    try:
        out.append(f"unix:group:{grp.getgrgid(gid).gr_name}")
    except KeyError:
        pass
    return out


class _BinaryChanged(Exception):
    """The file under /proc/PID/exe changed while it was hashed."""


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_Key = tuple[int, int, int, int]


def _file_key(st: os.stat_result) -> _Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class WorkloadAttestor:
    """Derives a caller's selectors. `proc` is where /proc is read (tests point it at a fake
    tree); `hasher(path) -> hex` hashes a binary (tests count its calls)."""

    def __init__(self, proc: str = "/proc", hasher: Callable[[str], str] | None = None,
                 max_hash_bytes: int = MAX_HASH_BYTES) -> None:
        self._proc = proc
        self._hasher = hasher or _sha256_file
        self._max_hash_bytes = max_hash_bytes
        self._hash_cache: OrderedDict[_Key, str] = OrderedDict()
        # One hash per binary even when a thousand of its processes connect at once.
        self._hashing: dict[_Key, asyncio.Future[str]] = {}
        # Likewise one user/group lookup per (uid, gid) at a time: callers arriving while it
        # runs share its answer (nothing is kept after it, so a renamed user shows at once).
        self._naming: dict[tuple[int, int], asyncio.Future[list[str]]] = {}

    async def attest(self, sock: SocketLike) -> list[str]:
        creds = peer_credentials(sock)
        pidfd = _peer_pidfd(sock)
        if pidfd is None:
            return await self.selectors_for(creds)
        try:
            self._check_pidfd(pidfd, creds.pid)
            selectors = await self.selectors_for(creds)
            self._check_pidfd(pidfd, creds.pid)
            return selectors
        finally:
            os.close(pidfd)

    @staticmethod
    def _check_pidfd(pidfd: int, pid: int) -> None:
        now = _pidfd_pid(pidfd)
        if now != pid:
            raise WorkloadAttestationError(f"process {pid} is gone (it exited after connecting)")

    async def selectors_for(self, creds: PeerCredentials) -> list[str]:
        before = _start_time(self._proc, creds.pid)
        selectors = [f"unix:uid:{creds.uid}", f"unix:gid:{creds.gid}"]
        selectors += await self._names(creds.uid, creds.gid)
        exe_link = f"{self._proc}/{creds.pid}/exe"
        try:
            exe = os.readlink(exe_link)
        except OSError:
            exe = ""  # a kernel thread, a zombie, or no permission: no path selectors
        if exe.startswith("/") and not exe.endswith(_DELETED):
            selectors.append(f"unix:path:{exe}")
            digest = await self._sha256(exe_link)
            if digest:
                selectors.append(f"unix:sha256:{digest}")
        if _start_time(self._proc, creds.pid) != before:
            raise WorkloadAttestationError(f"process {creds.pid} was replaced during attestation (pid reuse)")
        return selectors

    async def _names(self, uid: int, gid: int) -> list[str]:
        key = (uid, gid)
        task = self._naming.get(key)
        if task is None:
            # NSS may be LDAP or sssd: never block the event loop on it.
            task = asyncio.ensure_future(asyncio.to_thread(_names, uid, gid))
            self._naming[key] = task
            task.add_done_callback(lambda done: self._named(key, done))
        # shield: one caller hanging up must not cancel the lookup others wait for.
        return list(await asyncio.shield(task))

    def _named(self, key: tuple[int, int], task: asyncio.Future[list[str]]) -> None:
        if self._naming.get(key) is task:
            del self._naming[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failure reaches the waiters, never "never retrieved"

    async def _sha256(self, path: str) -> str | None:
        """The sha256 of the file `path` resolves to, or None when it is too large or unreadable."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size > self._max_hash_bytes:
            return None
        key = _file_key(st)
        cached = self._hash_cache.get(key)
        if cached is not None:
            self._hash_cache.move_to_end(key)
            return cached
        task = self._hashing.get(key)
        if task is None:
            # Held in self._hashing until done; the callback fills the cache and always
            # retrieves the outcome, so no failure goes unseen when every waiter has left.
            task = asyncio.ensure_future(asyncio.to_thread(self._hash_pinned, path, key))
            self._hashing[key] = task
            task.add_done_callback(lambda done: self._hashed(key, done))
        try:
            # shield: one caller hanging up must not cancel the hash others wait for.
            return await asyncio.shield(task)
        except (OSError, _BinaryChanged) as err:
            raise WorkloadAttestationError(
                f"could not hash the caller's binary {path}; try again ({type(err).__name__})") from err

    def _hashed(self, key: _Key, task: asyncio.Future[str]) -> None:
        self._hashing.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        self._hash_cache[key] = task.result()
        while len(self._hash_cache) > HASH_CACHE_SIZE:
            self._hash_cache.popitem(last=False)

    def _hash_pinned(self, path: str, key: _Key) -> str:
        """Hash exactly the file that was stat'ed: open it, check it is still that file, hash
        it through our own descriptor, and check again, so a cached digest always belongs to
        its (dev, inode, size, mtime) key."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _file_key(os.fstat(fd)) != key:
                raise _BinaryChanged(path)
            digest = self._hasher(f"/proc/self/fd/{fd}")
            if _file_key(os.fstat(fd)) != key:
                raise _BinaryChanged(path)
            return digest
        finally:
            os.close(fd)

