"""Allowlists enforced by the agent's mTLS listeners, with real processes on loopback.

payments and frontend call the ledger through their outbound listeners; the ledger's
inbound listener terminates mTLS, verifies the caller and applies the allowlist."""

from __future__ import annotations

import os
import re
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.etcd_process import free_port
from tests.integration.harness import AgentProcess, ServerProcess, echo_server, wait_until

SELF_EXE = os.path.realpath(sys.executable)
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
    port, stop = echo_server()
    yield port
    stop.set()


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


@dataclass
class Mesh:
    server: ServerProcess
    agent: AgentProcess
    ledger: int
    payments: int
    frontend: int
    wrong: int
    metrics: int

    def metric(self, name: str, **labels: str) -> float:
        """One sample from the agent's /metrics (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).read().decode()
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}} "):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture
def mesh(make_server: Callable[..., ServerProcess], tmp_path: Path, echo: int) -> Iterator[Mesh]:
    server = make_server()
    ledger_port, pay_port, front_port, wrong_port, metrics = free_port(), free_port(), free_port(), free_port(), \
        free_port()
    # The test process itself is the services' caller, so their entries name it (uid and binary):
    # an outbound listener admits only processes its service's entry matches.
    for name in ("ledger", "payments", "frontend"):
        server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/{name}", "--node", "node-1",
                   "--selector", f"unix:uid:{os.getuid()}", "--selector", f"unix:path:{SELF_EXE}", check=True)
    _policy(server, tmp_path, ledger_port, "spiffe://example.org/payments")
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
metrics: 127.0.0.1:{metrics}
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
        assert wait_until(lambda: "inbound_listening" in agent.log() and agent.log().count("outbound_listening") >= 3)
        yield Mesh(server, agent, ledger_port, pay_port, front_port, wrong_port, metrics)
    finally:
        agent.stop()


@pytest.mark.slow
def test_allow_deny_and_a_policy_change_that_cuts_an_open_connection(mesh: Mesh, tmp_path: Path) -> None:
    server, agent = mesh.server, mesh.agent
    pay_port, front_port, wrong_port, ledger_port = mesh.payments, mesh.frontend, mesh.wrong, mesh.ledger
    assert _talk(pay_port) == b"hello ledger"  # payments -> ledger: allowed
    assert _talk(front_port) == b""  # frontend -> ledger: denied after the handshake
    assert _talk(wrong_port) == b""  # the server is not the SPIFFE ID this route expects
    assert wait_until(lambda: "not the expected spiffe://example.org/payments" in agent.log())
    assert wait_until(lambda: '"flows.reported"' in server.cli("audit", "show", "--json").stdout)
    denied = server.cli("audit", "show", "--kind", "flows.reported", "--json", check=True).stdout
    assert "spiffe://example.org/frontend" in denied and "default deny" in denied
    assert "not observed by the server" in denied  # the agent's claim, labelled as such
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


def _tls_client(port: int, ctx: ssl.SSLContext) -> bytes:
    """Try a TLS client against the inbound listener; b"" when refused at any stage."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="ledger") as tls:
                tls.sendall(b"hello")
                return tls.recv(64)
    except (ssl.SSLError, OSError):
        return b""


def _self_signed(td: str = "example.org", path: str = "/payments") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{td}{path}")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    directory = Path(tempfile.mkdtemp())
    (directory / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return directory / "c.pem", directory / "k.pem"


@pytest.mark.slow
def test_hostile_clients_are_refused_and_everyone_else_keeps_being_served(mesh: Mesh) -> None:
    def client(cert: tuple[Path, Path] | None = None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx

    assert _tls_client(mesh.ledger, client()) == b""  # no client certificate
    assert _tls_client(mesh.ledger, client(_self_signed())) == b""  # our ID, but an unknown CA
    assert _tls_client(mesh.ledger, client(version=ssl.TLSVersion.TLSv1_2)) == b""  # TLS 1.3 only by default
    # Each refusal at the handshake is seen: logged with its reason and source, and counted.
    for reason in ("no_client_certificate", "unknown_ca", "protocol"):
        pattern = rf"event=handshake_refused service=ledger peer=127\.0\.0\.1:\d+ reason={reason} "
        assert wait_until(lambda p=pattern: re.search(p, mesh.agent.log()) is not None), reason
        assert mesh.metric("trustmesh_proxy_refusals_total", service="ledger", kind="handshake", reason=reason) == 1
    # Logged once a minute per source address and reason, however many come: a flood is counted, not echoed.
    for _ in range(20):
        _tls_client(mesh.ledger, client())
    assert mesh.metric("trustmesh_proxy_refusals_total", service="ledger", kind="handshake",
                       reason="no_client_certificate") == 21
    assert mesh.agent.log().count("reason=no_client_certificate") == 1
    # Half-open handshakes and a flood of connections do not starve anyone.
    idle = [socket.create_connection(("127.0.0.1", mesh.ledger), timeout=5) for _ in range(50)]
    flood = []
    for _ in range(200):
        try:
            flood.append(socket.create_connection(("127.0.0.1", mesh.ledger), timeout=5))
        except OSError:
            break
    assert _talk(mesh.payments) == b"hello ledger"
    for s in idle + flood:
        s.close()
    assert mesh.agent.proc is not None and mesh.agent.proc.poll() is None
    assert _talk(mesh.payments) == b"hello ledger"


@pytest.mark.slow
def test_rotation_under_open_connections(mesh: Mesh) -> None:
    listed = mesh.server.cli("entry", "list", "--json", check=True).stdout
    import json

    for item in json.loads(listed):
        if item["spiffe_id"] in ("spiffe://example.org/ledger", "spiffe://example.org/payments"):
            mesh.server.cli("entry", "update", item["id"], "--x509-ttl", "4s", check=True)
    conn = socket.create_connection(("127.0.0.1", mesh.payments), timeout=10)
    start_updates = mesh.agent.log().count("svids_updated")
    deadline = time.monotonic() + 12
    exchanged = 0
    while time.monotonic() < deadline:
        conn.sendall(b"tick")
        assert conn.recv(16) == b"tick", "an open connection broke during rotation"
        assert _talk(mesh.payments, b"new") == b"new", "a new connection failed during rotation"
        exchanged += 1
        time.sleep(0.5)
    conn.close()
    assert mesh.agent.log().count("svids_updated") >= start_updates + 3, "the SVIDs did not rotate"
    assert exchanged >= 15


async def test_expired_client_certificates_are_refused_and_fresh_ones_pass(mesh: Mesh, tmp_path: Path) -> None:
    import asyncio

    from tests.integration.node_client import NodeClient, pem_chain
    from trustmesh.keys import generate_private_key
    from trustmesh.x509svid import build_csr

    # A second node, whose agent we drive by hand, gets SVIDs straight from the server.
    other = NodeClient(mesh.server)
    await other.attest(mesh.server.cli("token", "create", "--node", "node-2", check=True).stdout.strip())
    ids = {}
    for name, ttl in (("payments", "1h"), ("short-lived", "1s")):
        ids[name] = mesh.server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/{name}", "--node",
                                    "node-2", "--selector", "unix:uid:5", "--x509-ttl", ttl, check=True).stdout.strip()

    async def cert_for(name: str) -> tuple[Path, Path]:
        key = generate_private_key()
        reply = await other.batch_sign([(ids[name], build_csr(key))])
        cert, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        cert.write_bytes(pem_chain(list(reply.results[0].svid.cert_chain)))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert, key_path

    fresh = await cert_for("payments")
    stale = await cert_for("short-lived")
    await asyncio.sleep(2.5)

    def ctx(pair: tuple[Path, Path]) -> ssl.SSLContext:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.check_hostname = False
        c.verify_mode = ssl.CERT_NONE
        c.load_cert_chain(str(pair[0]), str(pair[1]))
        return c

    # Positive control: an allowed ID with a valid SVID from another node goes straight through.
    assert await asyncio.to_thread(_tls_client, mesh.ledger, ctx(fresh)) == b"hello"
    assert await asyncio.to_thread(_tls_client, mesh.ledger, ctx(stale)) == b""  # expired: refused
    assert wait_until(lambda: "event=handshake_refused service=ledger" in mesh.agent.log()
                     and "reason=expired" in mesh.agent.log()), mesh.agent.log()[-2000:]


@pytest.mark.slow
def test_revoking_a_partner_certificate_cuts_its_open_connection(mesh: Mesh, tmp_path: Path) -> None:
    from trustmesh.keys import generate_private_key
    from trustmesh.x509svid import build_csr

    _policy(mesh.server, tmp_path, mesh.ledger, "spiffe://example.org/payments", "spiffe://example.org/partners/acme")
    key = generate_private_key()
    (tmp_path / "acme.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (tmp_path / "acme.csr").write_bytes(build_csr(key))
    issued = mesh.server.cli("partner", "issue", "--spiffe-id", "spiffe://example.org/partners/acme", "--csr",
                             str(tmp_path / "acme.csr"), "--ttl", "1h", "--out", str(tmp_path / "acme.pem"),
                             check=True).stdout
    serial = re.search(r"serial (\w+)", issued).group(1)  # type: ignore[union-attr]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(tmp_path / "acme.pem"), str(tmp_path / "acme.key"))
    assert wait_until(lambda: _tls_client(mesh.ledger, ctx) == b"hello")  # once the new policy is in
    raw = socket.create_connection(("127.0.0.1", mesh.ledger), timeout=10)
    with ctx.wrap_socket(raw) as conn:
        conn.sendall(b"ping")
        assert conn.recv(16) == b"ping"
        mesh.server.cli("partner", "revoke", serial, "--reason", "key exposed", check=True)
        conn.settimeout(15)  # a policy push arrives in well under a second; 15 s means "never"
        try:
            leftover = conn.recv(16)
        except (ConnectionResetError, ssl.SSLError):
            leftover = b""
        except TimeoutError:
            leftover = b"<still open>"
        assert leftover == b"", "the revoked partner's open connection kept working"
    assert _tls_client(mesh.ledger, ctx) == b""  # and a new one is refused
    assert wait_until(lambda: "revoked" in mesh.server.cli("audit", "show", "--kind", "flows.reported",
                                                          "--json", check=True).stdout)
