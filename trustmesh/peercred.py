"""SO_PEERCRED: the kernel's word on which process connected to a unix socket (the agent's
Workload API and unix listeners, the server's admin socket)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Protocol, overload

from trustmesh.errors import TrustmeshError

_UCRED = struct.Struct("3i")


class PeerCredentialsError(TrustmeshError):
    """The kernel gave no usable credentials for the connection."""


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


class SocketLike(Protocol):
    """What is needed of a connected unix socket (asyncio hands out a TransportSocket, which
    is not a `socket.socket` but has getsockopt)."""

    @overload
    def getsockopt(self, level: int, optname: int, /) -> int: ...

    @overload
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def peer_credentials(sock: SocketLike) -> PeerCredentials:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as err:
        raise PeerCredentialsError(f"cannot read the caller's credentials (SO_PEERCRED): {err}") from err
    if not isinstance(raw, bytes) or len(raw) != _UCRED.size:
        raise PeerCredentialsError("the socket gave no peer credentials (is it a unix socket?)")
    pid, uid, gid = _UCRED.unpack(raw)
    if pid <= 0:
        raise PeerCredentialsError("the caller's pid is unknown (is it in another pid namespace?)")
    return PeerCredentials(pid, uid, gid)
