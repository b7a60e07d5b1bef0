"""Start a real, throw-away etcd for tests: free loopback ports, a temporary data dir.

Waits (bounded) until etcd answers its /health endpoint and kills it afterwards. Tests
that need etcd skip with a clear message only when no ``etcd`` binary is on PATH. With
``tls`` (see ``make_tls_material``) etcd serves its clients over TLS only, and with
``client_cert_auth`` also demands a client certificate from its CA.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


class EtcdNotInstalled(RuntimeError):
    pass


class EtcdStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class EtcdTls:
    """PEM files for an etcd that serves TLS: its CA, its server certificate (SAN 127.0.0.1)
    and a client certificate from the same CA; ``other_ca`` signed nothing here."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path  # a client certificate from other_ca, which etcd does not trust
    other_client_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                 issuer_key: ec.EllipticCurvePrivateKey, usage: x509.ObjectIdentifier | None) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls_material(directory: Path) -> EtcdTls:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, plus a second CA
    with its own client certificate (for refusals), as PEM files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def write(name: str, data: bytes) -> None:
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(data)
        paths[name].chmod(0o600)

    for prefix in ("", "other_"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate(f"{prefix}etcd test ca", ca_key, None, ca_key, None)
        write(f"{prefix}ca", ca.public_bytes(serialization.Encoding.PEM))
        kinds = [("client", ExtendedKeyUsageOID.CLIENT_AUTH)]
        if not prefix:
            kinds.append(("server", ExtendedKeyUsageOID.SERVER_AUTH))
        for kind, usage in kinds:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _certificate(f"{prefix}{kind}", key, ca, ca_key, usage)
            write(f"{prefix}{kind}_cert", cert.public_bytes(serialization.Encoding.PEM))
            write(f"{prefix}{kind}_key", _key_pem(key))
    return EtcdTls(**paths)


@dataclass(frozen=True)
class EtcdProcess:
    client_port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    tls: EtcdTls | None = None

    @property
    def url(self) -> str:
        """The store url: etcd+https:// when etcd serves TLS (give trustmesh --etcd-ca etc.)."""
        return f"etcd{'+https' if self.tls else ''}://127.0.0.1:{self.client_port}"

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


def _healthy(port: int, tls: EtcdTls | None = None) -> bool:
    context = None
    if tls is not None:
        context = ssl.create_default_context(cafile=str(tls.ca))
        context.load_cert_chain(tls.client_cert, tls.client_key)
    try:
        with urllib.request.urlopen(f"http{'s' if tls else ''}://127.0.0.1:{port}/health", timeout=1.0,
                                    context=context) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextmanager
def running_etcd(tls: EtcdTls | None = None, *, client_cert_auth: bool = False) -> Iterator[EtcdProcess]:
    binary = shutil.which("etcd")
    if binary is None:
        raise EtcdNotInstalled("etcd is not on PATH; install etcd 3.4+ (scripts/test does)")
    with tempfile.TemporaryDirectory(prefix="trustmesh-etcd-") as tmp:
        data_dir = Path(tmp) / "data"
        client, peer = free_port(), free_port()
        log_path = Path(tmp) / "etcd.log"
        scheme = "https" if tls else "http"
        secure: list[str] = []
        if tls is not None:
            secure = ["--cert-file", str(tls.server_cert), "--key-file", str(tls.server_key)]
            if client_cert_auth:
                secure += ["--client-cert-auth", "--trusted-ca-file", str(tls.ca)]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    "--name", "test",
                    "--data-dir", str(data_dir),
                    "--listen-client-urls", f"{scheme}://127.0.0.1:{client}",
                    "--advertise-client-urls", f"{scheme}://127.0.0.1:{client}",
                    *secure,
                    "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                    "--initial-cluster", f"test=http://127.0.0.1:{peer}",
                    "--logger", "zap",
                    "--log-level", "error",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        etcd = EtcdProcess(client, process, data_dir, tls)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not _healthy(client, tls):
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
