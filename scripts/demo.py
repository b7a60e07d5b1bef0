"""The trustmesh demo, narrated step by step. Run it through `scripts/demo`.

A control plane (embedded SQLite store) and two node agents run on loopback in a temporary
directory; two workloads, told apart by their uid, fetch their identities through the
standard SPIFFE Workload API; one identity rotates while you watch; allowlists as code are
enforced between services; two operators log in with password and TOTP, and one grants the
other's just-in-time request; an identity goes rogue, the detectors quarantine it and
explain why, and a security officer releases it; at the end a legacy HTTP core behind the
agent gets a read-only caller: its GET passes, its POST gets a 403 naming the rule;
`trustmesh check` says the mesh is healthy; and a second control plane keeps its CA keys in a
SoftHSM2 token (PKCS#11).
Everything is stopped on exit or Ctrl-C (unless --keep).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyotp
from cryptography import x509

TRUST_DOMAIN = "example.org"
ROOT = Path(__file__).resolve().parents[1]
OTHER_UID = 65534  # "nobody": the second workload, when the demo runs as root


class Step:
    """One progress line per step: `[2/6] starting the agent …` then `done (0.8s)`."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0

    def __call__(self, text: str) -> Step:
        self.count += 1
        self.started = time.monotonic()
        print(f"\n[{self.count}/{self.total}] {text} …", flush=True)
        return self

    def __enter__(self) -> Step:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        outcome = "done" if exc_type is None else "FAILED"
        print(f"      {outcome} ({time.monotonic() - self.started:.1f}s)", flush=True)


def trustmesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "trustmesh.cli.main", *args]


def wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        match = re.search(pattern, text)
        if match:
            return match
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited early; its log:\n{text}")
        time.sleep(0.1)
    raise SystemExit(f"{what} did not become ready in {timeout:.0f}s; its log:\n{log.read_text(errors='replace')}")


NODE1_CONFIG = """\
services:
  - name: ledger
    spiffe_id: spiffe://{td}/ledger
    inbound: {{listen: 127.0.0.1:{ledger}, forward: 127.0.0.1:{echo}}}
  - name: fx
    spiffe_id: spiffe://{td}/fx
    inbound: {{listen: 127.0.0.1:{fx}, forward: 127.0.0.1:{echo}}}
  - name: ledger-core                  # a legacy HTTP core: per-request rules, caller in headers
    spiffe_id: spiffe://{td}/ledger
    inbound: {{listen: 127.0.0.1:{ledger_http}, forward: 127.0.0.1:{core}, protocol: http}}
"""

NODE2_CONFIG = """\
services:
  - name: payments
    spiffe_id: spiffe://{td}/payments
    outbound:
      - {{listen: 127.0.0.1:{payments}, connect: 127.0.0.1:{ledger}, expect: spiffe://{td}/ledger}}
      - {{listen: 127.0.0.1:{payments_fx}, connect: 127.0.0.1:{fx}, expect: spiffe://{td}/fx}}
  - name: frontend
    spiffe_id: spiffe://{td}/frontend
    outbound:
      - {{listen: 127.0.0.1:{frontend}, connect: 127.0.0.1:{ledger}, expect: spiffe://{td}/ledger}}
  - name: fraud-scoring                # plaintext HTTP to its local listener; the agent speaks mTLS
    spiffe_id: spiffe://{td}/fraud-scoring
    outbound:
      - {{listen: 127.0.0.1:{fraud}, connect: 127.0.0.1:{ledger_http}, expect: spiffe://{td}/ledger,
         protocol: http}}
"""

# Route rules: the fraud model may read transactions, never change them.
READ_ONLY = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-read, owner: payments-platform}}
spec:
  destination: spiffe://{td}/ledger
  ports: [{port}]
  allow:
    - from: spiffe://{td}/fraud-scoring
      methods: [GET, HEAD]
      paths: ["/transactions/*"]
"""

# What anomalies lead to, declared next to the allowlists (continuous verification).
RESPONSE = """\
---
apiVersion: trustmesh/v1
kind: Response
metadata: {{name: containment, owner: security}}
spec:
  rules:
    - identity: spiffe://{td}/*
      detectors: [sweep, deny_burst]
      action: quarantine
      above: 0.6
"""

POLICY = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access, owner: payments-platform}}
spec:
  destination: spiffe://{td}/ledger
  ports: [{port}]
  allow:
{rules}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_echo() -> int:
    """The 'ledger' service itself: a plain echo server behind the agent's inbound listener."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=lambda c=conn: _echo(c), daemon=True).start()

    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return int(srv.getsockname()[1])


def start_legacy_core() -> int:
    """A legacy core speaking plaintext HTTP: it answers with who called, as the agent told it."""

    class Core(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"path": self.path, "caller": self.headers.get("X-Trustmesh-Peer-Id", "")}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    core = ThreadingHTTPServer(("127.0.0.1", 0), Core)
    threading.Thread(target=core.serve_forever, daemon=True).start()
    return int(core.server_address[1])


def http_call(port: int, method: str, path: str) -> tuple[int, dict[str, str]]:
    """One plaintext request to a local http outbound listener: (status, JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


def talk(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"balance?")
            answer = conn.recv(64)
    except OSError:
        answer = b""
    return "ALLOWED (the ledger answered)" if answer == b"balance?" else "DENIED (closed after the handshake)"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Person:
    """An operator with a profile directory of its own, driving the CLI as that person would."""

    def __init__(self, name: str, work: Path, env: dict[str, str], admin_bind: str, login_bind: str) -> None:
        self.name, self.home = name, work / f"operator-{name}"
        self.home.mkdir(mode=0o700)
        (self.home / "pw").write_text(f"{name}'s long demo passphrase\n")
        (self.home / "pw").chmod(0o600)
        # No TRUSTMESH_ADMIN_SOCKET: after login, admin commands go over mTLS with the certificate.
        self.env = {k: v for k, v in env.items() if k != "TRUSTMESH_ADMIN_SOCKET"}
        self.env["TRUSTMESH_PROFILE_DIR"] = str(self.home / "profile")
        self.login_flags = ["--server", admin_bind, "--login-server", login_bind, "--trust-bundle",
                            str(work / "server" / "bundle.pem"), "--password-file", str(self.home / "pw")]
        self.totp: pyotp.TOTP | None = None
        self.step = 0

    def run(self, *cmd: str, check: bool = True) -> str:
        result = subprocess.run(trustmesh(*cmd), capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise SystemExit(f"{self.name}: trustmesh {' '.join(cmd)} failed: {result.stderr.strip()}")
        return (result.stdout if result.returncode == 0 else result.stderr).strip()

    def code(self) -> str:
        """What the authenticator app shows; each code is accepted once, so a second one in the
        same 30 s is the next step's (the server accepts one step ahead)."""
        assert self.totp is not None
        self.step = max(self.step + 1, int(time.time()) // 30)
        if self.step > int(time.time()) // 30 + 1:  # two codes used already in this window: wait for the next
            time.sleep((self.step - 1) * 30 - time.time() + 0.5)
        return self.totp.at(self.step * 30)

    def enroll_and_login(self, token: str) -> str:
        uri = self.run("operator", "enroll", *self.login_flags, "--token", token)
        parsed = pyotp.parse_uri(uri)
        assert isinstance(parsed, pyotp.TOTP)
        self.totp = parsed
        return self.run("login", *self.login_flags, "--operator", self.name, "--otp", self.code())


SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")


def hsm_demo(work: Path, env: dict[str, str],
             start: Callable[..., tuple[subprocess.Popen[bytes], Path]]) -> None:
    """A SoftHSM2 token (a software HSM with the PKCS#11 interface of a hardware one), a server
    whose CA keys are made in it, and what the token and the CA journal then hold."""
    if not SOFTHSM_MODULE.exists() or shutil.which("softhsm2-util") is None:
        say("skipped: SoftHSM2 is not installed (apt-get install softhsm2 opensc; scripts/test installs them)")
        return
    home = work / "hsm"
    (home / "tokens").mkdir(parents=True)
    conf = home / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {home / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pin = "".join(f"{b % 10}" for b in os.urandom(8))
    hsm_env = {**env, "SOFTHSM2_CONF": str(conf), "TRUSTMESH_ADMIN_SOCKET": str(home / "server" / "admin.sock")}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "demo-ca", "--pin", pin, "--so-pin",
                    pin[::-1]], check=True, capture_output=True, env=hsm_env)
    (home / "pin").write_text(pin + "\n")
    (home / "pin").chmod(0o600)
    server, log = start("hsm-server", "server", "run", "--trust-domain", "hsm.example.org",
                        "--data-dir", str(home / "server"), "--bind", "127.0.0.1:0", "--attest-bind", "127.0.0.1:0",
                        "--key-manager", "pkcs11", "--pkcs11-module", str(SOFTHSM_MODULE),
                        "--pkcs11-token-label", "demo-ca", "--pkcs11-pin-file", str(home / "pin"),
                        "--pkcs11-signing-ca", env=hsm_env)
    wait_for(log, r"event=ready", server, "the HSM-backed control plane")
    shown = json.loads(subprocess.run(trustmesh("ca", "show", "--json"), capture_output=True, text=True,
                                      env=hsm_env, check=True, timeout=60).stdout)["authorities"]
    for a in shown:
        if a["kind"] in ("root", "jwt-key"):
            say(f"{a['kind']} {a['id'][:16]}: key in the {a['key_store'].upper()}, not in the store")
    listed = subprocess.run(["pkcs11-tool", "--module", str(SOFTHSM_MODULE), "--token-label", "demo-ca", "--login",
                             "--pin", pin, "--list-objects", "--type", "privkey"], capture_output=True, text=True,
                            env=hsm_env) if shutil.which("pkcs11-tool") else None
    if listed is not None and listed.returncode == 0:
        access = [line.split(":", 1)[1].strip() for line in listed.stdout.splitlines() if "Access:" in line]
        say(f"the token, as OpenSC's pkcs11-tool sees it: {len(access)} private keys, {access[0] if access else '?'}")
    say("each SVID this server issues is signed inside the token (--pkcs11-signing-ca); the store holds only "
        "MAC'd references to the keys")
    stop(server)


def say(text: str) -> None:
    print(f"      {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the trustmesh demo on loopback.")
    parser.add_argument("--keep", action="store_true", help="leave everything running and print how to poke it")
    parser.add_argument("--console", action="store_true",
                        help="also serve the web console, and at the end print its URL and a ready operator login; "
                             "runs until Ctrl-C")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="trustmesh-demo-"))
    work.chmod(0o755)  # the second workload runs as another uid and must reach the socket
    env = {**os.environ, "TRUSTMESH_ADMIN_SOCKET": str(work / "server" / "admin.sock"),
           "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[bytes]] = []
    step = Step(total=19)
    ports: dict[str, int] = {}
    echo_port = start_echo()
    core_port = start_legacy_core()
    as_root = os.getuid() == 0

    def cli(*cmd: str) -> str:
        result = subprocess.run(trustmesh(*cmd), capture_output=True, text=True, env=env, timeout=60)
        if result.returncode != 0:
            raise SystemExit(f"trustmesh {' '.join(cmd)} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def start(name: str, *cmd: str, env: dict[str, str] = env) -> tuple[subprocess.Popen[bytes], Path]:
        log = work / f"{name}.log"
        proc = subprocess.Popen(trustmesh(*cmd), stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        procs.append(proc)
        return proc, log

    try:
        oidc_port = free_port()
        with step("starting the control plane (CA + registry, embedded SQLite store)"):
            server, server_log = start("server", "server", "run", "--trust-domain", TRUST_DOMAIN,
                                       "--data-dir", str(work / "server"), "--bind", "127.0.0.1:0",
                                       "--attest-bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0",
                                       "--login-bind", "127.0.0.1:0",
                                       *(["--console-bind", "127.0.0.1:0"] if args.console else []),
                                       # OIDC discovery: JWT-SVIDs carry this issuer; cloud IAM and Vault
                                       # find the keys under it (trustmesh check fetches it in step 17).
                                       "--oidc-discovery-bind", f"127.0.0.1:{oidc_port}",
                                       "--oidc-issuer", f"https://localhost:{oidc_port}",
                                       # Behaviour baselines: learned for 20 s here (7 days by default).
                                       "--learn", "20s")
            ready = wait_for(server_log, r"event=ready .*? bind=(\S+) attest_bind=(\S+) .*?admin_bind=(\S+) "
                             r"login_bind=(\S+)", server, "the control plane")
            bind, attest_bind, admin_bind, login_bind = ready.groups()
            console_url = ""
            if args.console:
                found = re.search(r"event=ready .*?console_bind=(\S+)", server_log.read_text())
                console_url = f"https://{found.group(1)}/" if found else ""
            root = x509.load_pem_x509_certificates((work / "server" / "bundle.pem").read_bytes())[0]
            say(f"trust domain {TRUST_DOMAIN}; root CA valid until {root.not_valid_after_utc:%Y-%m-%d}; "
                f"agents connect to {bind}")
            say("CA keys are stored only encrypted (AES-256-GCM) under the key-encryption key "
                f"{work / 'server' / 'kek.bin'} (mode 0600)")

        with step("admitting node-1 and node-2: one-time join tokens, then each node agent attests"):
            for name in ("ledger", "fx", "payments", "payments_fx", "frontend", "ledger_http", "fraud"):
                ports[name] = free_port()
            agent_logs = {}
            for node, template in (("node-1", NODE1_CONFIG), ("node-2", NODE2_CONFIG)):
                token = cli("token", "create", "--node", node, "--ttl", "5m")
                say(f"{node}: join token (single use, stored only hashed): {token[:8]}…")
                token_file = work / f"{node}.token"  # a file, not argv: /proc/PID/cmdline is world-readable
                token_file.write_text(token)
                token_file.chmod(0o600)
                (work / f"{node}.yaml").write_text(template.format(td=TRUST_DOMAIN, echo=echo_port, core=core_port,
                                                                   **ports))
                agent, agent_log = start(node, "agent", "run", "--config", str(work / f"{node}.yaml"),
                                         "--server", bind, "--attest-server", attest_bind,
                                         "--trust-bundle", str(work / "server" / "bundle.pem"),
                                         "--data-dir", str(work / node), "--socket", str(work / f"{node}.sock"),
                                         "--join-token-file", str(token_file))
                ready = wait_for(agent_log, r"event=ready spiffe_id=(\S+)", agent, f"the {node} agent")
                agent_logs[node] = (agent, agent_log)
                say(f"{node}: agent identity {ready.group(1)}; Workload API at unix://{work / f'{node}.sock'}")
            socket_path = work / "node-1.sock"

        second_uid = OTHER_UID if as_root else os.getuid()
        with step("registering two workloads, told apart by the uid the kernel reports"):
            cli("entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/payments", "--node", "node-1",
                "--selector", f"unix:uid:{os.getuid()}", "--x509-ttl", "8s")
            say(f"spiffe://{TRUST_DOMAIN}/payments  for unix:uid:{os.getuid()}  (8 s certificates, to show rotation)")
            if as_root:
                cli("entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/ledger", "--node", "node-1",
                    "--selector", f"unix:uid:{second_uid}", "--x509-ttl", "1h")
                say(f"spiffe://{TRUST_DOMAIN}/ledger    for unix:uid:{second_uid}  (1 h certificates)")
            else:
                say("(not running as root: the second workload can only show a refusal)")

        workload = [sys.executable, str(ROOT / "scripts" / "demo_workload.py"), str(socket_path)]
        with step("each workload asks the Workload API who it is"):
            for uid in (None, OTHER_UID):
                extra = ["--uid", str(uid)] if uid is not None and as_root else []
                if uid is not None and not as_root:
                    continue
                out = subprocess.run(workload + extra, capture_output=True, text=True, env=env, timeout=60)
                for line in (out.stdout or out.stderr).strip().splitlines():
                    say(line)

        with step("watching payments' certificate rotate (at half its lifetime, pushed to the open stream)"):
            out = subprocess.run(workload + ["--updates", "3"], capture_output=True, text=True, env=env, timeout=60)
            for line in (out.stdout or out.stderr).strip().splitlines():
                say(line)

        policy_file = work / "ledger-access.yaml"
        with step("allowlists as code: payments may call the ledger; frontend for 6 seconds only"):
            # The services' own identities: the ledger on node-1, payments and frontend on node-2.
            # This demo process is their caller, so the entries name it (uid and binary): an
            # outbound listener admits only processes its service's entry matches.
            caller = [f"unix:uid:{os.getuid()}", f"unix:path:{os.path.realpath(sys.executable)}"]
            for name, node in (("ledger", "node-1"), ("fx", "node-1"), ("payments", "node-2"), ("frontend", "node-2")):
                cli("entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/{name}", "--node", node,
                    "--selector", caller[0], "--selector", caller[1])
            say(f"services: ledger on node-1 (inbound :{ports['ledger']}), payments and frontend on node-2")
            lapse = datetime.now(timezone.utc) + timedelta(seconds=6)
            policy_file.write_text(POLICY.format(td=TRUST_DOMAIN, port=ports["ledger"], rules=(
                f"    - from: spiffe://{TRUST_DOMAIN}/payments\n"
                f"    - from: spiffe://{TRUST_DOMAIN}/frontend\n      expires: {lapse:%Y-%m-%dT%H:%M:%SZ}\n")))
            say(cli("policy", "lint", str(policy_file)))
            say(cli("policy", "apply", str(policy_file), "--comment", "demo").splitlines()[-1])
            wait_for(agent_logs["node-1"][1], r"inbound_listening service=ledger", agent_logs["node-1"][0],
                     "node-1's listener")
            wait_for(agent_logs["node-2"][1], r"outbound_listening service=frontend", agent_logs["node-2"][0],
                     "node-2's listeners")
            for name in ("payments", "frontend"):
                say(f"{name} -> ledger over mTLS: {talk(ports[name])}")

        with step("the time-bound allow lapses by itself"):
            time.sleep(max(0.0, (lapse - datetime.now(timezone.utc)).total_seconds()) + 1)
            say(f"frontend -> ledger: {talk(ports['frontend'])}")
            verdict = subprocess.run(trustmesh("policy", "test", "--from", f"spiffe://{TRUST_DOMAIN}/frontend",
                                               "--to", f"spiffe://{TRUST_DOMAIN}/ledger", "--port",
                                               str(ports["ledger"])), capture_output=True, text=True, env=env)
            say(f"why: {verdict.stdout.strip()}")

        with step("time windows: the nightly settlement window closes at 02:00 London time"):
            nightly = work / "settlement.yaml"
            nightly.write_text(POLICY.format(td=TRUST_DOMAIN, port=ports["ledger"], rules=(
                f"    - from: spiffe://{TRUST_DOMAIN}/ns/batch/settlement\n"
                '      when: {days: [mon, tue, wed, thu, fri], hours: "22:00-02:00", timezone: Europe/London}\n')))
            say(cli("policy", "lint", str(nightly)))
            # Friday night's window, on the Saturday morning it ends (GMT); `policy test --at`
            # decides as the agents do at that instant, so no one waits for 02:00.
            for moment in ("2027-01-09T01:59:00Z", "2027-01-09T02:00:00Z"):
                verdict = subprocess.run(trustmesh(
                    "policy", "test", str(nightly), "--from", f"spiffe://{TRUST_DOMAIN}/ns/batch/settlement",
                    "--to", f"spiffe://{TRUST_DOMAIN}/ledger", "--port", str(ports["ledger"]), "--at", moment),
                    capture_output=True, text=True, env=env)
                say(f"Saturday {moment[11:16]} London: {verdict.stdout.strip()}")
            say("an open connection is cut when its window closes, as when a rule expires")

        with step("people are identities too: two operators enroll (password + TOTP) and log in"):
            alice = Person("alice", work, env, admin_bind, login_bind)
            bob = Person("bob", work, env, admin_bind, login_bind)
            for person in (alice, bob):
                token = cli("operator", "add", person.name, "--role", "security-officer", "--team", "payments")
                say(f"{person.name}: one-time enrollment token {token[:8]}… (from `operator add` on the root socket)")
                say(f"{person.name}: {person.enroll_and_login(token)}")

        with step("just-in-time access: alice asks for frontend -> ledger for 8 s; bob approves (four eyes)"):
            request = alice.run("access", "request", "--from", f"spiffe://{TRUST_DOMAIN}/frontend", "--to",
                                f"spiffe://{TRUST_DOMAIN}/ledger", "--port", str(ports["ledger"]), "--for", "8s",
                                "--reason", "INC-1001: replay yesterday's settlement file")
            say(f"alice: access request {request} (pending until someone else approves)")
            refused = alice.run("access", "approve", request, "--otp", alice.code(), check=False)
            say(f"alice approves her own: {refused}")
            say(f"bob: {bob.run('access', 'approve', request, '--otp', bob.code())}")
            grant = json.loads(bob.run("access", "list", "--json"))[0]
            deadline = time.monotonic() + 5
            while (answer := talk(ports["frontend"])).startswith("DENIED") and time.monotonic() < deadline:
                time.sleep(0.2)  # the agents hear of the grant within a second
            say(f"frontend -> ledger: {answer}")

        with step("the grant lapses by itself, and the audit trail names who asked and who approved"):
            time.sleep(max(0.0, grant["expires_at"] - time.time()) + 1)
            say(f"frontend -> ledger after the grant's end: {talk(ports['frontend'])}")
            for event in json.loads(alice.run("audit", "show", "--kind", "access.approve", "--json")):
                d = event["details"]
                say(f"#{event['seq']} {event['time']} access.approve {event['outcome']}: by {event['actor']} "
                    f"(role {d.get('role', '-')}, from {d.get('source', '-')}), requested by {d['requester']}")

        with step("who talks to whom: the agents' flows, the service graph, allowlists suggested from them"):
            # Agents report every connection (allowed, denied, audit, plaintext) every 2 s; the
            # server sums them per edge and hour.
            deadline = time.monotonic() + 10
            while not (flows := json.loads(cli("flows", "--json"))) and time.monotonic() < deadline:
                time.sleep(0.5)
            for f in flows:
                say(f"{f['source'] or f['source_address']} -> {f['destination']}:{f['port']} {f['decision']} "
                    f"x{f['connections']} ({f['bytes_in']} B in, {f['bytes_out']} B out) [{f['rule']}]")
            say("trustmesh graph --format mermaid:")
            for line in cli("graph", "--format", "mermaid").splitlines():
                say(f"  {line}")
            proposed = work / "proposed"
            say(cli("policy", "suggest", "--since", "1h", str(proposed)).splitlines()[0])
            rules = [line.strip() for line in (proposed / "ledger.yaml").read_text().splitlines()
                     if line.strip().startswith(("# ", "- from", "mode"))][3:]
            for line in rules:
                say(f"  {line}")
            say(f"policy simulate {proposed.name}/: {cli('policy', 'simulate', str(proposed)).splitlines()[-1]}")

        with step("a policy change cuts an open connection"):
            conn = socket.create_connection(("127.0.0.1", ports["payments"]), timeout=10)
            conn.sendall(b"ping")
            say(f"open payments -> ledger connection answers: {conn.recv(16).decode()}")
            policy_file.write_text(POLICY.format(td=TRUST_DOMAIN, port=ports["ledger"],
                                                 rules=f"    - from: spiffe://{TRUST_DOMAIN}/ns/batch/*\n"))
            cli("policy", "apply", str(policy_file), "--comment", "payments loses ledger access")
            cut = time.monotonic()
            try:
                gone = conn.recv(16) == b""
            except ConnectionResetError:
                gone = True
            say(f"after the new revision: connection {'closed' if gone else 'STILL OPEN'} "
                f"within {time.monotonic() - cut:.1f}s")
            conn.close()

        with step("checking the tamper-evident audit log"):
            # Denials reach the log as the agent's claim, one aggregated event per agent per minute.
            reports = json.loads(cli("audit", "show", "--kind", "flows.reported", "--json"))
            say(f"{len(reports)} flows.reported event(s) (the agent's aggregated claim), e.g.:")
            for event in reports[-2:]:
                d = event["details"]
                flows = "; ".join(f"{f['source']} -> {f['destination']} x{f['count']} ({f['rule'] or 'no rule'})"
                                  for f in d["flows"][:2])
                say(f"#{event['seq']} {event['time']} {event['actor']}: denied={d['denied']} {flows}"[:200])
            say(cli("audit", "verify"))

        with step("a store writer without the key-encryption key cannot mint identities"):
            # What someone with write access to store.db (but not the KEK) can try: an admin
            # entry for an identity of their own, written straight into the database.
            forged = {"v": 1, "id": "forged", "spiffe_id": f"spiffe://{TRUST_DOMAIN}/attacker",
                      "parent_id": f"spiffe://{TRUST_DOMAIN}/agent/node-1", "selectors": ["unix:uid:0"],
                      "x509_ttl": 3600, "jwt_ttl": 300, "dns_names": [], "federates_with": [], "admin": True,
                      "created_at": time.time(), "updated_at": time.time()}
            with sqlite3.connect(work / "server" / "store.db") as db:
                db.execute("INSERT INTO kv (key, value, create_rev, mod_rev, version) VALUES (?, ?, 1, 1, 1)",
                           (b"entries/forged", json.dumps(forged).encode()))
            say(f"wrote an admin entry for spiffe://{TRUST_DOMAIN}/attacker into store.db by hand (no valid MAC)")
            listed = [e["spiffe_id"] for e in json.loads(cli("entry", "list", "--json"))]
            say(f"entry list: {len(listed)} entries; the forged one is "
                f"{'LISTED (FAILED)' if any('attacker' in s for s in listed) else 'not used'}")
            verify = subprocess.run(trustmesh("audit", "verify"), capture_output=True, text=True, env=env, timeout=60)
            say(f"audit verify (exit {verify.returncode}): {verify.stdout.splitlines()[0][:150]}…")
            with sqlite3.connect(work / "server" / "store.db") as db:
                db.execute("DELETE FROM kv WHERE key = ?", (b"entries/forged",))
            say("row removed again; the refusal stays on record as a store.integrity_failure audit event")

        with step("continuous verification: payments goes rogue, is quarantined with an explanation, released"):
            policy_file.write_text(POLICY.format(td=TRUST_DOMAIN, port=ports["ledger"], rules=(
                f"    - from: spiffe://{TRUST_DOMAIN}/payments\n")) + RESPONSE.format(td=TRUST_DOMAIN))
            say(f"{cli('policy', 'lint', str(policy_file))}: sweeps and bursts of denials -> quarantine")
            cli("policy", "apply", str(policy_file), "--comment", "payments back; containment rules")
            time.sleep(1)
            conn = socket.create_connection(("127.0.0.1", ports["payments"]), timeout=10)
            conn.sendall(b"ping")
            say(f"payments -> ledger (kept open): {'ALLOWED' if conn.recv(16) == b'ping' else 'DENIED'}; "
                "its baseline was learned from the traffic so far")
            for _ in range(25):  # payments hammers the fx service it was never allowed to reach
                talk(ports["payments_fx"])
            say("payments tries spiffe://example.org/fx 25 times in a few seconds: all denied")
            deadline = time.monotonic() + 15
            while not (quarantined := json.loads(cli("quarantine", "list", "--json"))) \
                    and time.monotonic() < deadline:
                time.sleep(0.3)
            for q in quarantined:
                say(f"QUARANTINED {q['target']} by the {q['detector']} detector (score {q['score']:.2f}):")
                say(f"  {q['reason']}")
            conn.settimeout(5)
            try:
                cut = conn.recv(16) == b""
            except OSError:
                cut = True
            conn.close()
            say(f"its open connection: {'cut' if cut else 'STILL OPEN'}; payments -> ledger now: "
                f"{talk(ports['payments'])}")
            released = alice.run("quarantine", "release", f"spiffe://{TRUST_DOMAIN}/payments", "--reason",
                                 "INC-5120: pod rebuilt", "--otp", alice.code())
            say(f"alice (security officer, with a fresh one-time code): {released}")
            deadline = time.monotonic() + 10
            while (answer := talk(ports["payments"])).startswith("DENIED") and time.monotonic() < deadline:
                time.sleep(0.3)
            say(f"payments -> ledger after the release: {answer}")

        with step("a legacy core behind an http listener: fraud-scoring may read the ledger, never change it"):
            cli("entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/fraud-scoring", "--node", "node-2",
                "--selector", caller[0], "--selector", caller[1])
            read_only = work / "ledger-read.yaml"
            read_only.write_text(READ_ONLY.format(td=TRUST_DOMAIN, port=ports["ledger_http"]))
            say("ledger-read: from fraud-scoring, methods [GET, HEAD], paths [/transactions/*]")
            say(cli("policy", "apply", str(policy_file), str(read_only), "--comment", "fraud model: read only")
                .splitlines()[-1])
            deadline = time.monotonic() + 15
            while (got := http_call(ports["fraud"], "GET", "/transactions/42"))[0] != 200 \
                    and time.monotonic() < deadline:
                time.sleep(0.3)  # its SVID and the new revision reach the agents
            say(f"GET  /transactions/42 -> {got[0]}; the core read the caller from X-Trustmesh-Peer-Id: "
                f"{got[1].get('caller')}")
            status, denial = http_call(ports["fraud"], "POST", "/transactions/42")
            say(f"POST /transactions/42 -> {status} {denial.get('error')}: rule {denial.get('rule')!r}, "
                f"request {denial.get('request_id')}")
            say(f"  {denial.get('reason')}")

        with step("trustmesh check: one command says whether the mesh is healthy, and what to do if not"):
            # Exit 0 only when no check failed: cli() stops the demo otherwise.
            for line in cli("check").splitlines():
                if line.strip() and not line.startswith("-"):
                    say(line)

        with step("CA keys in an HSM: a second control plane keeps its root and JWT keys in a PKCS#11 token"):
            hsm_demo(work, env, start)

        if args.console and console_url:
            # Something to approve in the console: alice asks, someone else must approve.
            pending = alice.run("access", "request", "--from", f"spiffe://{TRUST_DOMAIN}/payments", "--to",
                                f"spiffe://{TRUST_DOMAIN}/fx", "--port", str(ports["fx"]), "--for", "1h",
                                "--reason", "INC-5121: reconcile")
            assert alice.totp is not None and bob.totp is not None
            print(f"\nthe web console: {console_url}")
            print(f"  its certificate is the server's own, from this demo's CA: trust {work / 'server' / 'bundle.pem'}"
                  " in your browser, or accept the warning once")
            for person in (alice, bob):
                print(f"  log in as {person.name} (security-officer), password "
                      f"{(person.home / 'pw').read_text().strip()!r}, one-time code from an authenticator with "
                      f"{person.totp.provisioning_uri(name=person.name, issuer_name='trustmesh demo')}")
                print(f"    or: {sys.executable} -c \"import pyotp; print(pyotp.TOTP('{person.totp.secret}').now())\"")
            print(f"  waiting for you: access request {pending} (alice asked; bob approves it on /access)")
            print("everything keeps running until Ctrl-C")
            while all(proc.poll() is None for proc in procs):
                time.sleep(1)
            return 0
        if args.keep:
            print(f"\neverything keeps running; files and logs are in {work}")
            print(f"  export TRUSTMESH_ADMIN_SOCKET={work / 'server' / 'admin.sock'}")
            print("  trustmesh entry list; trustmesh agent list; trustmesh audit show")
            print(f"  SPIFFE_ENDPOINT_SOCKET=unix://{socket_path} your-spiffe-client")
            print(f"stop it with: kill {' '.join(str(p.pid) for p in procs)}")
            procs.clear()
        else:
            print("\ndemo finished; everything stopped.")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything.")
        return 130
    finally:
        for proc in reversed(procs):
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())
