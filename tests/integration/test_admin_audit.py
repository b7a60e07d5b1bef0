"""The audit log says who and from where (issue 14, hole 10): local admin calls name the uid
the kernel gives for the admin socket's connection (SO_PEERCRED) and the caller's pid;
`audit show` prints actor and source."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import ServerProcess, trustmesh_cmd

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory uid 65534 can reach (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="tm-audit-"))
    directory.chmod(0o755)
    yield directory
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


def test_local_admin_calls_name_the_callers_uid(make_server: Callable[..., ServerProcess], open_dir: Path) -> None:
    sock = open_dir / "admin.sock"
    server = make_server(extra=["--admin-socket", str(sock)])
    cli = trustmesh_cmd("token", "create", "--admin-socket", str(sock), "--node")
    mine = subprocess.run([*cli, "node-1"], capture_output=True, text=True, timeout=60)
    assert mine.returncode == 0, mine.stderr
    # An operator who lets another user in (here: anyone) still learns who it was.
    sock.chmod(0o666)
    nobody = subprocess.run([*NOBODY, *cli, "node-2"], capture_output=True, text=True, timeout=60)
    assert nobody.returncode == 0, nobody.stderr

    events = json.loads(server.cli("audit", "show", "--json", "--kind", "token.create", "--admin-socket", str(sock),
                                   check=True).stdout)
    assert [(e["actor"], e["details"]["node_name"]) for e in events] == [("local-root (uid 0)", "node-1"),
                                                                         ("local (uid 65534)", "node-2")], events
    assert all(re.fullmatch(r"pid \d+", e["source"]) and e["source"] != f"pid {os.getpid()}" for e in events)
    lines = server.cli("audit", "show", "--kind", "token.create", "--admin-socket", str(sock),
                       check=True).stdout.splitlines()
    assert re.search(r" local \(uid 65534\) \[pid \d+\] -> spiffe://example.org/agent/node-2 ", lines[1]), lines
