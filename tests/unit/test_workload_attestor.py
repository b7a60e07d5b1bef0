"""The workload attestor: selectors from the kernel for this very process, and every way
attestation must refuse (a gone process, a reused pid, a socket without credentials, a
binary that changes under the hash)."""

from __future__ import annotations

import asyncio
import grp
import hashlib
import os
import pwd
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import overload

import pytest

from trustmesh.agent.workload_attestor import PeerCredentials, WorkloadAttestationError, WorkloadAttestor
from trustmesh.selectors import Selector

EXE = os.path.realpath(sys.executable)


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


class CountingHasher:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path: str) -> str:
        self.paths.append(path)
        return _digest(path)


def _stat_line(pid: int, start: int, comm: str = "python") -> str:
    # /proc/PID/stat: pid (comm) state, then fields 4..; field 22 is the start time.
    fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 10
    return f"{pid} ({comm}) {' '.join(fields)}"


def _fake_proc(root: Path, pid: int, exe: str, start: int = 100, comm: str = "python") -> Path:
    """A /proc with one process: its stat and its exe link."""
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "stat").write_text(_stat_line(pid, start, comm))
    (root / str(pid) / "exe").symlink_to(exe)
    return root / str(pid) / "stat"


async def test_this_process_attested_over_a_socketpair(pair: tuple[socket.socket, socket.socket]) -> None:
    hasher = CountingHasher()
    selectors = await WorkloadAttestor(hasher=hasher).attest(pair[0])
    assert f"unix:uid:{os.getuid()}" in selectors
    assert f"unix:gid:{os.getgid()}" in selectors
    assert f"unix:user:{pwd.getpwuid(os.getuid()).pw_name}" in selectors
    assert f"unix:group:{grp.getgrgid(os.getgid()).gr_name}" in selectors
    assert f"unix:path:{EXE}" in selectors
    assert f"unix:sha256:{_digest(EXE)}" in selectors
    assert len(selectors) == 6
    for text in selectors:
        Selector.parse(text)  # every selector is one an entry can name


async def test_the_binary_is_hashed_once_even_for_many_concurrent_callers(
        pair: tuple[socket.socket, socket.socket]) -> None:
    hasher = CountingHasher()
    attestor = WorkloadAttestor(hasher=hasher)
    results = await asyncio.gather(*(attestor.attest(pair[0]) for _ in range(20)))
    results.append(await attestor.attest(pair[1]))
    assert all(r == results[0] for r in results)
    assert len(hasher.paths) == 1


async def test_a_changed_binary_is_hashed_again(tmp_path: Path) -> None:
    binary = tmp_path / "svc"
    binary.write_bytes(b"version one")
    _fake_proc(tmp_path / "proc", 42, str(binary))
    hasher = CountingHasher()
    attestor = WorkloadAttestor(proc=str(tmp_path / "proc"), hasher=hasher)
    creds = PeerCredentials(pid=42, uid=0, gid=0)
    first = await attestor.selectors_for(creds)
    assert f"unix:sha256:{hashlib.sha256(b'version one').hexdigest()}" in first
    binary.write_bytes(b"version two, longer")
    second = await attestor.selectors_for(creds)
    assert f"unix:sha256:{hashlib.sha256(b'version two, longer').hexdigest()}" in second
    assert len(hasher.paths) == 2


async def test_a_deleted_binary_gives_no_path_or_hash(tmp_path: Path) -> None:
    _fake_proc(tmp_path / "proc", 42, "/usr/local/bin/svc (deleted)")
    selectors = await WorkloadAttestor(proc=str(tmp_path / "proc")).selectors_for(
        PeerCredentials(pid=42, uid=0, gid=0))
    assert not [s for s in selectors if s.startswith(("unix:path:", "unix:sha256:"))]
    assert "unix:uid:0" in selectors


async def test_a_binary_over_the_size_cap_gets_a_path_but_no_hash(tmp_path: Path) -> None:
    binary = tmp_path / "big"
    binary.write_bytes(b"x" * 100)
    _fake_proc(tmp_path / "proc", 42, str(binary))
    selectors = await WorkloadAttestor(proc=str(tmp_path / "proc"), max_hash_bytes=99).selectors_for(
        PeerCredentials(pid=42, uid=0, gid=0))
    assert f"unix:path:{binary}" in selectors
    assert not [s for s in selectors if s.startswith("unix:sha256:")]


async def test_a_command_name_with_spaces_and_parentheses_does_not_shift_the_start_time(tmp_path: Path) -> None:
    binary = tmp_path / "svc"
    binary.write_bytes(b"x")
    stat_file = _fake_proc(tmp_path / "proc", 42, str(binary), comm="evil) 1 2 (x")

    def flip(path: str) -> str:
        # Only the start-time field changes; a parser confused by the name would not see it.
        stat_file.write_text(_stat_line(42, 101, comm="evil) 1 2 (x"))
        return _digest(path)

    with pytest.raises(WorkloadAttestationError, match="pid reuse"):
        await WorkloadAttestor(proc=str(tmp_path / "proc"), hasher=flip).selectors_for(
            PeerCredentials(pid=42, uid=0, gid=0))


async def test_unknown_uid_and_gid_give_numeric_selectors_only() -> None:
    selectors = await WorkloadAttestor().selectors_for(PeerCredentials(pid=os.getpid(), uid=3999999, gid=3999998))
    assert "unix:uid:3999999" in selectors and "unix:gid:3999998" in selectors
    assert not [s for s in selectors if s.startswith(("unix:user:", "unix:group:"))]


# --- refusals ---------------------------------------------------------------------------------


async def test_a_process_that_exited_after_connecting_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    script = textwrap.dedent(f"""
        import socket
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect({path!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)  # connects, exits, is reaped
    conn, _ = listener.accept()
    try:
        with pytest.raises(WorkloadAttestationError, match="gone"):
            await WorkloadAttestor().attest(conn)
    finally:
        conn.close()
        listener.close()


async def test_a_pid_that_does_not_exist_is_refused() -> None:
    with pytest.raises(WorkloadAttestationError, match="gone"):
        await WorkloadAttestor().selectors_for(PeerCredentials(pid=2**22 + 7, uid=0, gid=0))


async def test_a_start_time_that_changes_during_attestation_is_refused(tmp_path: Path) -> None:
    binary = tmp_path / "svc"
    binary.write_bytes(b"x")
    stat_file = _fake_proc(tmp_path / "proc", 42, str(binary))

    def reuse_pid(path: str) -> str:
        stat_file.write_text(_stat_line(42, 999))  # the pid now names another process
        return _digest(path)

    with pytest.raises(WorkloadAttestationError, match="pid reuse"):
        await WorkloadAttestor(proc=str(tmp_path / "proc"), hasher=reuse_pid).selectors_for(
            PeerCredentials(pid=42, uid=0, gid=0))


async def test_a_process_that_vanishes_during_attestation_is_refused(tmp_path: Path) -> None:
    binary = tmp_path / "svc"
    binary.write_bytes(b"x")
    stat_file = _fake_proc(tmp_path / "proc", 42, str(binary))

    def vanish(path: str) -> str:
        stat_file.unlink()
        return _digest(path)

    with pytest.raises(WorkloadAttestationError, match="gone"):
        await WorkloadAttestor(proc=str(tmp_path / "proc"), hasher=vanish).selectors_for(
            PeerCredentials(pid=42, uid=0, gid=0))


async def test_a_malformed_stat_file_is_refused(tmp_path: Path) -> None:
    binary = tmp_path / "svc"
    binary.write_bytes(b"x")
    stat_file = _fake_proc(tmp_path / "proc", 42, str(binary))
    stat_file.write_text("42 (python) S 1 2")
    with pytest.raises(WorkloadAttestationError, match="start time"):
        await WorkloadAttestor(proc=str(tmp_path / "proc")).selectors_for(PeerCredentials(pid=42, uid=0, gid=0))


async def test_a_binary_that_changes_while_hashed_is_refused_and_not_cached(tmp_path: Path) -> None:
    binary = tmp_path / "svc"
    binary.write_bytes(b"one")
    _fake_proc(tmp_path / "proc", 42, str(binary))
    calls: list[str] = []

    def rewrite(path: str) -> str:
        calls.append(path)
        if len(calls) == 1:
            binary.write_bytes(b"two!")  # same inode, new size and mtime
        return _digest(path)

    attestor = WorkloadAttestor(proc=str(tmp_path / "proc"), hasher=rewrite)
    creds = PeerCredentials(pid=42, uid=0, gid=0)
    with pytest.raises(WorkloadAttestationError, match="try again"):
        await attestor.selectors_for(creds)
    selectors = await attestor.selectors_for(creds)  # the retry hashes the file as it is now
    assert f"unix:sha256:{hashlib.sha256(b'two!').hexdigest()}" in selectors


class FakeSocket:
    def __init__(self, ucred: bytes | None) -> None:
        self._ucred = ucred

    @overload
    def getsockopt(self, level: int, optname: int, /) -> int: ...

    @overload
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...

    def getsockopt(self, level: int, optname: int, buflen: int = 0, /) -> int | bytes:
        if self._ucred is None:
            raise OSError(9, "Bad file descriptor")
        if optname == socket.SO_PEERCRED:
            return self._ucred
        raise OSError(92, "Protocol not available")


@pytest.mark.parametrize("sock, reason", [
    (FakeSocket(struct.pack("3i", 0, 0, 0)), "pid is unknown"),  # a peer in another pid namespace
    (FakeSocket(None), "SO_PEERCRED"),  # a closed socket
    (FakeSocket(b"\x00"), "no peer credentials"),
])
async def test_sockets_without_usable_credentials_are_refused(sock: FakeSocket, reason: str) -> None:
    with pytest.raises(WorkloadAttestationError, match=reason):
        await WorkloadAttestor().attest(sock)


async def test_a_tcp_socket_is_refused() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    try:
        with pytest.raises(WorkloadAttestationError):
            await WorkloadAttestor().attest(conn)
    finally:
        for s in (conn, client, listener):
            s.close()


async def test_attestation_leaks_no_descriptors(pair: tuple[socket.socket, socket.socket]) -> None:
    attestor = WorkloadAttestor()
    await attestor.attest(pair[0])  # warm the hash cache and the thread pool
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        await attestor.attest(pair[0])
    assert len(os.listdir("/proc/self/fd")) == before
