"""Continuous verification end to end, with a real server and a real agent on loopback:
payments holds an allowed connection to the ledger, then sweeps six services it may not
reach. The agents report the denials; the server's detectors see the sweep; the Response
document applied with the allowlists quarantines payments: its open connection is cut, new
ones are refused, its SVID renewal is refused, the evidence is listed and audited, and a
security officer's release (with step-up) restores it. In dry run the same sweep is audited
as what would have been done, and nothing is."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.etcd_process import free_port
from tests.integration.harness import AgentProcess, ServerProcess, echo_server, wait_until
from tests.integration.operators_kit import Operator, add_operator, audit
from tests.integration.test_quarantine import LEDGER, PAYMENTS, SELF_EXE, TD, _cut_within, _open, _talk
from tests.integration.test_quarantine import POLICY as LEDGER_POLICY

PROBED = [f"{TD}/svc{i}" for i in range(6)]
# The ledger's allowlist, and what anomalies lead to, applied together as one revision.
POLICY = LEDGER_POLICY + """\
---
apiVersion: trustmesh/v1
kind: Response
metadata: {{name: containment, owner: security}}
spec:
  rules:
    - identity: spiffe://example.org/*
      detectors: [sweep]
      action: quarantine
      above: 0.7
"""


@dataclass
class Estate:
    server: ServerProcess
    agent: AgentProcess
    officer: Operator
    ports: dict[str, int]


def _estate(make_server: Callable[..., ServerProcess], tmp_path: Path, *extra: str) -> Iterator[Estate]:
    server = make_server(extra=["--admin-bind", "127.0.0.1:0", "--login-bind", "127.0.0.1:0", "--learn", "0s",
                                *extra])
    admin, login = re.search(r"admin_bind=(\S+)", server.log()), re.search(r"login_bind=(\S+)", server.log())
    assert admin and login
    echo_port, stop_echo = echo_server()
    ports = {name: free_port() for name in ("ledger", "pay-ledger", *(f"svc{i}" for i in range(6)),
                                            *(f"pay-svc{i}" for i in range(6)))}
    selectors = ["--selector", f"unix:uid:{os.getuid()}", "--selector", f"unix:path:{SELF_EXE}"]
    # payments' certificates live 10 s: renewals come every few seconds, so a refused one shows.
    server.cli("entry", "create", "--spiffe-id", PAYMENTS, "--node", "node-1", "--x509-ttl", "10s", *selectors,
               check=True)
    for sid in (LEDGER, *PROBED):
        server.cli("entry", "create", "--spiffe-id", sid, "--node", "node-1", *selectors, check=True)
    (tmp_path / "policy.yaml").write_text(POLICY.format(port=ports["ledger"]))
    lint = server.cli("policy", "lint", str(tmp_path / "policy.yaml"), check=True).stdout
    assert "1 Response document(s) with 1 rule(s)" in lint
    server.cli("policy", "apply", str(tmp_path / "policy.yaml"), check=True)
    inbound = "".join(f"""\
  - name: svc{i}
    spiffe_id: {PROBED[i]}
    inbound: {{listen: 127.0.0.1:{ports[f'svc{i}']}, forward: 127.0.0.1:{echo_port}}}
""" for i in range(6))
    routes = "".join(f"      - {{listen: 127.0.0.1:{ports[f'pay-svc{i}']}, connect: 127.0.0.1:{ports[f'svc{i}']}, "
                     f"expect: {PROBED[i]}}}\n" for i in range(6))
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
services:
  - name: ledger
    spiffe_id: {LEDGER}
    inbound: {{listen: 127.0.0.1:{ports['ledger']}, forward: 127.0.0.1:{echo_port}}}
{inbound}  - name: payments
    spiffe_id: {PAYMENTS}
    outbound:
      - {{listen: 127.0.0.1:{ports['pay-ledger']}, connect: 127.0.0.1:{ports['ledger']}, expect: {LEDGER}}}
{routes}""")
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=token, config=config).start()
    try:
        officer = add_operator((server, admin.group(1), login.group(1)), tmp_path, "olga", "security-officer")
        assert officer.login().returncode == 0
        assert wait_until(lambda: agent.log().count("inbound_listening") >= 7
                         and agent.log().count("outbound_listening") >= 7, 30)
        yield Estate(server, agent, officer, ports)
    finally:
        agent.stop()
        stop_echo.set()


@pytest.fixture
def estate(make_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[Estate]:
    yield from _estate(make_server, tmp_path)


class Webhook:
    """An alert receiver on loopback: what a SIEM or a chat bridge would be."""

    def __init__(self) -> None:
        self.received: list[dict[str, object]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append({"content_type": self.headers.get("Content-Type"), **json.loads(body)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


@pytest.fixture
def dry_estate(make_server: Callable[..., ServerProcess], tmp_path: Path, webhook: Webhook) -> Iterator[Estate]:
    yield from _estate(make_server, tmp_path, "--detect-dry-run", "on", "--alert-webhook", webhook.url)


def _sweep(estate: Estate) -> None:
    for i in range(6):
        assert _talk(estate.ports[f"pay-svc{i}"]) == b""  # denied by the svc's inbound listener


@pytest.mark.slow
def test_a_sweeping_identity_is_quarantined_cut_refused_and_released(estate: Estate) -> None:
    server, agent, ports = estate.server, estate.agent, estate.ports
    conn = _open(ports["pay-ledger"])  # allowed, and kept open
    _sweep(estate)
    # The agent reports every 2 s; the quarantine then reaches it at once.
    assert _cut_within(conn, 20) < 15
    assert _talk(ports["pay-ledger"]) == b""  # a new connection is refused
    (quarantine,) = json.loads(server.cli("quarantine", "list", "--json", check=True).stdout)
    assert quarantine["target"] == PAYMENTS and quarantine["kind"] == "identity"
    assert quarantine["created_by"] == "detector" and quarantine["detector"] == "sweep"
    assert quarantine["score"] >= 0.7
    assert "was denied on 6 distinct destination ports (6 destination(s)" in quarantine["reason"]
    assert quarantine["evidence"] == [quarantine["reason"]]
    # Its renewals are refused (10 s certificates: one is due within seconds).
    assert wait_until(lambda: "event=svid_refused" in agent.log() and "is in quarantine" in agent.log(), 20), \
        agent.log()[-3000:]
    # Explained in the audit log and the metrics.
    anomaly = next(e for e in audit(server, "--kind", "detect.anomaly") if e["details"]["detector"] == "sweep")
    assert anomaly["actor"] == "detector" and anomaly["subject"] == PAYMENTS
    assert anomaly["details"]["action"] == "quarantine" and anomaly["details"]["rule"] == "containment rules[0]"
    added = audit(server, "--kind", "quarantine.add")
    assert [e["subject"] for e in added] == [PAYMENTS] and added[0]["actor"] == "detector"

    released = estate.officer.run("quarantine", "release", PAYMENTS, "--reason", "INC-5120: pod rebuilt",
                                  "--otp", estate.officer.code())
    assert released.returncode == 0, released.stderr
    # At once: the agent asks again for what was refused when the release reaches it.
    ok = wait_until(lambda: _talk(ports["pay-ledger"]) == b"hello ledger", 10)
    assert ok, agent.log()[-5000:]
    assert json.loads(server.cli("quarantine", "list", "--json", check=True).stdout) == []
    # Released, it is watched again (not quarantined for the same sweep twice: the sweep's
    # cooldown holds), and the trace of what happened can be exported and replayed.
    export = server.cli("flows", "export", "--since", "1h", "--until", "2099-01-01T00:00:00Z", check=True).stdout
    assert export == "" or all(json.loads(line)["ts"].endswith("Z") for line in export.splitlines())


def test_dry_run_records_what_it_would_do_and_does_nothing(dry_estate: Estate, webhook: Webhook) -> None:
    server, ports = dry_estate.server, dry_estate.ports
    conn = _open(ports["pay-ledger"])
    _sweep(dry_estate)

    def would_quarantine() -> list[dict[str, object]]:
        return [e for e in audit(server, "--kind", "detect.anomaly") if e["details"]["detector"] == "sweep"]

    assert wait_until(lambda: bool(would_quarantine()), 20)
    (event,) = would_quarantine()
    assert event["details"]["action"] == "quarantine" and event["details"]["dry_run"] is True
    assert json.loads(server.cli("quarantine", "list", "--json", check=True).stdout) == []
    conn.sendall(b"still")
    assert conn.recv(16) == b"still"  # nothing was cut
    conn.close()
    assert _talk(ports["pay-ledger"]) == b"hello ledger"
    # Every alert was posted to the webhook as the JSON `detect replay --json` prints.
    assert wait_until(lambda: any(a.get("detector") == "sweep" for a in webhook.received), 10)
    posted = next(a for a in webhook.received if a["detector"] == "sweep")
    assert posted["content_type"] == "application/json" and posted["identity"] == PAYMENTS
    assert posted["action"] == "quarantine" and posted["dry_run"] is True and str(posted["ts"]).endswith("Z")
    assert "was denied on 6 distinct destination ports" in str(posted["reason"])
