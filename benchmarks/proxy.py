"""The agent's inbound mTLS listener against nginx, side by side in one run.

Both terminate mTLS with the same certificates (the ledger's X509-SVID and the trust
bundle), require and verify a client certificate, and forward to the same local echo
service. nginx runs its stream module with `ssl_verify_client on` and one worker process,
like the one agent process. Measured:

- new mTLS handshakes per second (`openssl s_time -new`, full TLS 1.3 handshakes);
- bulk MB/s through the proxy (a client streams data and reads the echo back);
- the caller check of an outbound listener (which local process connected, and does it match
  the service's entry): microseconds per check, against the cost of a whole outbound
  connection through the agent (accept, check, mTLS dial, one echo), measured in the same run.

Run through `scripts/bench` (or `python benchmarks/proxy.py [--quick]`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.harness import AgentProcess, ServerProcess  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_server() -> int:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(512)

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(262144):
                    conn.sendall(data)
            except OSError:
                pass

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return int(srv.getsockname()[1])


def fetch_svid(socket_path: Path, spiffe_id: str, out: Path) -> tuple[Path, Path]:
    """Fetch an X509-SVID through the agent's Workload API (as the workload would)."""
    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
    from trustmesh.der import load_der_certificates

    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(f"unix:{socket_path}"))
    for message in stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")],
                                      timeout=30):
        for svid in message.svids:
            if svid.spiffe_id == spiffe_id:
                chain = load_der_certificates(svid.x509_svid)
                key = serialization.load_der_private_key(svid.x509_svid_key, None)
                name = spiffe_id.rsplit("/", 1)[1]
                cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
                cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
                key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
                (out / "bundle.pem").write_bytes(b"".join(
                    c.public_bytes(serialization.Encoding.PEM) for c in load_der_certificates(svid.bundle)))
                _ = x509
                return cert_path, key_path
    raise RuntimeError(f"no SVID for {spiffe_id}")


def start_nginx(work: Path, port: int, backend: int, cert: Path, key: Path, roots: Path) -> subprocess.Popen[bytes]:
    conf = work / "nginx.conf"
    conf.write_text(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
stream {{
  server {{
    listen 127.0.0.1:{port} ssl backlog=1024;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {roots};
    ssl_verify_client on;
    ssl_verify_depth 3;
    ssl_protocols TLSv1.3;
    proxy_pass 127.0.0.1:{backend};
  }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"nginx did not start: {(work / 'nginx-error.log').read_text(errors='replace')}")


def handshakes_per_second(port: int, cert: Path, key: Path, seconds: int) -> float:
    out = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-cert", str(cert),
                          "-key", str(key), "-time", str(seconds)], capture_output=True, text=True,
                         timeout=seconds + 30)
    match = re.search(r"(\d+) connections in ([\d.]+)s", out.stdout)
    if not match:
        raise RuntimeError(f"openssl s_time gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    return int(match.group(1)) / float(match.group(2))


def bulk_mb_per_second(port: int, cert: Path, key: Path, megabytes: int) -> float:
    """Stream `megabytes` through the proxy and read the echo back, on one asyncio loop
    (an SSL socket must not be read and written from two threads at once)."""
    import asyncio

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert), str(key))
    payload = os.urandom(256 * 1024)
    total = megabytes * 1024 * 1024

    async def transfer() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="ledger")
        started = time.perf_counter()

        async def send() -> None:
            sent = 0
            while sent < total:
                writer.write(payload)
                await writer.drain()
                sent += len(payload)

        async def receive() -> int:
            received = 0
            while received < total:
                chunk = await reader.read(262144)
                if not chunk:
                    break
                received += len(chunk)
            return received

        _, received = await asyncio.gather(send(), receive())
        elapsed = time.perf_counter() - started
        writer.close()
        if received < total:
            raise RuntimeError(f"bulk transfer incomplete: {received} of {total} bytes came back")
        return total / elapsed / 1e6

    return asyncio.run(transfer())


def _cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def _tree(pid: int) -> list[int]:
    """The process and its children (nginx's master and worker)."""
    out = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def cpu_per_1000_requests(port: int, cert: Path, key: Path, pid: int, requests: int) -> float:
    """CPU seconds the proxy process(es) spend per 1,000 requests of 1 KB (request and echo),
    over 10 kept-alive mTLS connections."""
    import asyncio

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert), str(key))
    payload = os.urandom(1024)
    pids = _tree(pid)

    async def client(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="ledger")
        for _ in range(n):
            writer.write(payload)
            await writer.drain()
            await reader.readexactly(len(payload))
        writer.close()

    async def all_clients() -> None:
        await asyncio.gather(*(client(requests // 10) for _ in range(10)))

    before = _cpu_seconds(pids)
    asyncio.run(all_clients())
    return (_cpu_seconds(pids) - before) / requests * 1000


def outbound_connection_us(port: int, connections: int) -> float:
    """Microseconds per connection through an outbound listener, one after another: accept,
    caller check, mTLS dial to the inbound listener, one 1-byte echo, close."""
    started = time.perf_counter()
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"x")
            if conn.recv(1) != b"x":
                raise RuntimeError("the outbound listener refused the benchmark's own process")
    return (time.perf_counter() - started) / connections * 1e6


def caller_check_us(checks: int, concurrent: int, agent_pid: int | None = None) -> tuple[float, float]:
    """(µs per caller check one at a time, µs per check when `concurrent` arrive together),
    in this process, with the agent's own code: find the client socket (sock_diag), every
    process holding it (/proc/*/fd), pin each and read its selectors. Like the agent, it does
    not read the agent's own descriptors (`agent_pid`); this process, the caller, is read."""
    import asyncio
    from types import SimpleNamespace

    from trustmesh.agent.localpeer import PeerResolver
    from trustmesh.agent.proxy.listeners import CallerCheck
    from trustmesh.agent.workload_attestor import WorkloadAttestor
    from trustmesh.spiffeid import SpiffeId

    service = SpiffeId.parse("spiffe://example.org/payments")

    class Everyone:  # the entry matches every caller: the check runs to its end and admits
        def x509_svids_for(self, selectors: object) -> list[object]:
            return [SimpleNamespace(svid=SimpleNamespace(spiffe_id=service))]

    async def measure() -> tuple[float, float]:
        check = CallerCheck(PeerResolver(skip=agent_pid), WorkloadAttestor(), Everyone())  # type: ignore[arg-type]
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1024)
        ours = server.getsockname()

        def connect() -> tuple[socket.socket, socket.socket, tuple[str, int]]:
            client = socket.create_connection(ours)
            accepted, peer = server.accept()
            return client, accepted, peer

        async def one_check() -> float:
            client, accepted, peer = connect()  # one caller at a time, as a quiet service calls
            try:
                started = time.perf_counter()
                refusal = await check.tcp(service, peer, ours)
                elapsed = time.perf_counter() - started
            finally:
                client.close()
                accepted.close()
            if refusal is not None:
                raise RuntimeError(f"the caller check refused the benchmark's own process: {refusal}")
            return elapsed

        try:
            await one_check()  # warm: the selectors' user names and the binary's hash are cached
            one = sum([await one_check() for _ in range(checks)]) / checks * 1e6
            pairs = [connect() for _ in range(concurrent)]
            try:
                started = time.perf_counter()
                refusals = await asyncio.gather(*(check.tcp(service, peer, ours) for _, _, peer in pairs))
                together = (time.perf_counter() - started) / concurrent * 1e6
            finally:
                for client, accepted, _ in pairs:
                    client.close()
                    accepted.close()
            if any(refusals):
                raise RuntimeError(f"the caller check refused the benchmark's own process: {refusals[0]}")
            return one, together
        finally:
            server.close()

    return asyncio.run(measure())


def _host_descriptors() -> tuple[int, int]:
    """(processes, descriptors) on this host: what one caller check has to scan."""
    processes = descriptors = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                descriptors += len(os.listdir(entry / "fd"))
                processes += 1
            except OSError:
                continue
    return processes, descriptors


def run(quick: bool) -> list[dict[str, object]]:
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is not installed: `apt-get install nginx libnginx-mod-stream` (scripts/bench does it)")
    work = Path(tempfile.mkdtemp(prefix="trustmesh-bench-"))
    work.chmod(0o755)
    seconds, megabytes = (3, 32) if quick else (10, 256)
    backend = echo_server()
    server = ServerProcess(data_dir=work / "server").start()
    agent: AgentProcess | None = None
    nginx: subprocess.Popen[bytes] | None = None
    try:
        for name in ("ledger", "payments"):
            server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/{name}", "--node", "node-1",
                       "--selector", f"unix:uid:{os.getuid()}", check=True)
        agent_port, nginx_port, outbound_port = free_port(), free_port(), free_port()
        policy = work / "policy.yaml"
        policy.write_text("apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: bench}\n"
                          f"spec: {{destination: spiffe://example.org/ledger, ports: [{agent_port}],"
                          " allow: [{from: spiffe://example.org/payments}]}\n")
        server.cli("policy", "apply", str(policy), check=True)
        config = work / "agent.yaml"
        config.write_text(f"services:\n  - name: ledger\n    spiffe_id: spiffe://example.org/ledger\n"
                          f"    inbound: {{listen: 127.0.0.1:{agent_port}, forward: 127.0.0.1:{backend}}}\n"
                          f"  - name: payments\n    spiffe_id: spiffe://example.org/payments\n    outbound:\n"
                          f"      - {{listen: 127.0.0.1:{outbound_port}, connect: 127.0.0.1:{agent_port}, "
                          "expect: spiffe://example.org/ledger}\n")
        token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
        agent = AgentProcess(server, work / "agent", join_token=token, config=config).start()
        deadline = time.monotonic() + 20
        while ("inbound_listening" not in agent.log() or "outbound_listening" not in agent.log()) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        ledger_cert, ledger_key = fetch_svid(agent.socket, "spiffe://example.org/ledger", work)
        client_cert, client_key = fetch_svid(agent.socket, "spiffe://example.org/payments", work)
        nginx = start_nginx(work, nginx_port, backend, ledger_cert, ledger_key, work / "bundle.pem")

        results = []
        ours = handshakes_per_second(agent_port, client_cert, client_key, seconds)
        ref = handshakes_per_second(nginx_port, client_cert, client_key, seconds)
        results.append({"name": "proxy.handshakes", "value": round(ours, 1), "unit": "handshakes/s",
                        "reference": "nginx stream, ssl_verify_client on, 1 worker", "reference_value": round(ref, 1),
                        "ratio": round(ours / ref, 3), "goal": ">= 0.7",
                        "params": {"seconds": seconds, "tls": "1.3", "client": "openssl s_time -new"}})
        ours = bulk_mb_per_second(agent_port, client_cert, client_key, megabytes)
        ref = bulk_mb_per_second(nginx_port, client_cert, client_key, megabytes)
        results.append({"name": "proxy.bulk", "value": round(ours, 1), "unit": "MB/s",
                        "reference": "nginx stream, ssl_verify_client on, 1 worker", "reference_value": round(ref, 1),
                        "ratio": round(ours / ref, 3), "goal": ">= 0.9",
                        "params": {"megabytes": megabytes, "backend": "local echo", "client": "python asyncio ssl"}})
        requests = 2_000 if quick else 20_000
        assert agent.proc is not None
        ours = cpu_per_1000_requests(agent_port, client_cert, client_key, agent.proc.pid, requests)
        ref = cpu_per_1000_requests(nginx_port, client_cert, client_key, nginx.pid, requests)
        results.append({"name": "proxy.cpu_per_1000_requests", "value": round(ours, 4),
                        "unit": "CPU s per 1,000 x 1 KB", "reference": "nginx stream, same", "reference_value":
                        round(ref, 4), "ratio": round(ours / ref, 3) if ref else 0.0,
                        "goal": "report (anchors: ztunnel 0.06, Envoy sidecar 0.20 vCPU per 1,000 rps)",
                        "params": {"requests": requests, "connections": 10, "size": "1 KB each way"}})
        connections, concurrent = (100, 100) if quick else (1_000, 500)
        whole = outbound_connection_us(outbound_port, connections)
        one, together = caller_check_us(connections, concurrent, agent.proc.pid)
        processes, descriptors = _host_descriptors()
        results.append({"name": "proxy.caller_check", "value": round(one, 1), "unit": "µs per outbound connection",
                        "reference": "a whole outbound connection through the agent (accept, check, mTLS dial, "
                                     "1-byte echo), one after another", "reference_value": round(whole, 1),
                        "ratio": round(one / whole, 3), "goal": "report (share of an outbound connection's cost)",
                        "params": {"connections": connections, "host_processes": processes,
                                   "host_descriptors": descriptors, "concurrent": concurrent,
                                   "us_per_check_when_concurrent": round(together, 1),
                                   "lookup": "sock_diag + /proc/*/fd scan + pidfd + selectors"}})
        return results
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        if agent is not None:
            agent.stop()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="the agent's inbound mTLS listener against nginx")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, not minutes)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
