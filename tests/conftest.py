"""Shared fixtures: a real etcd for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import os

import pytest

from tests.etcd_process import EtcdNotInstalled, running_etcd


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
