"""Quarantine end to end, with a real server and a real agent on loopback: payments calls the
ledger through its outbound listener and the ledger's inbound listener. A security officer
logged in over mTLS quarantines payments: the open connection is cut, new ones are refused,
the CA issues payments nothing; a viewer can list but not release; the officer releases with
step-up and traffic flows again. Quarantining the destination, or the node, cuts the same way
(from the admin socket: root, break-glass)."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.etcd_process import free_port
from tests.integration.harness import AgentProcess, ServerProcess, echo_server, wait_until
from tests.integration.operators_kit import Operator, add_operator, audit, one_line

TD = "spiffe://example.org"
PAYMENTS, LEDGER = f"{TD}/payments", f"{TD}/ledger"
SELF_EXE = os.path.realpath(sys.executable)
POLICY = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access, owner: payments-platform}}
spec:
  destination: spiffe://example.org/ledger
  ports: [{port}]
  allow:
    - from: spiffe://example.org/payments
"""


def _talk(port: int, message: bytes = b"hello ledger") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(message)
        try:
            return conn.recv(1024)
        except (ConnectionResetError, TimeoutError):
            return b""


def _open(port: int) -> socket.socket:
    """An allowed connection through payments' outbound listener, proven open with one echo."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(b"ping")
    assert conn.recv(16) == b"ping"
    return conn


def _cut_within(conn: socket.socket, seconds: float) -> float:
    """Seconds until the peer closes `conn` (a test failure if it stays open `seconds`)."""
    start = time.monotonic()
    conn.settimeout(seconds)
    try:
        leftover = conn.recv(16)
    except ConnectionResetError:
        leftover = b""
    except TimeoutError:
        leftover = b"<still open>"
    finally:
        conn.close()
    assert leftover == b"", "the connection stayed open"
    return time.monotonic() - start


@dataclass
class Mesh:
    server: ServerProcess
    agent: AgentProcess
    officer: Operator
    viewer: Operator
    payments: int


@pytest.fixture
def mesh(make_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[Mesh]:
    server = make_server(extra=["--admin-bind", "127.0.0.1:0", "--login-bind", "127.0.0.1:0"])
    admin = re.search(r"admin_bind=(\S+)", server.log())
    login = re.search(r"login_bind=(\S+)", server.log())
    assert admin and login
    setup = (server, admin.group(1), login.group(1))
    echo_port, stop_echo = echo_server()
    ledger_port, pay_port = free_port(), free_port()
    # The test process is payments' caller: its entries name it (uid and binary).
    for sid in (LEDGER, PAYMENTS):
        server.cli("entry", "create", "--spiffe-id", sid, "--node", "node-1", "--selector", f"unix:uid:{os.getuid()}",
                   "--selector", f"unix:path:{SELF_EXE}", check=True)
    (tmp_path / "policy.yaml").write_text(POLICY.format(port=ledger_port))
    server.cli("policy", "apply", str(tmp_path / "policy.yaml"), check=True)
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
services:
  - name: ledger
    spiffe_id: {LEDGER}
    inbound: {{listen: 127.0.0.1:{ledger_port}, forward: 127.0.0.1:{echo_port}}}
  - name: payments
    spiffe_id: {PAYMENTS}
    outbound:
      - {{listen: 127.0.0.1:{pay_port}, connect: 127.0.0.1:{ledger_port}, expect: {LEDGER}}}
""")
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=token, config=config).start()
    try:
        officer = add_operator(setup, tmp_path, "olga", "security-officer")
        viewer = add_operator(setup, tmp_path, "vic", "viewer")
        for person in (officer, viewer):
            assert person.login().returncode == 0
        assert wait_until(lambda: "inbound_listening" in agent.log() and "outbound_listening" in agent.log(), 20)
        yield Mesh(server, agent, officer, viewer, pay_port)
    finally:
        agent.stop()
        stop_echo.set()


@pytest.mark.slow
def test_quarantine_cuts_refuses_stops_issuance_and_release_restores(mesh: Mesh) -> None:
    officer, viewer, agent = mesh.officer, mesh.viewer, mesh.agent
    conn = _open(mesh.payments)

    added = officer.run("quarantine", "add", PAYMENTS, "--reason", "INC-4711: credential seen off the mesh")
    assert added.returncode == 0 and f"quarantined {PAYMENTS}" in added.stdout, added.stderr
    # Pushed to the agent at once; the bound leaves room for a loaded CI machine.
    assert _cut_within(conn, 10) < 5
    assert _talk(mesh.payments) == b""  # a new connection is refused
    assert wait_until(lambda: "event=connections_cut" in agent.log())

    # The CA issues payments nothing: a new entry of it on this node gets no SVID.
    mesh.server.cli("entry", "create", "--spiffe-id", PAYMENTS, "--node", "node-1", "--selector", "unix:uid:4242",
                    check=True)
    assert wait_until(lambda: "event=svid_refused" in agent.log() and "is in quarantine" in agent.log(), 15), \
        agent.log()[-3000:]

    # Every role sees what is in quarantine; a viewer cannot release it, nor an officer without step-up.
    listed = viewer.run("quarantine", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["target"] == PAYMENTS and entry["kind"] == "identity"
    assert entry["created_by"] == f"{TD}/operator/olga" and entry["reason"].startswith("INC-4711")
    one_line(viewer.run("quarantine", "release", PAYMENTS, "--reason", "fine", "--otp", "000000"), 1,
             "PERMISSION_DENIED", "does not hold a role")
    one_line(officer.run("quarantine", "release", PAYMENTS, "--reason", "fine"), 1, "--otp")
    assert _talk(mesh.payments) == b""  # still in quarantine

    released = officer.run("quarantine", "release", PAYMENTS, "--reason", "key rotated", "--otp", officer.code())
    assert released.returncode == 0 and f"released {PAYMENTS}" in released.stdout, released.stderr
    assert wait_until(lambda: _talk(mesh.payments) == b"hello ledger")

    # The destination in quarantine cuts the same way, from the admin socket (root, break-glass).
    conn = _open(mesh.payments)
    assert mesh.server.cli("quarantine", "add", LEDGER, "--reason", "INC-4712").returncode == 0
    assert _cut_within(conn, 10) < 5
    assert _talk(mesh.payments) == b""
    assert mesh.server.cli("quarantine", "release", LEDGER, "--reason", "false alarm").returncode == 0
    assert wait_until(lambda: _talk(mesh.payments) == b"hello ledger")

    # A node in quarantine: its agent refuses and cuts everything, whatever the allowlists say.
    conn = _open(mesh.payments)
    assert mesh.server.cli("quarantine", "add", "node-1", "--node", "--reason", "INC-4713").returncode == 0
    assert _cut_within(conn, 10) < 5
    assert _talk(mesh.payments) == b""
    assert mesh.server.cli("quarantine", "release", "node-1", "--reason", "reimaged").returncode == 0
    assert wait_until(lambda: _talk(mesh.payments) == b"hello ledger")

    kinds = [e["kind"] for e in audit(mesh.server, "--kind", "quarantine.add")]
    kinds += [e["kind"] for e in audit(mesh.server, "--kind", "quarantine.release")]
    assert kinds == ["quarantine.add"] * 3 + ["quarantine.release"] * 3
    refusals = [e for e in audit(mesh.server, "--kind", "svid.issue") if e["outcome"] == "denied"]
    assert refusals and isinstance(refusals[0]["details"], dict)
    assert refusals[0]["details"]["spiffe_ids"] == [PAYMENTS]
