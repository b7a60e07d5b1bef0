"""`trustmesh ca show` and `trustmesh ca rotate` against a real server, on each store."""

from __future__ import annotations

import json
import time

from tests.integration.harness import ServerProcess


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
    activated = server.cli("ca", "rotate", check=True).stdout  # the next step: activate
    assert "active; signing CAs now chain to it" in activated
    assert _states(server, "root") == ["active", "old"] and _states(server, "jwt-key") == ["active", "old"]
    shown = _show(server)
    old = next(a for a in shown["authorities"] if a["kind"] == "root" and a["state"] == "old")  # type: ignore[index, union-attr]
    new = next(a for a in shown["authorities"] if a["kind"] == "root" and a["state"] == "active")  # type: ignore[index, union-attr]
    signing = [a for a in shown["authorities"] if a["kind"] == "signing-ca" and a["state"] == "active"]  # type: ignore[index, union-attr]
    assert [a["root"] for a in signing] == [new["id"]], "this replica signs under the new root at once"
    assert old["retired_at"] > 0 and new["activated_at"] > 0
    refused = server.cli("ca", "rotate", "--step", "retire")
    assert refused.returncode == 1 and "cannot be retired yet" in refused.stderr
