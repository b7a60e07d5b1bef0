"""Real processes for integration tests: `trustmesh server run`, the CLI, node channels.

Everything listens on loopback with ports the OS picks; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization

from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.store import Store
from trustmesh.controlplane.store.sealing import IntegrityFailure
from trustmesh.keys import PrivateKey
from trustmesh.naming import server_dns_name
from trustmesh.spiffeid import TrustDomain

READY_TIMEOUT = 30.0


def trustmesh_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "trustmesh.cli.main", *args]


class _Process:
    """Launch a trustmesh process, wait for its `ready` line, stop it cleanly."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path | None

    def _launch(self, name: str, directory: Path, args: list[str], ready: str, timeout: float,
                env: dict[str, str] | None = None) -> re.Match[str]:
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory.parent / f"{directory.name}-{uuid.uuid4().hex[:6]}.log"
        self.proc = subprocess.Popen(args, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            match = re.search(ready, text)
            if match:
                return match
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{name} not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 10) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class ServerProcess(_Process):
    data_dir: Path
    trust_domain: str = "example.org"
    store: str = "sqlite"
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    bind: str = ""
    attest_bind: str = ""
    log_path: Path | None = None

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "admin.sock"

    @property
    def bundle_path(self) -> Path:
        return self.data_dir / "bundle.pem"

    @property
    def td(self) -> TrustDomain:
        return TrustDomain(self.trust_domain)

    def start(self, timeout: float = READY_TIMEOUT) -> ServerProcess:
        args = trustmesh_cmd(
            "server", "run", "--trust-domain", self.trust_domain, "--data-dir", str(self.data_dir),
            # A restarted server keeps its ports, as a real one would.
            "--bind", self.bind or "127.0.0.1:0", "--attest-bind", self.attest_bind or "127.0.0.1:0",
            "--store", self.store, *self.extra,
        )
        match = self._launch("server", self.data_dir, args, r"event=ready .*? bind=(\S+) attest_bind=(\S+)",
                             timeout, self.env)
        self.bind, self.attest_bind = match.group(1), match.group(2)
        return self

    # --- clients -------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = False, timeout: float = 60,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TRUSTMESH_ADMIN_SOCKET": str(self.admin_socket)}
        result = subprocess.run(trustmesh_cmd(*args), capture_output=True, text=True, env=env,
                                timeout=timeout, input=input.decode() if input else None)
        if check and result.returncode != 0:
            raise AssertionError(f"trustmesh {' '.join(args)} failed ({result.returncode}):\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def node_channel(self, key: PrivateKey | None = None, chain_pem: bytes | None = None,
                     roots_pem: bytes | None = None, address: str | None = None) -> grpc.aio.Channel:
        """A channel to the Node API with (key, chain) as client certificate; without them,
        a channel to the attestation listener (which asks for no client certificate)."""
        key_pem = None
        if key is not None:
            key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots_pem or self.bundle_path.read_bytes(),
            private_key=key_pem, certificate_chain=chain_pem,
        )
        return grpc.aio.secure_channel(
            address or (self.bind if key is not None else self.attest_bind),
            creds,
            options=[("grpc.ssl_target_name_override", server_dns_name(self.td))],
        )

    def admin_channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"unix:{self.admin_socket}")


def _public_dir() -> Path:
    """A directory every uid can reach (pytest's tmp_path is private to root), so tests can
    run workloads under other uids."""
    path = Path(tempfile.mkdtemp(prefix="trustmesh-sock-"))
    path.chmod(0o755)
    return path


@dataclass
class AgentProcess(_Process):
    """A real `trustmesh agent run` process beside a ServerProcess."""

    server: ServerProcess
    data_dir: Path
    join_token: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    socket: Path = field(default_factory=lambda: _public_dir() / "workload.sock")
    config: Path | None = None
    # More replicas of the same control plane, tried in order after `server`.
    replicas: list[ServerProcess] = field(default_factory=list)

    def start(self, timeout: float = READY_TIMEOUT) -> AgentProcess:
        args = trustmesh_cmd(
            "agent",
            "run",
            "--trust-bundle",
            str(self.server.bundle_path),
            "--data-dir",
            str(self.data_dir),
            "--socket",
            str(self.socket),
        )
        for replica in [self.server, *self.replicas]:
            args += ["--server", replica.bind, "--attest-server", replica.attest_bind]
        if self.join_token:
            args += ["--join-token", self.join_token]
        if self.config:
            args += ["--config", str(self.config)]
        self._launch("agent", self.data_dir, args, r"event=ready", timeout)
        return self


def echo_server() -> tuple[int, threading.Event]:
    """A plain TCP echo service on loopback (a service behind an inbound listener): its port,
    and the event that stops it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        with srv:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except OSError:
                    continue
                threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], stop


async def seal_as_replica(store: Store, kek_hex: str) -> Store:
    """Make a test's own handle on a server's store write and check records as another
    replica holding the same KEK would (record MACs), instead of as a writer without it."""
    async def ignore(_failure: IntegrityFailure) -> None:
        return None

    async def never() -> bool:
        return False

    await store.seal_records(KeyEncryptionKey(bytes.fromhex(kek_hex)).derive, ignore, may_upgrade=never)
    return store


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, every: float = 0.1) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (its last answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
