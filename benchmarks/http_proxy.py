"""The agent's HTTP inbound listener against nginx as an HTTP reverse proxy, side by side in one run.

Both terminate mTLS with the same certificates (the ledger's X509-SVID, the trust bundle,
client certificate required, TLS 1.3), parse HTTP/1.1, allow only `GET /bench/*`, pass the
client's identity on in a header and forward over kept-alive pooled plaintext connections to
the same backend: a separate nginx (one worker, plain HTTP, a fixed 1 KB body), so that the
backend's CPU is never counted as the proxy's. nginx proxies with one worker process, like
the one agent process. Measured:

- requests per second through each proxy: N kept-alive mTLS connections, each sending GET
  requests one after another (no pipelining), for a fixed time;
- p99 latency each proxy adds over a direct plaintext call to the backend, at a paced
  200 requests/s, proxies and direct calls interleaved round by round;
- CPU seconds per 1,000 requests of each proxy's process tree, during the throughput run.

The load generator runs in this process: one thread, non-blocking sockets, a selector and
httptools' response parser (frames each response by its Content-Length). Its own CPU and the
machine's are reported in params, so a reader can tell whether the client or the proxy
saturated first.

Run through `scripts/bench` (or `python benchmarks/http_proxy.py [--quick]`).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httptools

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import percentile  # noqa: E402
from benchmarks.proxy import _cpu_seconds, _tree, fetch_svid, free_port  # noqa: E402
from tests.integration.harness import AgentProcess, ServerProcess  # noqa: E402

CLIENT_ID = "spiffe://example.org/payments"
BODY = b"0123456789abcdef" * 64  # the backend's fixed 1 KB response
PATH = "/bench/item"
NGINX = "nginx http proxy, ssl_verify_client on, upstream keepalive 32, 1 worker"


@dataclass(frozen=True)
class Target:
    """Where requests go: the backend directly (tls None) or a proxy in front of it. The CPU of
    `pids` (the proxy's process tree) is what is measured; that of `backend`, beside it, shows
    whether the backend was the bound."""

    name: str
    port: int
    tls: ssl.SSLContext | None
    pids: tuple[int, ...] = ()
    backend: tuple[int, ...] = ()


class LoadError(RuntimeError):
    """The benchmark's own check failed: a proxy answered wrongly, closed a connection, or
    did not enforce the route rule."""


# --- the client ------------------------------------------------------------------------------------------------


def _request(method: str = "GET", path: str = PATH) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: ledger\r\nUser-Agent: trustmesh-bench\r\n\r\n".encode()


REQUEST = _request()


def client_context(cert: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(str(bundle))
    ctx.check_hostname = False  # an X509-SVID names a SPIFFE ID, not a DNS name; the chain is still verified
    return ctx


def _connect(target: Target) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", target.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if target.tls is not None:
        sock = target.tls.wrap_socket(sock, server_hostname="ledger")  # the handshake, before any timing
    sock.setblocking(False)
    return sock


class Connection:
    """One kept-alive connection: at most one request in flight, each response checked (200,
    exactly the 1 KB body) and, in paced mode, timed from the send to its last byte."""

    __slots__ = ("name", "sock", "parser", "body", "sent_at", "busy", "done", "bad", "latencies", "send_next")

    def __init__(self, target: Target, send_next: bool) -> None:
        self.name = target.name
        self.sock = _connect(target)
        self.parser = httptools.HttpResponseParser(self)
        self.body = 0
        self.sent_at = 0.0
        self.busy = False
        self.done = 0
        self.bad = 0
        self.latencies: list[float] = []
        self.send_next = send_next  # closed loop: the next request leaves as soon as a response is complete

    def send(self) -> None:
        self.busy = True
        self.sent_at = time.perf_counter()
        try:
            sent = self.sock.send(REQUEST)
        except (ssl.SSLWantWriteError, BlockingIOError):
            sent = 0
        if sent < len(REQUEST):  # never seen with a 70-byte request, but a full buffer must not lose bytes
            self.sock.setblocking(True)
            self.sock.sendall(REQUEST[sent:])
            self.sock.setblocking(False)

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, BlockingIOError):
            return  # e.g. a TLS 1.3 session ticket: a record without application data
        if not data:
            raise LoadError(f"{self.name}: the server closed a kept-alive connection after {self.done} responses")
        self.parser.feed_data(data)
        # A TLS socket may hold more decrypted records than the kernel buffer shows.
        while isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            self.parser.feed_data(self.sock.recv(65536))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        if self.parser.get_status_code() != 200 or self.body != len(BODY):
            self.bad += 1
        self.done += 1
        self.body = 0
        self.busy = False
        if self.send_next:
            self.send()
        else:
            self.latencies.append(now - self.sent_at)

    def close(self) -> None:
        self.sock.close()


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


@dataclass
class Window:
    """What one measured interval saw: requests completed, CPU seconds of each proxy process
    tree, of this process, and the share of the machine that was busy."""

    requests: int = 0
    seconds: float = 0.0
    proxy_cpu: float = 0.0
    backend_cpu: float = 0.0
    client_cpu: float = 0.0
    busy_jiffies: int = 0
    all_jiffies: int = 0
    latencies: list[float] = field(default_factory=list)
    late: int = 0


class _Meter:
    def __init__(self, target: Target) -> None:
        self.pids, self.backend_pids = list(target.pids), list(target.backend)
        self.started = time.perf_counter()
        self.proxy = _cpu_seconds(self.pids)
        self.backend = _cpu_seconds(self.backend_pids)
        self.client = _cpu_seconds([os.getpid()])
        self.machine = _machine_busy()

    def stop(self, window: Window) -> None:
        window.seconds += time.perf_counter() - self.started
        window.proxy_cpu += _cpu_seconds(self.pids) - self.proxy
        window.backend_cpu += _cpu_seconds(self.backend_pids) - self.backend
        window.client_cpu += _cpu_seconds([os.getpid()]) - self.client
        busy, total = _machine_busy()
        window.busy_jiffies += busy - self.machine[0]
        window.all_jiffies += total - self.machine[1]


def closed_loop(target: Target, connections: int, seconds: float, warmup: float, window: Window) -> None:
    """`connections` kept-alive connections, each sending its next request as soon as its
    response is complete, for `seconds` after `warmup` (pools filled, caches warm)."""
    conns = [Connection(target, send_next=True) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    try:
        for conn in conns:
            selector.register(conn.sock, selectors.EVENT_READ, conn)
            conn.send()
        meter: _Meter | None = None
        start_count = 0
        now = time.perf_counter()
        warm_until, deadline = now + warmup, now + warmup + seconds
        while now < deadline:
            if meter is None and now >= warm_until:
                meter = _Meter(target)
                start_count = sum(c.done for c in conns)
            for key, _ in selector.select(timeout=0.05):
                key.data.readable()
            now = time.perf_counter()
        assert meter is not None
        meter.stop(window)
        window.requests += sum(c.done for c in conns) - start_count
        bad = sum(c.bad for c in conns)
        if bad:
            raise LoadError(f"{target.name}: {bad} responses were not 200 with a {len(BODY)}-byte body")
    finally:
        selector.close()
        for conn in conns:
            conn.close()


def paced(target: Target, connections: int, rate: float, seconds: float, window: Window) -> None:
    """Requests at `rate` per second spread over `connections` kept-alive connections, each
    sent on its schedule (not when the previous response came back), each timed from its send
    to its response's last byte. A request whose connection was still busy at its time is
    sent when the response arrives, and counted as late."""
    conns = [Connection(target, send_next=False) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    interval = connections / rate
    try:
        for conn in conns:
            selector.register(conn.sock, selectors.EVENT_READ, conn)
            conn.send()  # one unmeasured request each: the proxy's upstream connection is open and warm
        give_up = time.perf_counter() + 10
        while any(c.busy for c in conns):
            if time.perf_counter() > give_up:
                raise LoadError(f"{target.name}: no response to a warm-up request in 10 s")
            for key, _ in selector.select(timeout=1):
                key.data.readable()
        for conn in conns:
            conn.latencies.clear()
            conn.done = 0
        meter = _Meter(target)
        start = time.perf_counter()
        due = [start + i * interval / connections for i in range(connections)]  # staggered, not in bursts
        end = start + seconds
        while True:
            now = time.perf_counter()
            if now >= end and not any(c.busy for c in conns):
                break
            if now > end + 10:
                raise LoadError(f"{target.name}: requests still unanswered 10 s after the last was sent")
            for i, conn in enumerate(conns):
                if not conn.busy and due[i] <= now and due[i] < end:
                    if now - due[i] > interval:
                        window.late += 1
                    conn.send()
                    due[i] += interval
            waits = [due[i] - now for i, c in enumerate(conns) if not c.busy and due[i] < end]
            for key, _ in selector.select(timeout=max(0.0, min(waits, default=0.05))):
                key.data.readable()
        meter.stop(window)
        for conn in conns:
            window.requests += conn.done
            window.latencies.extend(conn.latencies)
        bad = sum(c.bad for c in conns)
        if bad:
            raise LoadError(f"{target.name}: {bad} responses were not 200 with a {len(BODY)}-byte body")
    finally:
        selector.close()
        for conn in conns:
            conn.close()


def one_request(target: Target, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection: (status, headers in lower case, body)."""

    class Response:
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.body = b""
            self.complete = False

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode().lower()] = value.decode()

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.complete = True

    response = Response()
    parser = httptools.HttpResponseParser(response)
    sock = _connect(target)
    sock.settimeout(10)
    try:
        sock.sendall(_request(method, path))
        while not response.complete:
            data = sock.recv(65536)
            if not data:
                raise LoadError(f"{target.name}: connection closed before a whole response to {method} {path}")
            parser.feed_data(data)
        return parser.get_status_code(), response.headers, response.body
    finally:
        sock.close()


# --- the servers -----------------------------------------------------------------------------------------------


def _start_nginx(work: Path, name: str, port: int, body: str) -> subprocess.Popen[bytes]:
    """nginx with one worker and `body` as its http block, its files under work/name."""
    home = work / name
    home.mkdir()
    temp = "\n".join(f"  {kind}_temp_path {home}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                        "scgi"))
    conf = home / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
  # nginx closes a client connection after 1,000 requests by default; the load keeps its connections.
  keepalive_requests 1000000;
  keepalive_timeout 300s;
{body}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(home)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"nginx ({name}) did not start: {(home / 'error.log').read_text(errors='replace')}")


def start_backend(work: Path, port: int) -> subprocess.Popen[bytes]:
    """The "legacy" service behind both proxies. It echoes the identity header each proxy
    adds, so one request can show that the identity reached it."""
    return _start_nginx(work, "backend", port, f"""
  default_type text/plain;
  server {{
    listen 127.0.0.1:{port} backlog=1024;
    location /bench/ {{
      add_header X-Echo-Peer-Id $http_x_trustmesh_peer_id;
      add_header X-Echo-Cert-Hash $http_x_client_cert_hash;
      return 200 "{BODY.decode()}";
    }}
    location / {{ return 404; }}
  }}""")


def start_nginx_proxy(work: Path, port: int, backend: int, cert: Path, key: Path, bundle: Path
                      ) -> subprocess.Popen[bytes]:
    """nginx doing what the agent's listener does, as far as nginx can: mTLS, the route rule
    (GET /bench/* only), the client's identity in a header, pooled upstream connections. It
    cannot check the caller's SPIFFE ID (no URI SAN matching without a module), so it does a
    little less work than the agent per request."""
    return _start_nginx(work, "proxy", port, f"""
  upstream backend {{
    server 127.0.0.1:{backend};
    keepalive 32;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=1024;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {bundle};
    ssl_verify_client on;
    ssl_verify_depth 3;
    ssl_protocols TLSv1.3;
    location /bench/ {{
      limit_except GET {{ deny all; }}
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Client-Cert-Hash $ssl_client_fingerprint;
    }}
    location / {{ return 403; }}
  }}""")


def start_agent(server: ServerProcess, work: Path, port: int, backend: int) -> AgentProcess:
    for name in ("ledger", "payments"):
        server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/{name}", "--node", "node-1",
                   "--selector", f"unix:uid:{os.getuid()}", check=True)
    policy = work / "policy.yaml"
    # The route rule is the HTTP listener's real use case: it makes the agent match every request.
    policy.write_text("apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: bench}\n"
                      f"spec: {{destination: spiffe://example.org/ledger, ports: [{port}],"
                      f" allow: [{{from: {CLIENT_ID}, methods: [GET], paths: [\"/bench/*\"]}}]}}\n")
    server.cli("policy", "apply", str(policy), check=True)
    config = work / "agent.yaml"
    config.write_text("services:\n  - name: ledger\n    spiffe_id: spiffe://example.org/ledger\n"
                      f"    inbound: {{listen: 127.0.0.1:{port}, forward: 127.0.0.1:{backend}, protocol: http}}\n")
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    return AgentProcess(server, work / "agent", join_token=token, config=config).start()


def check_targets(direct: Target, nginx: Target, ours: Target) -> None:
    """Each path answers the benchmark's request, each proxy passes the client's identity on,
    and each refuses a path outside the rule (so what is measured is a proxy that enforces)."""
    deadline = time.monotonic() + 20
    while True:  # the agent's listener and its policy arrive a moment after its ready line
        try:
            status, headers, body = one_request(ours, "GET", PATH)
        except OSError:
            status, headers, body = 0, {}, b""
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if (status, len(body)) != (200, len(BODY)) or headers.get("x-echo-peer-id") != CLIENT_ID:
        raise LoadError(f"the agent answered GET {PATH} with {status}, {len(body)} bytes, peer id header "
                        f"{headers.get('x-echo-peer-id')!r} at the backend")
    status, headers, body = one_request(nginx, "GET", PATH)
    if (status, len(body)) != (200, len(BODY)) or not headers.get("x-echo-cert-hash"):
        raise LoadError(f"nginx answered GET {PATH} with {status}, {len(body)} bytes, no cert hash at the backend")
    status, _, body = one_request(direct, "GET", PATH)
    if (status, len(body)) != (200, len(BODY)):
        raise LoadError(f"the backend answered GET {PATH} with {status}, {len(body)} bytes")
    for target in (ours, nginx):
        status, _, _ = one_request(target, "GET", "/admin/item")
        if status != 403:
            raise LoadError(f"{target.name} answered GET /admin/item (outside the rule's paths) with {status}, not 403")


# --- the benchmark ---------------------------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _cores(cpu: float, window: Window) -> float:
    return round(cpu / window.seconds, 2)  # CPU seconds per second: 1.0 is one core kept busy


def _load_shares(window: Window) -> dict[str, object]:
    """Who was busy during a throughput window, and what bounded it: a component near one core
    (each is one thread where it matters), and/or the whole machine with every core busy."""
    cores = {"proxy": _cores(window.proxy_cpu, window), "backend": _cores(window.backend_cpu, window),
             "client": _cores(window.client_cpu, window)}
    machine = round(window.busy_jiffies / max(1, window.all_jiffies), 2)
    # 0.85, not 1.0: a process that has a core to itself still loses some of it to interrupts
    # and to the others' system calls on a machine this busy.
    saturated = [f"{name} (one core)" for name, share in cores.items() if share >= 0.85]
    if machine >= 0.9:
        saturated.append("the machine (every core busy)")
    bound = ", ".join(saturated) or "nothing saturated: the connections' round trips"
    return {**{f"{name}_cores": share for name, share in cores.items()}, "machine_busy": machine, "bound_by": bound}


def measure(direct: Target, nginx: Target, ours: Target, quick: bool) -> list[dict[str, object]]:
    # Rounds alternate the proxies (and the direct calls), so a slow spell on a shared machine
    # weighs on every side alike.
    connections, rounds, seconds = (32, 1, 1.5) if quick else (32, 3, 8.0)
    # What each proxy burns with no traffic (timers, the agent's sync and reports): at 200
    # requests/s that is a visible part of the cost per request.
    idle = {t.name: Window() for t in (nginx, ours)}
    meters = {t.name: _Meter(t) for t in (nginx, ours)}
    time.sleep(0.5 if quick else 3.0)
    for name, meter in meters.items():
        meter.stop(idle[name])
    load = {t.name: Window() for t in (nginx, ours)}
    for _ in range(rounds):
        for target in (nginx, ours):
            closed_loop(target, connections, seconds, warmup=0.5, window=load[target.name])
    rate, paced_connections = 200.0, 4
    latency_rounds, latency_seconds = (2, 0.5) if quick else (10, 3.0)
    timed = {t.name: Window() for t in (direct, nginx, ours)}
    for _ in range(latency_rounds):
        for target in (direct, nginx, ours):
            paced(target, paced_connections, rate, latency_seconds, timed[target.name])

    def rps(name: str) -> float:
        return load[name].requests / load[name].seconds

    def p(name: str, q: float) -> float:
        return percentile(timed[name].latencies, q)

    def per_1000(window: Window) -> float:
        return window.proxy_cpu / window.requests * 1000

    ours_rps, ref_rps = rps(ours.name), rps(nginx.name)
    direct99 = p(direct.name, 99)
    ours_added, ref_added = p(ours.name, 99) - direct99, p(nginx.name, 99) - direct99
    ours_cpu, ref_cpu = per_1000(load[ours.name]), per_1000(load[nginx.name])
    return [
        {"name": "http_proxy.requests_per_second", "value": round(ours_rps, 1), "unit": "requests/s",
         "reference": NGINX, "reference_value": round(ref_rps, 1), "ratio": round(ours_rps / ref_rps, 3),
         "goal": ">= 0.8",
         "params": {"connections": connections, "seconds_each": rounds * seconds, "rounds": rounds,
                    "request": f"GET {PATH}, kept-alive, no pipelining", "response": f"200, {len(BODY)} B body",
                    "client": "this process: one thread, selector, non-blocking ssl sockets, httptools",
                    "cores": os.cpu_count(), "ours": _load_shares(load[ours.name]),
                    "nginx": _load_shares(load[nginx.name])}},
        {"name": "http_proxy.added_p99_ms", "value": _ms(ours_added), "unit": "ms added to p99",
         "reference": f"{NGINX}, same", "reference_value": _ms(ref_added),
         "ratio": round(ours_added / ref_added, 3) if ref_added > 0 else 0.0,
         "goal": "ours within 1 ms of nginx's",
         "params": {"rate": rate, "connections": paced_connections, "rounds": latency_rounds,
                    "requests_each": timed[ours.name].requests,
                    "late_sends": {name: w.late for name, w in timed.items()},
                    "direct_p50_ms": _ms(p(direct.name, 50)), "direct_p99_ms": _ms(direct99),
                    "nginx_p50_ms": _ms(p(nginx.name, 50)), "nginx_p99_ms": _ms(p(nginx.name, 99)),
                    "ours_p50_ms": _ms(p(ours.name, 50)), "ours_p99_ms": _ms(p(ours.name, 99)),
                    "ours_added_p50_ms": _ms(p(ours.name, 50) - p(direct.name, 50)),
                    "nginx_added_p50_ms": _ms(p(nginx.name, 50) - p(direct.name, 50)),
                    "within_1ms": ours_added - ref_added <= 0.001,
                    "direct": "plaintext to the backend, same client, same pacing"}},
        {"name": "http_proxy.cpu_per_1000_requests", "value": round(ours_cpu, 4),
         "unit": "CPU s per 1,000 requests", "reference": f"{NGINX}, master + worker",
         "reference_value": round(ref_cpu, 4), "ratio": round(ours_cpu / ref_cpu, 3) if ref_cpu else 0.0,
         "goal": "report (anchors: ztunnel 0.06, Envoy sidecar 0.20 vCPU per 1,000 rps)",
         "params": {"measured": "during the requests_per_second run, at saturation",
                    "requests": {name: w.requests for name, w in load.items()},
                    # At a moderate rate each request pays for its own wake-ups, so it costs more than at
                    # saturation; /proc counts in 10 ms ticks, so these are coarse on a quick run.
                    "ours_at_200_rps": round(per_1000(timed[ours.name]), 4),
                    "nginx_at_200_rps": round(per_1000(timed[nginx.name]), 4),
                    "ours_idle_cores": _cores(idle[ours.name].proxy_cpu, idle[ours.name]),
                    "nginx_idle_cores": _cores(idle[nginx.name].proxy_cpu, idle[nginx.name])}},
    ]


def run(quick: bool) -> list[dict[str, object]]:
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is not installed: `apt-get install nginx` (scripts/bench does it)")
    work = Path(tempfile.mkdtemp(prefix="trustmesh-bench-http-"))
    work.chmod(0o755)
    backend_port, nginx_port, agent_port = free_port(), free_port(), free_port()
    backend: subprocess.Popen[bytes] | None = None
    proxy: subprocess.Popen[bytes] | None = None
    agent: AgentProcess | None = None
    server = ServerProcess(data_dir=work / "server").start()
    try:
        backend = start_backend(work, backend_port)
        agent = start_agent(server, work, agent_port, backend_port)
        ledger_cert, ledger_key = fetch_svid(agent.socket, "spiffe://example.org/ledger", work)
        client_cert, client_key = fetch_svid(agent.socket, CLIENT_ID, work)
        bundle = work / "bundle.pem"
        proxy = start_nginx_proxy(work, nginx_port, backend_port, ledger_cert, ledger_key, bundle)
        tls = client_context(client_cert, client_key, bundle)
        assert agent.proc is not None
        backend_pids = tuple(_tree(backend.pid))
        direct = Target("direct", backend_port, None, backend_pids)
        nginx = Target("nginx", nginx_port, tls, tuple(_tree(proxy.pid)), backend_pids)
        ours = Target("ours", agent_port, tls, tuple(_tree(agent.proc.pid)), backend_pids)
        check_targets(direct, nginx, ours)
        return measure(direct, nginx, ours, quick)
    finally:
        for proc in (proxy, backend):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if agent is not None:
            agent.stop()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="the agent's HTTP inbound listener against nginx")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, not minutes)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
