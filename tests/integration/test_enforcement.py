"""Allowlists enforced by the agent's mTLS listeners, with real processes on loopback.

payments and frontend call the ledger through their outbound listeners; the ledger's
inbound listener terminates mTLS, verifies the caller and applies the allowlist."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.etcd_process import free_port
from tests.integration.harness import AgentProcess, ServerProcess

POLICY = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access, owner: payments-platform}}
spec:
  destination: spiffe://example.org/ledger
  ports: [{port}]
  allow:
{rules}
"""


@pytest.fixture
def echo() -> Iterator[int]:
    """A plain TCP echo service: the ledger behind its inbound listener."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join(2)
    srv.close()


def _talk(port: int, message: bytes = b"hello ledger", timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(message)
        try:
            return conn.recv(1024)
        except (ConnectionResetError, TimeoutError):
            return b""


def _policy(server: ServerProcess, tmp_path: Path, port: int, *sources: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(port=port, rules="".join(f"    - from: {s}\n" for s in sources)))
    server.cli("policy", "apply", str(path), check=True)


def _wait_for(predicate: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_allow_deny_and_a_policy_change_that_cuts_an_open_connection(
        make_server: Callable[..., ServerProcess], tmp_path: Path, echo: int) -> None:
    server = make_server()
    ledger_port, pay_port, front_port, wrong_port = free_port(), free_port(), free_port(), free_port()
    for name in ("ledger", "payments", "frontend"):
        server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/{name}", "--node", "node-1",
                   "--selector", "unix:uid:4242", check=True)
    _policy(server, tmp_path, ledger_port, "spiffe://example.org/payments")
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
services:
  - name: ledger
    spiffe_id: spiffe://example.org/ledger
    inbound: {{listen: 127.0.0.1:{ledger_port}, forward: 127.0.0.1:{echo}}}
  - name: payments
    spiffe_id: spiffe://example.org/payments
    outbound:
      - {{listen: 127.0.0.1:{pay_port}, connect: 127.0.0.1:{ledger_port}, expect: spiffe://example.org/ledger}}
  - name: frontend
    spiffe_id: spiffe://example.org/frontend
    outbound:
      - {{listen: 127.0.0.1:{front_port}, connect: 127.0.0.1:{ledger_port}, expect: spiffe://example.org/ledger}}
  - name: impostor
    spiffe_id: spiffe://example.org/frontend
    outbound:
      - {{listen: 127.0.0.1:{wrong_port}, connect: 127.0.0.1:{ledger_port}, expect: spiffe://example.org/payments}}
""")
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=token, config=config).start()
    try:
        assert _wait_for(lambda: "inbound_listening" in agent.log() and agent.log().count("outbound_listening") >= 3)
        assert _talk(pay_port) == b"hello ledger"  # payments -> ledger: allowed
        assert _talk(front_port) == b""  # frontend -> ledger: denied after the handshake
        assert _talk(wrong_port) == b""  # the server is not the SPIFFE ID this route expects
        assert _wait_for(lambda: "not the expected spiffe://example.org/payments" in agent.log())
        assert _wait_for(lambda: '"connection.denied"' in server.cli("audit", "show", "--json").stdout)
        denied = server.cli("audit", "show", "--kind", "connection.denied", "--json", check=True).stdout
        assert "spiffe://example.org/frontend" in denied and "default deny" in denied
        # An open, allowed connection is cut when the policy withdraws the allow.
        conn = socket.create_connection(("127.0.0.1", pay_port), timeout=10)
        conn.sendall(b"ping")
        assert conn.recv(16) == b"ping"
        _policy(server, tmp_path, ledger_port, "spiffe://example.org/ns/batch/*")
        cut_start = time.monotonic()
        conn.settimeout(10)
        try:
            leftover = conn.recv(16)
        except ConnectionResetError:
            leftover = b""
        assert leftover == b"" and time.monotonic() - cut_start < 5
        conn.close()
        assert _talk(pay_port) == b""
    finally:
        agent.stop()
