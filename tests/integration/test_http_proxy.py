"""The agent's http listeners, with real processes on loopback: a legacy-style plaintext HTTP
backend behind an http inbound listener, clients over mTLS with SVIDs fetched from the
Workload API (httpx, and a raw TLS socket where one connection's requests must be seen one by
one), and a plaintext client through an http outbound listener.

The ledger's policy: fraud-scoring may GET and HEAD /transactions/* and /health; payments may
do anything (and call the core too)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.etcd_process import free_port
from tests.integration.harness import AgentProcess, ServerProcess, wait_until
from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
from trustmesh.der import load_der_certificates

SELF_EXE = os.path.realpath(sys.executable)
TD = "spiffe://example.org"
POLICY = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-read, owner: payments-platform}}
spec:
  destination: spiffe://example.org/ledger
  allow:
    - from: spiffe://example.org/fraud-scoring
      methods: [GET, HEAD]
      paths: ["/transactions/*", "/health"]
{extra}    - from: spiffe://example.org/payments
---
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: core-access, owner: payments-platform}}
spec:
  destination: spiffe://example.org/core
  allow:
    - from: spiffe://example.org/payments
"""


class Backend(BaseHTTPRequestHandler):
    """A legacy core: plaintext HTTP/1.1, keep-alive, answers every request with what it was sent."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        seen = {"method": self.command, "path": self.path, "headers": list(self.headers.items()),
                "peer_port": self.client_address[1], "body": body.decode(errors="replace")}
        payload = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Mesh:
    server: ServerProcess
    agent: AgentProcess
    ledger: int  # the http inbound listener (mTLS)
    core: int  # a permissive http inbound listener (plaintext clients too)
    outbound: int  # payments' http outbound listener to the ledger
    wrong: int  # payments' http outbound listener expecting another ID than the ledger's
    metrics: int
    certs: Path

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).read().decode()
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name}{{{wanted}}} "))

    def tls(self, name: str) -> ssl.SSLContext:
        """A client context with `name`'s SVID; the server is verified against the bundle (its
        SPIFFE ID is the agent's to check; here only the chain)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(self.certs / "bundle.pem"))
        ctx.load_cert_chain(str(self.certs / f"{name}.pem"), str(self.certs / f"{name}.key"))
        return ctx


def _fetch_svids(socket_path: Path, out: Path, names: list[str]) -> None:
    """The SVIDs of `names` from the agent's Workload API, as the workloads would get them."""
    wanted = {f"{TD}/{n}": n for n in names}
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")], timeout=30)
        for message in stream:
            found = {s.spiffe_id: s for s in message.svids if s.spiffe_id in wanted}
            if len(found) < len(wanted):
                continue
            for spiffe_id, svid in found.items():
                chain = load_der_certificates(svid.x509_svid)
                key = serialization.load_der_private_key(svid.x509_svid_key, None)
                name = wanted[spiffe_id]
                (out / f"{name}.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
                (out / f"{name}.key").write_bytes(key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
                (out / "bundle.pem").write_bytes(b"".join(
                    c.public_bytes(serialization.Encoding.PEM) for c in load_der_certificates(svid.bundle)))
            return
    raise AssertionError("the Workload API never sent every SVID")


@pytest.fixture
def mesh(make_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[Mesh]:
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    server = make_server()
    ledger, core, outbound, wrong, metrics = (free_port() for _ in range(5))
    for name in ("ledger", "core", "payments", "fraud-scoring"):
        server.cli("entry", "create", "--spiffe-id", f"{TD}/{name}", "--node", "node-1",
                   "--selector", f"unix:uid:{os.getuid()}", "--selector", f"unix:path:{SELF_EXE}", check=True)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(extra=""))
    server.cli("policy", "apply", str(policy), check=True)
    config = tmp_path / "agent.yaml"
    backend_port = backend.server_address[1]
    config.write_text(f"""\
metrics: 127.0.0.1:{metrics}
services:
  - name: ledger
    spiffe_id: {TD}/ledger
    inbound: {{listen: 127.0.0.1:{ledger}, forward: 127.0.0.1:{backend_port}, protocol: http,
               max_body_bytes: 4096}}
  - name: core
    spiffe_id: {TD}/core
    inbound: {{listen: 127.0.0.1:{core}, forward: 127.0.0.1:{backend_port}, protocol: http, mtls: permissive}}
  - name: payments
    spiffe_id: {TD}/payments
    outbound:
      - {{listen: 127.0.0.1:{outbound}, connect: 127.0.0.1:{ledger}, expect: {TD}/ledger, protocol: http}}
      - {{listen: 127.0.0.1:{wrong}, connect: 127.0.0.1:{ledger}, expect: {TD}/core, protocol: http}}
""")
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=token, config=config).start()
    certs = tmp_path / "certs"
    certs.mkdir()
    try:
        assert wait_until(lambda: agent.log().count("inbound_listening") >= 2
                         and agent.log().count("outbound_listening") >= 2)
        _fetch_svids(agent.socket, certs, ["payments", "fraud-scoring"])
        yield Mesh(server, agent, ledger, core, outbound, wrong, metrics, certs)
    finally:
        agent.stop()
        backend.shutdown()


class Conn:
    """One kept-alive client connection, read response by response (Content-Length framing)."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock: socket.socket = ctx.wrap_socket(raw) if ctx else raw
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = 0 if head_only else int(headers.get("content-length", 0))
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def request(self, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[int, dict[str, str],
                                                                                              bytes]:
        length = f"Content-Length: {len(body)}\r\n" if body else ""
        self.send(f"{method} {path} HTTP/1.1\r\nHost: ledger\r\n{headers}{length}\r\n".encode() + body)
        return self.response(head_only=method == "HEAD")

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
def test_requests_decided_one_by_one_on_one_connection(mesh: Mesh, tmp_path: Path) -> None:
    # An ordinary HTTP client with the workload's SVID: its GET passes, its POST gets the 403.
    with httpx.Client(base_url=f"https://127.0.0.1:{mesh.ledger}", verify=mesh.tls("fraud-scoring"),
                      timeout=10) as client:
        assert client.get("/transactions/7").json()["path"] == "/transactions/7"
        refused = client.post("/transactions/7", json={"amount": 1})
        assert refused.status_code == 403 and refused.json()["error"] == "denied"
        assert client.head("/health").status_code == 200
    conn = Conn(mesh.ledger, mesh.tls("fraud-scoring"))
    leaf = x509.load_pem_x509_certificates((mesh.certs / "fraud-scoring.pem").read_bytes())[0]
    # GET allowed, with the caller's identity for the backend and every forged copy removed.
    status, _, body = conn.request("GET", "/transactions/42", headers=(
        "X-Forwarded-Client-Cert: By=x;URI=spiffe://example.org/payments\r\n"
        "X_Trustmesh_Peer_Id: spiffe://example.org/payments\r\nx-trustmesh-peer-id: forged\r\n"))
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/transactions/42"
    identity = [(k.lower().replace("_", "-"), v) for k, v in seen["headers"]
                if k.lower().replace("_", "-") in ("x-forwarded-client-cert", "x-trustmesh-peer-id")]
    digest = leaf.fingerprint(hashes.SHA256()).hex()
    assert identity == [("x-forwarded-client-cert", f"By={TD}/ledger;Hash={digest};URI={TD}/fraud-scoring"),
                        ("x-trustmesh-peer-id", f"{TD}/fraud-scoring")]
    # POST denied on the same connection: a 403 naming the rule, and the connection goes on.
    status, headers, body = conn.request("POST", "/transactions/42", b'{"amount": 1}')
    assert status == 403 and headers["content-type"] == "application/json"
    denial = json.loads(body)
    assert denial["error"] == "denied" and denial["rule"] == "default deny" and len(denial["request_id"]) == 16
    assert "/transactions/42" not in denial["reason"] and "POST" in denial["reason"]
    # Normalised before matching, and forwarded as normalised.
    assert conn.request("GET", "/transactions/./x/../42")[0] == 200
    assert json.loads(conn.request("GET", "//transactions/%34%32")[2])["path"] == "/transactions/42"
    assert conn.request("GET", "/transactions/%2e%2e/admin")[0] == 403  # climbs out of /transactions/*
    assert conn.request("HEAD", "/health")[0] == 200
    # Pipelined: two requests in one write, answered in order.
    conn.send(b"GET /transactions/1 HTTP/1.1\r\nHost: l\r\n\r\nGET /transactions/2 HTTP/1.1\r\nHost: l\r\n\r\n")
    assert [json.loads(conn.response()[2])["path"] for _ in range(2)] == ["/transactions/1", "/transactions/2"]
    # A policy change applies to the next request on this open connection.
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(extra=f"    - from: {TD}/fraud-scoring\n      methods: [POST]\n"
                                          "      paths: [/transactions/*]\n"))
    mesh.server.cli("policy", "apply", str(policy), check=True)
    assert wait_until(lambda: conn.request("POST", "/transactions/42", b"{}")[0] == 200)
    # Ambiguous paths are refused, never guessed; the connection stays usable.
    for path in ("/transactions%2F42", "/transactions/4;2", "/transactions/../../etc"):
        status, _, body = conn.request("GET", path)
        assert status == 400 and json.loads(body)["error"] == "ambiguous_path", path
    assert conn.request("GET", "/transactions/42")[0] == 200
    # The body limit (4096 bytes here) answers 413 and closes.
    status, _, _ = conn.request("POST", "/transactions/1", b"x" * 5000)
    assert status == 413 and conn.closed()
    conn.close()

    # Flows and metrics: each request's decision under its route (never its path).
    def flows() -> list[dict[str, object]]:
        out = mesh.server.cli("flows", "--json", check=True).stdout
        return [f for f in json.loads(out) if f["destination"] == f"{TD}/ledger"]

    assert wait_until(lambda: any(f["route"] == "POST" and f["decision"] == "deny" for f in flows()), 30)
    routes = {(f["route"], f["decision"]) for f in flows()}
    assert ("GET /transactions/*", "allow") in routes and ("HEAD /health", "allow") in routes
    assert not any("42" in str(f["route"]) for f in flows())
    assert mesh.metric("trustmesh_http_requests_total", destination=f"{TD}/ledger", decision="deny",
                       route="POST") >= 1
    assert mesh.metric("trustmesh_http_requests_total", destination=f"{TD}/ledger", decision="refused",
                       route="GET") == 3


@pytest.mark.slow
def test_smuggling_and_malformed_requests_are_refused(mesh: Mesh) -> None:
    ctx = mesh.tls("payments")
    attempts = [
        b"POST /x HTTP/1.1\r\nHost: l\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: l\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST /x HTTP/1.1\r\nHost: l\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: l\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: l\r\nX: a\r\n b\r\n\r\n",  # obsolete line folding
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /x HTTP/1.1\r\n\r\n",  # no Host
        b"GET http://evil.example/x HTTP/1.1\r\nHost: l\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: l\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: l\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n",
    ]
    for attempt in attempts:
        conn = Conn(mesh.ledger, ctx)
        conn.send(attempt + b"GET /smuggled HTTP/1.1\r\nHost: l\r\n\r\n")
        status, headers, _ = conn.response()
        assert status in (400, 431, 501) and headers.get("connection") == "close", attempt[:60]
        assert conn.closed(), attempt[:60]  # the request behind it is never read
        conn.close()
    # A chunked body with Expect: 100-continue is re-framed for the backend.
    conn = Conn(mesh.ledger, ctx)
    conn.send(b"PUT /x HTTP/1.1\r\nHost: l\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert conn.sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    conn.send(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    status, _, body = conn.response()
    seen = json.loads(body)
    assert status == 200 and seen["body"] == "abcde"
    assert not any(k.lower() == "expect" for k, _ in seen["headers"])
    conn.close()


@pytest.mark.slow
def test_outbound_http_and_plaintext_clients(mesh: Mesh) -> None:
    # A legacy client speaks plaintext to its outbound listener; the agent dials mTLS as payments,
    # keeps the upstream connection and reuses it.
    with httpx.Client(base_url=f"http://127.0.0.1:{mesh.outbound}", timeout=10) as client:
        first = client.post("/transfers", content=b"{}", headers={"X-Trustmesh-Peer-Id": "forged"})
        second = client.get("/transfers/1")
    assert first.status_code == 200 and second.status_code == 200
    seen = [first.json(), second.json()]
    assert all(dict(s["headers"]).get("X-Trustmesh-Peer-Id") == f"{TD}/payments" for s in seen)
    assert seen[0]["peer_port"] == seen[1]["peer_port"]  # one pooled connection to the backend
    # A destination whose SPIFFE ID is not the expected one is refused.
    reply = httpx.get(f"http://127.0.0.1:{mesh.wrong}/transfers", timeout=10)
    assert reply.status_code == 502 and reply.json()["error"] == "upstream_refused"
    assert f"not the expected {TD}/core" in reply.json()["reason"]
    # A plaintext client of a permissive http listener: forwarded without an identity, and
    # whatever identity it claims is removed.
    conn = Conn(mesh.core, None)
    status, _, body = conn.request("GET", "/status", headers=f"X-Forwarded-Client-Cert: URI={TD}/ledger\r\n")
    assert status == 200
    assert not [k for k, _ in json.loads(body)["headers"] if "client-cert" in k.lower() or "peer-id" in k.lower()]
    conn.close()
    # With mTLS on the same listener, the identity is there.
    with httpx.Client(base_url=f"https://127.0.0.1:{mesh.core}", verify=mesh.tls("payments"), timeout=10) as client:
        assert dict(client.get("/status").json()["headers"])["X-Trustmesh-Peer-Id"] == f"{TD}/payments"
    assert wait_until(lambda: mesh.metric("trustmesh_http_requests_total", destination=f"{TD}/core",
                                         decision="unverified", route="GET") >= 1)
