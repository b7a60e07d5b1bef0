"""Workload attestation: who is on the other end of the Workload API socket, from the kernel.

SO_PEERCRED gives the caller's pid, uid and gid as the kernel recorded them at connect();
/proc gives its executable. Nothing the caller says is used. Selectors:
``unix:uid``, ``unix:gid``, ``unix:user``, ``unix:group`` (primary group), ``unix:path``
(/proc/PID/exe) and ``unix:sha256`` (of that binary, hashed once per inode and mtime).

pid reuse: the process's start time is read before and after deriving the selectors; if it
changed (the pid now names another process) or the process is gone, attestation fails.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import os
import pwd
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from trustmesh.errors import TrustmeshError

MAX_HASH_BYTES = 1 << 30
_UCRED = struct.Struct("3i")


class WorkloadAttestationError(TrustmeshError):
    """The caller could not be attested (Workload API: UNAVAILABLE)."""


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as err:
        raise WorkloadAttestationError(f"cannot read the caller's credentials (SO_PEERCRED): {err}") from err
    pid, uid, gid = _UCRED.unpack(raw)
    if pid <= 0:
        raise WorkloadAttestationError("the caller's pid is unknown (is it in another pid namespace?)")
    return PeerCredentials(pid, uid, gid)


def _start_time(proc: str, pid: int) -> str:
    """Field 22 of /proc/PID/stat (after the parenthesised command name, which may hold spaces)."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise WorkloadAttestationError(f"process {pid} is gone") from err
    rest = data[data.rfind(b")") + 2:].split()
    return rest[19].decode()


class WorkloadAttestor:
    def __init__(self, proc: str = "/proc", hasher: Callable[[str], str] | None = None) -> None:
        self._proc = proc
        self._hash_cache: dict[tuple[int, int, int, int], str] = {}
        self._hasher = hasher or _sha256_file

    async def attest(self, sock: socket.socket) -> list[str]:
        creds = peer_credentials(sock)
        return await self.selectors_for(creds)

    async def selectors_for(self, creds: PeerCredentials) -> list[str]:
        before = _start_time(self._proc, creds.pid)
        selectors = [f"unix:uid:{creds.uid}", f"unix:gid:{creds.gid}"]
        try:
            selectors.append(f"unix:user:{pwd.getpwuid(creds.uid).pw_name}")
        except KeyError:
            pass
        try:
            selectors.append(f"unix:group:{grp.getgrgid(creds.gid).gr_name}")
        except KeyError:
            pass
        try:
            exe = os.readlink(f"{self._proc}/{creds.pid}/exe")
        except OSError:
            exe = ""  # e.g. a kernel thread, or no permission: no path selectors
        if exe and not exe.endswith(" (deleted)"):
            selectors.append(f"unix:path:{exe}")
            digest = await self._sha256(f"{self._proc}/{creds.pid}/exe")
            if digest:
                selectors.append(f"unix:sha256:{digest}")
        if _start_time(self._proc, creds.pid) != before:
            raise WorkloadAttestationError(f"process {creds.pid} was replaced during attestation (pid reuse)")
        return selectors

    async def _sha256(self, path: str) -> str | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_size > MAX_HASH_BYTES:
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._hash_cache.get(key)
        if cached is None:
            try:
                cached = await asyncio.to_thread(self._hasher, path)
            except OSError:
                return None
            if len(self._hash_cache) > 4096:
                self._hash_cache.clear()
            self._hash_cache[key] = cached
        return cached


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
