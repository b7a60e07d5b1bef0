"""`trustmesh ca show` and `trustmesh ca rotate` against a real server, on each store."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from datetime import datetime

import pytest

from tests.integration.harness import ServerProcess, wait_until


@pytest.fixture
def server(make_server: Callable[..., ServerProcess], store_url: str) -> ServerProcess:
    """One server on each store backend, with a 1 s bundle refresh hint: a prepared root may
    be activated a second after it entered the bundle."""
    env = {} if store_url == "sqlite" else {"TRUSTMESH_KEK": "11" * 32}
    return make_server(store=store_url, env=env, extra=["--bundle-refresh-hint", "1s"])


def _show(server: ServerProcess) -> dict[str, object]:
    return json.loads(server.cli("ca", "show", "--json", check=True).stdout)  # type: ignore[no-any-return]


def _states(server: ServerProcess, kind: str) -> list[str]:
    return sorted(a["state"] for a in _show(server)["authorities"] if a["kind"] == kind)  # type: ignore[index, union-attr]


def test_rotation_steps_out_of_order_are_refused_and_change_nothing(server: ServerProcess) -> None:
    before = _show(server)
    assert _states(server, "root") == ["active"] and _states(server, "jwt-key") == ["active"]
    for step, reason in (("activate", "no root is prepared"), ("retire", "nothing to retire")):
        result = server.cli("ca", "rotate", "--step", step)
        assert result.returncode == 1 and reason in result.stderr, result.stderr
    assert _show(server)["authorities"] == before["authorities"]
    audit = server.cli("audit", "show", "--kind", "ca.rotation_refused", "--json", check=True).stdout
    assert len(json.loads(audit)) == 2


def test_prepare_then_next_step_activates(server: ServerProcess) -> None:
    table = server.cli("ca", "show", check=True).stdout
    assert "root" in table and "signing-ca" in table and "jwt-key" in table and "leader replica:" in table
    prepared = server.cli("ca", "rotate", "--step", "prepare", check=True).stdout
    assert "prepared and published in the bundle" in prepared
    assert _states(server, "root") == ["active", "prepared"]
    again = server.cli("ca", "rotate", "--step", "prepare")
    assert again.returncode == 1 and "already under way" in again.stderr
    # The bundle agents bootstrap from holds both roots as soon as the new one is prepared.
    deadline = time.monotonic() + 10
    while server.bundle_path.read_bytes().count(b"BEGIN CERTIFICATE") != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.bundle_path.read_bytes().count(b"BEGIN CERTIFICATE") == 2
    # The next step, activate, once the root has been in the bundle for the refresh hint (1 s).
    results: list[subprocess.CompletedProcess[str]] = []

    def rotate() -> bool:
        results.append(server.cli("ca", "rotate"))
        return results[-1].returncode == 0

    assert wait_until(rotate), results[-1].stderr
    activated = results[-1].stdout
    assert "active; signing CAs now chain to it" in activated and "warning" not in results[-1].stderr
    assert _states(server, "root") == ["active", "old"] and _states(server, "jwt-key") == ["active", "old"]
    shown = _show(server)
    old = next(a for a in shown["authorities"] if a["kind"] == "root" and a["state"] == "old")  # type: ignore[index, union-attr]
    new = next(a for a in shown["authorities"] if a["kind"] == "root" and a["state"] == "active")  # type: ignore[index, union-attr]
    signing = [a for a in shown["authorities"] if a["kind"] == "signing-ca" and a["state"] == "active"]  # type: ignore[index, union-attr]
    assert [a["root"] for a in signing] == [new["id"]], "this replica signs under the new root at once"
    assert old["retired_at"] > 0 and new["activated_at"] > 0
    refused = server.cli("ca", "rotate", "--step", "retire")
    assert refused.returncode == 1 and "cannot be retired yet" in refused.stderr


def test_activation_before_partners_can_have_the_root_is_refused_unless_forced(
        make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(extra=["--bundle-refresh-hint", "1h"])
    server.cli("ca", "rotate", "--step", "prepare", check=True)
    prepared = next(a for a in _show(server)["authorities"] if a["state"] == "prepared")  # type: ignore[attr-defined]
    for step in ("activate", "next"):
        refused = server.cli("ca", "rotate", "--step", step)
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "Traceback" not in refused.stderr and "--force" in refused.stderr, refused.stderr
        allowed = refused.stderr.split("can be activated from ")[1].split()[0]
        # The prepared time travels in whole seconds; the allowed time is rounded up to one.
        assert 0 <= datetime.fromisoformat(allowed).timestamp() - (prepared["prepared_at"] + 3600) <= 1, allowed
    assert _states(server, "root") == ["active", "prepared"]
    forced = server.cli("ca", "rotate", "--step", "activate", "--force", check=True)
    assert "active; signing CAs now chain to it" in forced.stdout
    assert forced.stderr.startswith("warning: --force activated the new root"), forced.stderr
    assert _states(server, "root") == ["active", "old"]
    refusals = json.loads(server.cli("audit", "show", "--kind", "ca.rotation_refused", "--json", check=True).stdout)
    assert [e["subject"] for e in refusals] == ["activate", "activate"]
    assert all("can be activated from" in e["details"]["reason"] for e in refusals)
    [activated] = json.loads(server.cli("audit", "show", "--kind", "ca.root_activated", "--json", check=True).stdout)
    assert activated["details"]["forced"] is True
