"""A local attacker on the node against a service's outbound listener (issue 13, hole 1).

`payments` has an outbound listener on loopback TCP and one on a unix socket (mode 0666). A
process that is not payments (another uid, another binary, or payments' own binary sharing its
socket with another program) must be closed before anything is dialled: between
the listener and the ledger sits a counting relay, which must see no connection and no byte
from a refused caller. The legitimate caller (this test process, which payments' entry names
by uid and binary) still reaches the ledger. Real server and agent processes, real uids."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.etcd_process import free_port
from tests.integration.harness import AgentProcess, ServerProcess, echo_server, wait_until

SELF_EXE = os.path.realpath(sys.executable)
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
# A caller under another uid: connect, send, and print what came back (hex; "" when refused).
CALLER = """
import socket, sys
target = sys.argv[1]
if target.startswith("/"):
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(target)
else:
    conn = socket.create_connection(("127.0.0.1", int(target)))
conn.settimeout(10)
conn.sendall(b"as payments")
try:
    print(conn.recv(64).hex())
except OSError:
    print("")
"""


class Relay:
    """A TCP relay between payments' outbound listener and the ledger's inbound listener:
    counts every connection and byte that leaves the listener."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.connections = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.port = self._srv.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self._srv.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
            up = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            threading.Thread(target=self._pump, args=(conn, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                if count:
                    with self._lock:
                        self.bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def seen(self) -> tuple[int, int]:
        with self._lock:
            return self.connections, self.bytes

    def close(self) -> None:
        self._stop.set()
        self._srv.close()


def _talk_tcp(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"as payments")
        try:
            return conn.recv(64)
        except OSError:
            return b""


def _talk_unix(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(b"as payments")
        try:
            return conn.recv(64)
        except OSError:
            return b""


def _as_nobody(target: str) -> bytes:
    out = subprocess.run([*NOBODY, SELF_EXE, "-I", "-c", CALLER, target], capture_output=True, text=True,
                         timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    return bytes.fromhex(out.stdout.strip())


@dataclass
class Node:
    server: ServerProcess
    agent: AgentProcess
    relay: Relay
    tcp: int
    unix: Path


@pytest.fixture
def node(make_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[Node]:
    server = make_server()
    echo_port, stop_echo = echo_server()
    ledger, tcp = free_port(), free_port()
    relay = Relay(ledger)
    public = Path(tempfile.mkdtemp(prefix="trustmesh-out-"))
    public.chmod(0o755)  # uid 65534 must reach the unix endpoint: only the agent's check may stop it
    unix = public / "payments.sock"
    for name in ("ledger", "payments"):
        server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/{name}", "--node", "node-1",
                   "--selector", f"unix:uid:{os.getuid()}", "--selector", f"unix:path:{SELF_EXE}", check=True)
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: ledger-access}\n"
                      f"spec: {{destination: spiffe://example.org/ledger, ports: [{ledger}],"
                      " allow: [{from: spiffe://example.org/payments}]}\n")
    server.cli("policy", "apply", str(policy), check=True)
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
services:
  - name: ledger
    spiffe_id: spiffe://example.org/ledger
    inbound: {{listen: 127.0.0.1:{ledger}, forward: 127.0.0.1:{echo_port}}}
  - name: payments
    spiffe_id: spiffe://example.org/payments
    outbound:
      - {{listen: 127.0.0.1:{tcp}, connect: 127.0.0.1:{relay.port}, expect: spiffe://example.org/ledger}}
      - {{listen: "unix:{unix}", mode: "0666", connect: 127.0.0.1:{relay.port}, expect: spiffe://example.org/ledger}}
""")
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=token, config=config).start()
    try:
        assert wait_until(lambda: agent.log().count("outbound_listening") == 2
                          and "inbound_listening" in agent.log()), \
            agent.log()[-3000:]
        yield Node(server, agent, relay, tcp, unix)
    finally:
        agent.stop()
        relay.close()
        stop_echo.set()


def _refused(agent: AgentProcess, reason: str, uid: int) -> bool:
    return re.search(rf"event=outbound_caller_refused .*reason={reason} .*uid={uid} pid=\d+", agent.log()) is not None


@pytest.mark.slow
def test_only_payments_own_processes_can_speak_through_its_outbound_listeners(node: Node, tmp_path: Path) -> None:
    assert oct(node.unix.stat().st_mode & 0o777) == "0o666"
    assert node.agent.proc is not None
    idle_sockets = _sockets(node.agent.proc.pid)
    # The legitimate caller, over TCP and over the unix socket: answered by the ledger.
    assert wait_until(lambda: _talk_tcp(node.tcp) == b"as payments")
    assert _talk_unix(node.unix) == b"as payments"
    before = node.relay.seen()

    # uid 65534 running payments' very binary: refused on both endpoints, nothing leaves.
    assert _as_nobody(str(node.tcp)) == b""
    assert _as_nobody(str(node.unix)) == b""
    assert node.relay.seen() == before
    assert wait_until(lambda: _refused(node.agent, "no_match", 65534)), node.agent.log()[-3000:]

    # payments' own binary and uid, but the socket is also held by another program (a caller
    # that forked and exec'd, keeping the socket): every holder must match, so refused.
    sock = socket.socket()
    try:
        child = subprocess.Popen(["sleep", "60"], pass_fds=[sock.fileno()])
        link = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
        assert wait_until(lambda: _holds(child.pid, link) and _exe(child.pid).endswith("/sleep"))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", node.tcp))
        sock.sendall(b"as payments")
        try:
            reply = sock.recv(64)
        except OSError:
            reply = b""
        assert reply == b""
    finally:
        sock.close()
        child.kill()
        child.wait()
    assert node.relay.seen() == before
    assert wait_until(lambda: re.search(rf"event=outbound_caller_refused .*reason=no_match .*pid={child.pid} "
                                       r"exe=\S+/sleep", node.agent.log()) is not None), node.agent.log()[-3000:]

    # payments' uid, but another binary (a shell): refused (its line is held back: same uid and
    # reason as the one above, within the minute).
    shell = subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{node.tcp}; printf 'as payments' >&3; "
                            "read -t 10 -N 11 reply <&3; printf '%s' \"$reply\""], capture_output=True, text=True,
                           timeout=30)
    assert shell.stdout == ""
    assert node.relay.seen() == before


    # Refusals are counted and logged rate-limited: one line per (uid, reason) a minute.
    assert len(re.findall(r"event=outbound_caller_refused .*reason=no_match .*uid=65534", node.agent.log())) == 1
    # And the legitimate caller is still served.
    assert _talk_tcp(node.tcp) == b"as payments"
    assert _talk_unix(node.unix) == b"as payments"
    # Callers that hung up leave nothing open in the agent (TLS cannot pass a half-close on,
    # so the agent closes after a short grace instead of holding four sockets for ever).
    assert wait_until(lambda: _sockets(node.agent.proc.pid) <= idle_sockets, timeout=30), \
        (idle_sockets, _sockets(node.agent.proc.pid))


def _sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            continue  # closed meanwhile
    return count


def _holds(pid: int, link: str) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == link for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""
