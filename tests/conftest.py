"""Shared fixtures: a real etcd for the whole session."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.etcd_process import EtcdNotInstalled, running_etcd
from trustmesh.controlplane.store import Store, open_store


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[str]:
    """The url (etcd://127.0.0.1:PORT) of a real etcd that lives for the test session."""
    try:
        with running_etcd() as etcd:
            yield etcd.url
    except EtcdNotInstalled as err:
        if os.environ.get("CI"):
            pytest.fail(f"{err}; scripts/test installs etcd-server, so CI must have it")
        pytest.skip(str(err))


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The real Store on each backend: SQLite in tmp_path, or a fresh namespace on etcd."""
    if request.param == "sqlite":
        s = await open_store("sqlite", tmp_path)
    else:
        s = await open_store(f"{request.getfixturevalue('etcd_server')}/t{uuid.uuid4().hex[:10]}", tmp_path)
    yield s
    await s.close()


# The longest test files, started first: with `--dist loadfile` a worker takes the next file
# when it is free, so a long file collected last would run alone at the end while the other
# workers idle (CI's wall time). Order within a file is kept.
# test_windows.py waits for a wall-clock minute boundary (windows have minute resolution).
LONG_FILES = ("test_bench.py", "test_ha.py", "test_demo.py", "test_windows.py", "test_agent.py", "test_operators.py",
              "test_federation.py", "test_console_browser.py", "test_console_api.py", "test_flows.py",
              "test_quarantine.py", "test_detection.py", "test_admin_cli.py", "test_access.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    last = len(LONG_FILES)
    items.sort(key=lambda item: rank.get(item.path.name, last) if item.path.parent.name == "integration" else last)
