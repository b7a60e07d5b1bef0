"""`trustmesh check` against real processes: a healthy server and agent pass; a stopped agent
fails naming it; a root near expiry fails with its date; no server is exit 2. The probes on
the metrics listeners answer JSON. One server and agent for the module (tests run in order)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.etcd_process import free_port
from tests.integration.harness import AgentProcess, ServerProcess, trustmesh_cmd


@dataclass
class Mesh:
    server: ServerProcess
    agent: AgentProcess
    server_metrics: int

    def check(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.server.cli("check", *args)


def _probe(port: int, path: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("check")
    server_metrics = free_port()
    server = ServerProcess(data_dir=work / "server", extra=[
        "--metrics", f"127.0.0.1:{server_metrics}", "--bundle-endpoint", "127.0.0.1:0", "--signing-workers", "0"])
    server.start()
    agent = AgentProcess(server, work / "agent")
    try:
        agent.join_token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
        agent.start()
        yield Mesh(server, agent, server_metrics)
    finally:
        agent.stop()
        server.stop()


def test_a_healthy_mesh_passes_every_check(mesh: Mesh) -> None:
    result = mesh.check()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in ("√ server reachable:", "√ leader elected:", "√ store healthy: sqlite, embedded, one member",
                 "√ certificates chain: server SVID -> signing CA", "√ root CA expiry: root ",
                 "√ signing CA expiry:", "√ agents connected: 1 of 1 connected", "√ policy converged:",
                 "√ bundle endpoint reachable: https://127.0.0.1:", "√ no permissive listeners:"):
        assert line in out, out
    assert "×" not in out and out.rstrip().endswith("checks passed")
    checks = json.loads(mesh.check("--json").stdout)
    assert all(set(c) == {"group", "name", "status", "detail", "fix"} for c in checks)
    assert {c["status"] for c in checks} == {"ok"}
    assert [c["group"] for c in checks][:1] == ["control plane"] and checks[-1]["group"] == "posture"
    # The probes: the server is ready, and says so in JSON.
    assert _probe(mesh.server_metrics, "/readyz") == (200, {"status": "ready"})
    assert _probe(mesh.server_metrics, "/healthz") == (200, {"status": "ok"})


def test_the_plain_ascii_marks_when_stdout_is_not_utf8(mesh: Mesh) -> None:
    result = subprocess.run(trustmesh_cmd("check"), capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "ascii", "PYTHONPATH": str(
                                Path(__file__).resolve().parents[2]),
                                 "TRUSTMESH_ADMIN_SOCKET": str(mesh.server.admin_socket)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ok] server reachable" in result.stdout and "√" not in result.stdout


def test_a_stopped_agent_fails_the_agents_check_by_name(mesh: Mesh) -> None:
    mesh.agent.stop()
    result = mesh.check("--stale-after", "0s")
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if "agents connected" in x)
    assert re.fullmatch(r"× agents connected: node-1 last seen \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(stale \w+\) — "
                        r"0 of 1 connected to replica \S+", line), line
    assert "    fix: start the agent again on that node" in result.stdout
    failed = [c for c in json.loads(mesh.check("--json", "--stale-after", "0s").stdout) if c["status"] != "ok"]
    assert [(c["group"], c["name"], c["status"]) for c in failed] == [("agents", "agents connected", "fail")]
    # Within --stale-after it may be reconnecting: a warning, which does not fail (unless --strict).
    patient = mesh.check("--stale-after", "1h")
    assert patient.returncode == 0 and "‼ agents connected: node-1 last seen" in patient.stdout
    assert mesh.check("--stale-after", "1h", "--strict").returncode == 1
    # The server itself stays ready: an agent is not the server's readiness.
    assert _probe(mesh.server_metrics, "/readyz")[0] == 200


def test_an_agent_probe_is_ready_once_attested_and_synced(mesh: Mesh, tmp_path: Path) -> None:
    token = mesh.server.cli("token", "create", "--node", "node-2", check=True).stdout.strip()
    agent = AgentProcess(mesh.server, tmp_path / "agent2", join_token=token)
    port = free_port()
    agent.config = tmp_path / "agent2.yaml"
    agent.config.write_text(f"metrics: 127.0.0.1:{port}\n")
    agent.start()
    try:
        assert _probe(port, "/readyz") == (200, {"status": "ready"})
        assert _probe(port, "/healthz") == (200, {"status": "ok"})
    finally:
        agent.stop()


def test_a_root_near_expiry_fails_with_its_date(tmp_path: Path) -> None:
    server = ServerProcess(data_dir=tmp_path / "short", extra=["--root-ttl", "1d", "--signing-workers", "0"]).start()
    try:
        result = server.cli("check")
        assert result.returncode == 1, result.stdout + result.stderr
        line = next(x for x in result.stdout.splitlines() if "root CA expiry" in x)
        assert re.fullmatch(r"× root CA expiry: root \S+ expires \S+Z \(in 23h\d+m, within --ca-expiry-warning 30d, "
                            r"and no successor is prepared\)", line), line
        assert "trustmesh ca rotate --step prepare" in result.stdout
        # A window that fits such short roots passes it.
        assert server.cli("check", "--ca-expiry-warning", "1h").returncode == 0
    finally:
        server.stop()


def test_no_server_is_exit_2_with_the_first_check_crossed(tmp_path: Path) -> None:
    missing = subprocess.run(trustmesh_cmd("check", "--admin-socket", str(tmp_path / "none.sock")),
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and missing.stderr == ""
    assert missing.stdout.startswith("control plane\n-------------\n× server reachable: cannot reach the trustmesh "
                                     f"server at {tmp_path / 'none.sock'}")
    as_json = subprocess.run(trustmesh_cmd("check", "--json", "--admin-socket", str(tmp_path / "none.sock")),
                             capture_output=True, text=True, timeout=60, check=False)
    assert as_json.returncode == 2
    assert [(c["name"], c["status"]) for c in json.loads(as_json.stdout)] == [("server reachable", "fail")]
    bad = subprocess.run(trustmesh_cmd("check", "--skew-max", "soon", "--admin-socket", str(tmp_path / "x")),
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("trustmesh: error: --skew-max 'soon'")
