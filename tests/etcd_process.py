"""Start a real, throw-away etcd for tests: free loopback ports, a temporary data dir.

Waits (bounded) until etcd answers its /health endpoint and kills it afterwards. Tests
that need etcd skip with a clear message only when no ``etcd`` binary is on PATH.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


class EtcdNotInstalled(RuntimeError):
    pass


class EtcdStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class EtcdProcess:
    client_port: int
    process: subprocess.Popen[bytes]
    data_dir: Path

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextmanager
def running_etcd() -> Iterator[EtcdProcess]:
    binary = shutil.which("etcd")
    if binary is None:
        raise EtcdNotInstalled("etcd is not on PATH; install etcd 3.4+ (scripts/test does)")
    with tempfile.TemporaryDirectory(prefix="trustmesh-etcd-") as tmp:
        data_dir = Path(tmp) / "data"
        client, peer = free_port(), free_port()
        log_path = Path(tmp) / "etcd.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    "--name", "test",
                    "--data-dir", str(data_dir),
                    "--listen-client-urls", f"http://127.0.0.1:{client}",
                    "--advertise-client-urls", f"http://127.0.0.1:{client}",
                    "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                    "--initial-cluster", f"test=http://127.0.0.1:{peer}",
                    "--logger", "zap",
                    "--log-level", "error",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        etcd = EtcdProcess(client, process, data_dir)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not _healthy(client):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise EtcdStartError(f"etcd did not become healthy on port {client}:\n{tail}")
                time.sleep(0.05)
            yield etcd
        finally:
            etcd.stop()


@dataclass
class _Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None


class EtcdCluster:
    """A real 3-member (or n-member) etcd cluster on loopback whose members can be killed,
    stopped and started again with their data, as an operator's cluster would be."""

    def __init__(self, binary: str, root: Path, size: int) -> None:
        self._binary = binary
        self.members = [
            _Member(f"m{i}", free_port(), free_port(), root / f"m{i}", root / f"m{i}.log") for i in range(size)
        ]
        self._initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        self._started_once: set[int] = set()

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def start(self, i: int) -> None:
        member = self.members[i]
        if member.process is not None and member.process.poll() is None:
            return
        state = "existing" if i in self._started_once else "new"
        with open(member.log_path, "ab") as log:
            member.process = subprocess.Popen(
                [
                    self._binary, "--name", member.name, "--data-dir", str(member.data_dir),
                    "--listen-client-urls", f"http://127.0.0.1:{member.client_port}",
                    "--advertise-client-urls", f"http://127.0.0.1:{member.client_port}",
                    "--listen-peer-urls", f"http://127.0.0.1:{member.peer_port}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{member.peer_port}",
                    "--initial-cluster", self._initial, "--initial-cluster-state", state,
                    "--initial-cluster-token", "trustmesh-test",
                    # Fast failure detection, so a lost leader is replaced in about a second.
                    "--heartbeat-interval", "50", "--election-timeout", "500",
                    "--logger", "zap", "--log-level", "error",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )
        self._started_once.add(i)

    def wait_healthy(self, i: int, timeout: float = START_TIMEOUT) -> None:
        member = self.members[i]
        deadline = time.monotonic() + timeout
        while not _healthy(member.client_port):
            if member.process is None or member.process.poll() is not None or time.monotonic() > deadline:
                tail = member.log_path.read_text(errors="replace")[-2000:]
                raise EtcdStartError(f"etcd member {member.name} did not become healthy:\n{tail}")
            time.sleep(0.05)

    def kill(self, i: int) -> None:
        """SIGKILL: no goodbye to the cluster, as when a host dies."""
        process = self.members[i].process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def stop(self, i: int) -> None:
        process = self.members[i].process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)


@contextmanager
def running_etcd_cluster(size: int = 3) -> Iterator[EtcdCluster]:
    binary = shutil.which("etcd")
    if binary is None:
        raise EtcdNotInstalled("etcd is not on PATH; install etcd 3.4+ (scripts/test does)")
    with tempfile.TemporaryDirectory(prefix="trustmesh-etcd-cluster-") as tmp:
        cluster = EtcdCluster(binary, Path(tmp), size)
        try:
            for i in range(size):
                cluster.start(i)
            for i in range(size):
                cluster.wait_healthy(i)
            yield cluster
        finally:
            for i in range(size):
                cluster.stop(i)
