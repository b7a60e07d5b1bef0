"""The admin unix socket, with the kernel's word on who is calling (SO_PEERCRED).

grpcio never tells a handler who is at the other end of a unix socket: its peer string is
"unix:" and its auth context holds nothing (gRPC core reads no peer credentials, and
grpc.aio cannot serve a socket we accepted ourselves). So the server accepts on the admin
socket itself, reads SO_PEERCRED of every connection, and relays the connection's bytes to
its gRPC admin server, which listens on a socket in a private directory (mode 0700, made
for this process). Each relayed connection is bound, on our side, to a fresh name in that
directory before it connects; gRPC reports that name as the call's peer ("unix:/…/c1f"),
and `caller_of` maps it back to the uid and pid the kernel gave for the real connection.
Only this process (its user, and root) can create names in the private directory, and a
name is never reused, so a peer that is not in the table is refused, never guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import grpc

from trustmesh.files import claim_socket_path, ensure_directory
from trustmesh.logs import log_event
from trustmesh.peercred import PeerCredentials, PeerCredentialsError, peer_credentials

log = logging.getLogger("trustmesh.admin_socket")

_CHUNK = 64 * 1024


class AdminSocket:
    """Serves `server` (a gRPC server not yet started) on the unix socket `path`, mode 0600."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._private = Path(tempfile.mkdtemp(prefix="tm-admin-"))  # 0700, ours alone
        self._inner = self._private / "g"
        self._names = itertools.count(1)
        self._callers: dict[str, PeerCredentials] = {}  # bound name -> the kernel's credentials
        self._relays: set[asyncio.Task[None]] = set()
        self._listener: asyncio.AbstractServer | None = None

    async def start(self, server: grpc.aio.Server) -> None:
        # Claimed before the inner server starts, so a refusal leaves nothing running.
        ensure_directory(self._path.parent, "--admin-socket directory")
        await claim_socket_path(self._path, "another --admin-socket")
        server.add_insecure_port(f"unix:{self._inner}")
        await server.start()
        # The socket must never exist with looser permissions, not even for an instant.
        old_umask = os.umask(0o177)
        try:
            self._listener = await asyncio.start_unix_server(self._accept, path=str(self._path))
        finally:
            os.umask(old_umask)
        os.chmod(self._path, 0o600)

    def caller_of(self, peer: str | None) -> PeerCredentials | None:
        """The credentials of the process behind a call's gRPC peer ("unix:<bound name>")."""
        if not peer or not peer.startswith("unix:"):
            return None
        return self._callers.get(peer.removeprefix("unix:"))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        name = str(self._private / format(next(self._names), "x"))
        inner: socket.socket | None = None
        try:
            try:
                creds = peer_credentials(writer.get_extra_info("socket"))
            except PeerCredentialsError as err:
                log_event(log, "admin_caller_unknown", level=logging.WARNING, error=str(err))
                return
            inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            inner.setblocking(False)
            inner.bind(name)
            self._callers[name] = creds  # before connecting: gRPC may read the peer at once
            await asyncio.get_running_loop().sock_connect(inner, str(self._inner))
            os.unlink(name)  # the peer name stays the socket's address; the file is not needed
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=inner)
            inner = None  # the stream owns it now
            try:
                await asyncio.gather(_pump(reader, inner_writer), _pump(inner_reader, writer))
            finally:
                inner_writer.close()
        except OSError as err:
            log_event(log, "admin_relay_failed", level=logging.WARNING, error=str(err))
        finally:
            self._callers.pop(name, None)
            if inner is not None:
                inner.close()
            writer.close()
            self._relays.discard(task)

    async def close(self) -> None:
        """Stop accepting and end every relayed connection (after the gRPC server stopped)."""
        if self._listener is not None:
            self._listener.close()
        for relay in list(self._relays):
            relay.cancel()
        for relay in list(self._relays):
            with contextlib.suppress(asyncio.CancelledError):
                await relay
        if self._listener is not None:  # only a socket we claimed is ours to remove
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
        shutil.rmtree(self._private, ignore_errors=True)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until end of file, then half-close, so the other direction can still finish."""
    with contextlib.suppress(ConnectionError):
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
