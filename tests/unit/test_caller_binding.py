"""Binding a caller to its connection: the same process, the same program, alone on the socket."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterator

import pytest

from trustmesh.agent.caller_binding import CallerBinder, CallerChangedError, survives_exec

PYTHON = os.path.realpath(sys.executable)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_only_a_descriptor_without_close_on_exec_survives_exec(pair: tuple[socket.socket, socket.socket]) -> None:
    _, theirs = pair
    inode = os.fstat(theirs.fileno()).st_ino
    assert not survives_exec("/proc", os.getpid(), inode)
    theirs.set_inheritable(True)
    assert survives_exec("/proc", os.getpid(), inode)
    assert not survives_exec("/proc", os.getpid(), inode + 10_000_000)  # not held at all


async def test_a_caller_is_served_its_binary_selectors_only_while_they_can_be_trusted(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    binder = CallerBinder()

    async def selectors() -> list[str]:
        bound = await binder.bind(ours)  # a connection of its own each time: one scan each
        try:
            assert f"unix:path:{PYTHON}" in bound.attested
            first = await binder.check(bound, ours)
            assert await binder.check(bound, ours) == first  # the next request reuses the scan
            return first
        finally:
            bound.close()

    assert f"unix:path:{PYTHON}" in await selectors()
    # A descriptor that would survive exec: whoever holds it after an exec is not the
    # program /proc showed, so path and hash selectors go; uid and gid stay.
    theirs.set_inheritable(True)
    kept = await selectors()
    assert f"unix:uid:{os.getuid()}" in kept
    assert not [s for s in kept if s.startswith(("unix:path:", "unix:sha256:"))]
    theirs.set_inheritable(False)
    # Another process holding the client end: refused, naming it.
    child = os.fork()
    if child == 0:
        signal.pause()
        os._exit(0)
    try:
        with pytest.raises(CallerChangedError, match=f"also held by process {child}"):
            await selectors()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert f"unix:path:{PYTHON}" in await selectors()  # alone again
