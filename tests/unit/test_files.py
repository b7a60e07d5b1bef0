"""Atomic writes (trustmesh/files.py): whole or not at all, private from the first byte."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from trustmesh.files import atomic_write

write_private = atomic_write  # the agent's name for it, kept so the moved tests read as before


def _disk_full(*_args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# Moved from test_agent_attestation.py with the function they test.

def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "agent_key.pem"
    write_private(target, b"old")

    def broken_fsync(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_private(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["agent_key.pem"]


def test_the_key_is_never_readable_by_others_even_for_a_moment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real_replace = os.replace

    def spying_replace(src: str, dst: str) -> None:
        seen.append(stat.S_IMODE(os.stat(src).st_mode))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spying_replace)
    write_private(tmp_path / "k.pem", b"secret")
    assert seen == [0o600]


# New.

def test_a_write_that_fails_halfway_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"old contents")
    real_write = os.write
    calls: list[int] = []

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # a short write, as the kernel may do
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"n" * 10_000)
    monkeypatch.undo()
    assert len(calls) == 2, "a short write is continued, not taken for the whole"
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "no temp file left behind"


def test_short_writes_are_continued_until_everything_is_written(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    atomic_write(tmp_path / "f", bytes(range(256)) * 4)
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == bytes(range(256)) * 4


def test_a_failed_rename_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "bundle.pem"
    atomic_write(target, b"old", 0o644)
    monkeypatch.setattr(os, "replace", _disk_full)
    with pytest.raises(OSError):
        atomic_write(target, b"new", 0o644)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["bundle.pem"]


def test_an_interrupt_mid_write_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "k.pem", b"secret")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o400])
def test_the_file_is_0600_from_creation_and_ends_with_exactly_its_mode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int) -> None:
    created: list[int] = []
    real_fchmod = os.fchmod

    def spying_fchmod(fd: int, wanted: int) -> None:
        created.append(stat.S_IMODE(os.fstat(fd).st_mode))  # before any byte is written
        real_fchmod(fd, wanted)

    monkeypatch.setattr(os, "fchmod", spying_fchmod)
    old_umask = os.umask(0)  # a permissive umask must not widen the mode
    try:
        atomic_write(tmp_path / "f", b"data", mode)
    finally:
        os.umask(old_umask)
    assert created == [0o600]
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode


def test_no_overwrite_refuses_an_existing_file_and_leaves_it_alone(tmp_path: Path) -> None:
    target = tmp_path / "kek"
    target.write_bytes(b"theirs")
    target.chmod(0o644)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"ours", overwrite=False)
    assert target.read_bytes() == b"theirs" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["kek"]
    atomic_write(tmp_path / "new", b"ours", overwrite=False)
    assert (tmp_path / "new").read_bytes() == b"ours"
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o600


def test_no_overwrite_fails_whole_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(OSError):
        atomic_write(tmp_path / "kek", b"key", overwrite=False)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_directory_is_an_error_not_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "f", b"x")
    assert not (tmp_path / "no").exists()
