"""Fixtures that start real trustmesh server processes (SQLite, and etcd)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import ServerProcess


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers on demand; every one is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def make(name: str = "server", **kwargs: object) -> ServerProcess:
        server = ServerProcess(data_dir=tmp_path / name, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
def store_url(request: pytest.FixtureRequest) -> str:
    """'sqlite', or a fresh namespace on the session's real etcd."""
    if request.param == "sqlite":
        return "sqlite"
    etcd: str = request.getfixturevalue("etcd_server")
    return f"{etcd}/t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def server(make_server: Callable[..., ServerProcess], store_url: str) -> ServerProcess:
    """One running server on each store backend (the test runs once per backend)."""
    env = {}
    if store_url != "sqlite":
        env["TRUSTMESH_KEK"] = "11" * 32
    return make_server(store=store_url, env=env)


@pytest.fixture
def admin_server(make_server: Callable[..., ServerProcess]) -> Iterator[tuple[ServerProcess, str, str]]:
    """A server with the admin listener and the login listener on loopback: (server, admin, login)."""
    server = make_server(extra=["--admin-bind", "127.0.0.1:0", "--login-bind", "127.0.0.1:0"])
    log = server.log()
    admin = re.search(r"admin_bind=(\S+)", log)
    login = re.search(r"login_bind=(\S+)", log)
    assert admin and login
    yield server, admin.group(1), login.group(1)
