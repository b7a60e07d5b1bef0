"""Flow discovery with real processes: an agent's listeners see allowed, denied, audit-mode
and plaintext (permissive) connections; the server sums them per edge; `trustmesh flows`,
`graph`, `policy suggest` and `policy simulate` read them, across a server outage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.etcd_process import free_port
from tests.integration.harness import AgentProcess, ServerProcess, echo_server, trustmesh_cmd, wait_until
from tests.integration.test_enforcement import _talk
from trustmesh.clock import format_utc
from trustmesh.detect.trace import TraceRecord, read_trace, record_to_line

SELF_EXE = os.path.realpath(sys.executable)
TD = "spiffe://example.org"
PAYMENTS, FRONTEND, LEDGER, FX, BATCH = (f"{TD}/{n}" for n in ("payments", "frontend", "ledger", "fx", "batch"))
HELLO = b"hello ledger"  # 12 bytes, echoed back

POLICY = f"""\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access}}
spec: {{destination: "{LEDGER}", mode: enforce, allow: [{{from: "{PAYMENTS}"}}]}}
---
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: fx-discovery}}
spec: {{destination: "{FX}", mode: audit, allow: [{{from: "{TD}/nobody"}}]}}
"""


@dataclass
class Estate:
    server: ServerProcess
    agent: AgentProcess
    ports: dict[str, int]

    def flows(self, *args: str) -> list[dict[str, object]]:
        reply = self.server.cli("flows", "--since", "1h", "--json", *args, check=True)
        data: list[dict[str, object]] = json.loads(reply.stdout)
        return data

    def edge(self, source: str, destination: str, decision: str) -> dict[str, object] | None:
        return next((f for f in self.flows() if f["source"] == source and f["destination"] == destination
                     and f["decision"] == decision), None)

    def connections(self, source: str, destination: str, decision: str) -> int:
        edge = self.edge(source, destination, decision)
        return int(edge["connections"]) if edge else 0  # type: ignore[call-overload]


@pytest.fixture
def estate(make_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[Estate]:
    server = make_server(extra=["--flow-rollup-interval", "1s"])
    ledger_echo, ledger_stop = echo_server()
    fx_echo, fx_stop = echo_server()
    ports = {name: free_port() for name in ("ledger", "fx", "pay-ledger", "front-ledger", "pay-fx")}
    for name in ("ledger", "fx", "payments", "frontend", "batch"):
        server.cli("entry", "create", "--spiffe-id", f"{TD}/{name}", "--node", "node-1",
                   "--selector", f"unix:uid:{os.getuid()}", "--selector", f"unix:path:{SELF_EXE}", check=True)
    (tmp_path / "policy.yaml").write_text(POLICY)
    server.cli("policy", "apply", str(tmp_path / "policy.yaml"), check=True)
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
services:
  - name: ledger
    spiffe_id: {LEDGER}
    inbound: {{listen: 127.0.0.1:{ports['ledger']}, forward: 127.0.0.1:{ledger_echo}}}
  - name: fx
    spiffe_id: {FX}
    inbound: {{listen: 127.0.0.1:{ports['fx']}, forward: 127.0.0.1:{fx_echo}, mtls: permissive}}
  - name: payments
    spiffe_id: {PAYMENTS}
    outbound:
      - {{listen: 127.0.0.1:{ports['pay-ledger']}, connect: 127.0.0.1:{ports['ledger']}, expect: {LEDGER}}}
      - {{listen: 127.0.0.1:{ports['pay-fx']}, connect: 127.0.0.1:{ports['fx']}, expect: {FX}}}
  - name: frontend
    spiffe_id: {FRONTEND}
    outbound:
      - {{listen: 127.0.0.1:{ports['front-ledger']}, connect: 127.0.0.1:{ports['ledger']}, expect: {LEDGER}}}
""")
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=token, config=config).start()
    try:
        assert wait_until(lambda: agent.log().count("inbound_listening") >= 2
                         and agent.log().count("outbound_listening") >= 3)
        yield Estate(server, agent, ports)
    finally:
        agent.stop()
        ledger_stop.set()
        fx_stop.set()


def _plaintext(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return conn.recv(1024)


@pytest.mark.slow
def test_flows_are_counted_survive_an_outage_and_become_a_policy(estate: Estate, tmp_path: Path) -> None:
    server, ports = estate.server, estate.ports
    for _ in range(3):
        assert _talk(ports["pay-ledger"], HELLO) == HELLO  # allowed
    for _ in range(2):
        assert _talk(ports["front-ledger"], HELLO) == b""  # denied by the enforced allowlist
        assert _talk(ports["pay-fx"], HELLO) == HELLO  # audit mode: enforce would deny it, it goes through
    assert _plaintext(ports["fx"]) == b"GET / HTTP/1.0\r\n\r\n"  # a legacy caller without TLS, forwarded
    assert wait_until(lambda: estate.connections(PAYMENTS, LEDGER, "allow") == 3
                     and estate.connections(FRONTEND, LEDGER, "deny") == 2
                     and estate.connections(PAYMENTS, FX, "audit") == 2
                     and estate.connections("", FX, "unverified") == 1, timeout=30)
    # Bytes are counted when a connection ends (an mTLS one up to 10 s after its client left,
    # as a TLS stream cannot be half-closed), and every minute while it lasts.
    assert wait_until(lambda: (estate.edge(PAYMENTS, LEDGER, "allow") or {}).get("bytes_out") == 3 * len(HELLO)
                     and (estate.edge("", FX, "unverified") or {}).get("bytes_out") == 18, timeout=40)
    allowed = estate.edge(PAYMENTS, LEDGER, "allow")
    assert allowed is not None and allowed["port"] == ports["ledger"] and allowed["rule"] == "ledger-access allow[0]"
    assert allowed["bytes_in"] == allowed["bytes_out"] == 3 * len(HELLO)
    denied = estate.edge(FRONTEND, LEDGER, "deny")
    assert denied is not None and denied["bytes_in"] == 0 and denied["rule"] == "default deny"
    plaintext = estate.edge("", FX, "unverified")
    assert plaintext is not None and plaintext["source_address"] == "127.0.0.1" and plaintext["bytes_in"] == 18
    assert str(allowed["first_seen"]).endswith("Z")
    assert [f["source"] for f in estate.flows("--decision", "deny")] == [FRONTEND]
    # Nobody forgets a permissive listener: the agent's record names it.
    [agent] = json.loads(server.cli("agent", "list", "--json", check=True).stdout)
    assert agent["permissive_listeners"] == [f"fx 127.0.0.1:{ports['fx']}"]
    assert "node-1: permissive inbound listeners" in server.cli("agent", "list", check=True).stdout
    check = server.cli("check", "--json")
    assert check.returncode == 1, check.stderr
    found = {c["name"]: (c["status"], c["detail"]) for c in json.loads(check.stdout) if c["group"] == "posture"}
    assert found["no permissive listeners"] == (
        "fail", f"forwarding plaintext without an identity: node-1: fx 127.0.0.1:{ports['fx']}")
    assert found["no unverified callers"] == ("warn", f"plaintext callers in the last 24 h: {FX} from 127.0.0.1")
    assert found["allowlists enforce"] == ("warn", f"in audit mode, denying nothing: fx-discovery ({FX})")
    assert found["no suspected clones"][0] == found["break-glass reviewed"][0] == "ok"
    assert [f["decision"] for f in estate.flows("--from", PAYMENTS, "--to", FX)] == ["audit"]

    # The server goes away; the agent keeps serving and counting, and sends it all when it returns.
    server.stop()
    for _ in range(2):
        assert _talk(ports["pay-ledger"], HELLO) == HELLO
    server.start()
    assert wait_until(lambda: estate.connections(PAYMENTS, LEDGER, "allow") == 5, timeout=60)

    # The graph, as Graphviz reads it.
    dot = server.cli("graph", "--since", "1h", "--format", "dot", check=True).stdout
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, timeout=30, check=True).stdout
    assert PAYMENTS in svg and "unverified:127.0.0.1" in svg
    # Entries no flow ever named.
    orphans = json.loads(server.cli("flows", "--orphans", "--json", check=True).stdout)
    assert orphans["unseen_entries"] == [BATCH] and orphans["unregistered"] == []

    # suggest -> lint -> apply (audit) -> simulate: the same traffic, nothing would be denied.
    proposed = tmp_path / "proposed"
    out = server.cli("policy", "suggest", "--since", "1h", str(proposed), check=True).stdout
    assert "1 unverified caller(s) to resolve" in out
    ledger_file = (proposed / "ledger.yaml").read_text()
    assert f'- from: "{PAYMENTS}"' in ledger_file and FRONTEND not in ledger_file  # denied: never a rule
    assert "127.0.0.1 on port" in (proposed / "fx.yaml").read_text()
    assert server.cli("policy", "lint", str(proposed)).returncode == 0
    server.cli("policy", "apply", str(proposed), "--comment", "suggested from traffic", check=True)
    sim = server.cli("policy", "simulate", str(proposed), "--since", "1h")
    assert sim.returncode == 0, sim.stdout + sim.stderr
    assert "no observed flow would be denied; 0 rule(s) unused" in sim.stdout

    # A candidate that drops a rule still in use is caught, on the server's flows and offline.
    (proposed / "ledger.yaml").write_text(ledger_file.replace(PAYMENTS, f"{TD}/someone-else"))
    sim = server.cli("policy", "simulate", str(proposed), "--since", "1h")
    assert sim.returncode == 1
    assert f"WOULD DENY  {PAYMENTS} -> {LEDGER}:{ports['ledger']}  5 connection(s)" in sim.stdout
    export = tmp_path / "flows.jsonl"
    export.write_text(server.cli("flows", "export", "--since", "1h", "--format", "edges", check=True).stdout)
    offline = subprocess.run(trustmesh_cmd("policy", "simulate", str(proposed), "--flows", str(export), "--json"),
                             capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, "TRUSTMESH_ADMIN_SOCKET": "/nonexistent"})
    assert offline.returncode == 1, offline.stderr
    assert [r["source"] for r in json.loads(offline.stdout)["would_deny"]] == [PAYMENTS]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    assert server.cli("policy", "simulate", str(proposed), "--flows", str(broken)).returncode == 2


def test_flows_export_streams_the_per_minute_trace(make_server: Callable[..., ServerProcess],
                                                   tmp_path: Path) -> None:
    """`flows export` (jsonl) streams the trace files in the server's data directory over the
    admin API: the window's lines, whole, in order, in several messages; `policy simulate
    --flows` reads them. (The detection service fills the files; here they are written first.)"""
    server = make_server()
    assert server.cli("flows", "export", check=True).stdout == ""  # no traffic, no trace
    now = time.time() // 60 * 60
    older = TraceRecord(now - 7200, "node-1", FRONTEND, LEDGER, 8443, "allow", 3, 30, 300)
    recent = [TraceRecord(now - 120, "node-1", PAYMENTS, LEDGER, port, "allow", 1, 10, 100)
              for port in range(1, 3001)]  # about 700 KB: more than one message of the stream
    trace = server.data_dir / "trace"
    trace.mkdir(mode=0o700, exist_ok=True)
    for record in [older, *recent]:
        with (trace / f"{format_utc(record.ts)[:10]}.jsonl").open("a") as day:
            day.write(record_to_line(record))
    with (trace / f"{format_utc(now - 120)[:10]}.jsonl").open("a") as day:
        day.write("{not json\n")  # skipped (the server logs it), the rest still exported

    exported = server.cli("flows", "export", "--since", "1h", check=True).stdout
    assert list(read_trace(exported.splitlines(), "export")) == recent
    earlier = server.cli("flows", "export", "--since", "3h", "--until", "1h", "--format", "jsonl", check=True)
    assert list(read_trace(earlier.stdout.splitlines(), "export")) == [older]
    assert server.cli("flows", "export", "--since", "3h", "--format", "edges", check=True).stdout == ""
    bad = server.cli("flows", "export", "--since", "1h", "--until", "2h")
    assert bad.returncode != 0 and "--until '2h' is not after --since '1h'" in bad.stderr

    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "trace.jsonl").write_text(earlier.stdout + exported)
    offline = subprocess.run(trustmesh_cmd("policy", "simulate", str(tmp_path / "policy.yaml"), "--flows",
                                           str(tmp_path / "trace.jsonl"), "--json"),
                             capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, "TRUSTMESH_ADMIN_SOCKET": "/nonexistent"})
    assert offline.returncode == 1, offline.stderr
    assert {r["source"] for r in json.loads(offline.stdout)["would_deny"]} == {FRONTEND}
