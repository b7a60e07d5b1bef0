"""Time windows enforced by a real agent: windows placed around the current time (UTC, minute
resolution), never a fake clock. A window around now allows; one later today denies with the
window in the reason; an open connection is cut when its window closes."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.etcd_process import free_port
from tests.integration.harness import AgentProcess, ServerProcess, echo_server, wait_until
from tests.integration.test_enforcement import _talk

SELF_EXE = os.path.realpath(sys.executable)
POLICY = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-window}}
spec:
  destination: spiffe://example.org/ledger
  ports: [{port}]
  allow:
    - from: spiffe://example.org/payments
      when: {{hours: "{hours}", timezone: UTC}}
"""


@dataclass
class Mesh:
    server: ServerProcess
    agent: AgentProcess
    ledger: int
    payments: int
    policy: Path

    def window(self, start: datetime, end: datetime) -> str:
        hours = f"{start:%H:%M}-{end:%H:%M}"
        self.policy.write_text(POLICY.format(port=self.ledger, hours=hours))
        self.server.cli("policy", "apply", str(self.policy), check=True)
        return hours


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("windows")
    echo, stop_echo = echo_server()
    server = ServerProcess(data_dir=tmp / "server").start()
    ledger, payments = free_port(), free_port()
    agent = None
    try:
        for name in ("ledger", "payments"):
            server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/{name}", "--node", "node-1",
                       "--selector", f"unix:uid:{os.getuid()}", "--selector", f"unix:path:{SELF_EXE}", check=True)
        config = tmp / "agent.yaml"
        config.write_text(f"""\
services:
  - name: ledger
    spiffe_id: spiffe://example.org/ledger
    inbound: {{listen: 127.0.0.1:{ledger}, forward: 127.0.0.1:{echo}}}
  - name: payments
    spiffe_id: spiffe://example.org/payments
    outbound:
      - {{listen: 127.0.0.1:{payments}, connect: 127.0.0.1:{ledger}, expect: spiffe://example.org/ledger}}
""")
        token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
        agent = AgentProcess(server, tmp / "agent", join_token=token, config=config).start()
        assert wait_until(lambda: "inbound_listening" in agent.log() and "outbound_listening" in agent.log())
        yield Mesh(server, agent, ledger, payments, tmp / "policy.yaml")
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
        stop_echo.set()


def _allowed_eventually(mesh: Mesh, expected: bytes) -> bool:
    # The new revision reaches the agent over its sync stream: poll until it answers as expected.
    return wait_until(lambda: _talk(mesh.payments) == expected, timeout=15)


@pytest.mark.slow
def test_a_window_around_now_allows_and_one_later_denies_with_its_reason(mesh: Mesh) -> None:
    now = datetime.now(timezone.utc)
    mesh.window(now - timedelta(minutes=2), now + timedelta(minutes=30))
    assert _allowed_eventually(mesh, b"hello ledger")
    later = mesh.window(now + timedelta(hours=2), now + timedelta(hours=3))
    assert _allowed_eventually(mesh, b"")
    assert wait_until(lambda: f"outside window {later} UTC" in mesh.agent.log()), mesh.agent.log()[-2000:]
    # `policy test` against the server's policy gives the same reason.
    result = mesh.server.cli("policy", "test", "--from", "spiffe://example.org/payments",
                             "--to", "spiffe://example.org/ledger", "--port", str(mesh.ledger))
    assert result.returncode == 1 and f"outside window {later} UTC" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
def test_an_open_connection_is_cut_when_its_window_closes(mesh: Mesh) -> None:
    # Hours have minute resolution: the window ends at the next minute boundary, used only when
    # it leaves time to open a connection first (and not so much that the test idles).
    boundary = datetime.now(timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=1)
    remaining = (boundary - datetime.now(timezone.utc)).total_seconds()
    if remaining < 8:
        time.sleep(remaining + 0.2)
        boundary += timedelta(minutes=1)
        remaining = (boundary - datetime.now(timezone.utc)).total_seconds()
    if remaining > 30:
        time.sleep(remaining - 30)
    mesh.window(boundary - timedelta(minutes=10), boundary)
    assert _allowed_eventually(mesh, b"hello ledger")
    conn = socket.create_connection(("127.0.0.1", mesh.payments), timeout=10)
    try:
        conn.sendall(b"ping")
        assert conn.recv(16) == b"ping"  # opened inside the window
        conn.settimeout(max(5.0, (boundary - datetime.now(timezone.utc)).total_seconds() + 15))
        try:
            leftover = conn.recv(16)
        except ConnectionResetError:
            leftover = b""
        closed_at = datetime.now(timezone.utc)
    finally:
        conn.close()
    assert leftover == b""
    assert closed_at >= boundary - timedelta(seconds=1), "cut before its window closed"
    assert wait_until(lambda: "connections_cut" in mesh.agent.log())
    assert _talk(mesh.payments) == b""  # and a new connection is refused
