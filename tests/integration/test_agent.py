"""The node agent as a real process: Workload API, rotation, entries, restarts, outages.

The workload is this test process (uid 0 here), talking to the agent's socket with grpcio
and the standard Workload API messages; a second workload runs as uid 65534.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from tests.integration.harness import AgentProcess, ServerProcess
from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
from trustmesh.der import load_der_certificates
from trustmesh.jwtsvid import parse_insecure
from trustmesh.spiffeid import TrustDomain
from trustmesh.x509svid import verify_x509_svid

HEADER = [("workload.spiffe.io", "true")]
UID = os.getuid()


@pytest.fixture
def setup(make_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[tuple[ServerProcess, AgentProcess]]:
    server = make_server()
    tok = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=tok)
    yield server, agent
    agent.stop()


def entry(server: ServerProcess, name: str, *extra: str, uid: int = UID) -> str:
    return server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/{name}", "--node", "node-1",
                      "--selector", f"unix:uid:{uid}", *extra, check=True).stdout.strip()


def stub(agent: AgentProcess) -> workload_pb2_grpc.SpiffeWorkloadAPIStub:
    return workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(f"unix:{agent.socket}"))


def leaf_of(svid: workload_pb2.X509SVID) -> x509.Certificate:
    return load_der_certificates(svid.x509_svid)[0]


def test_first_svid_rotation_and_entry_changes_reach_an_open_stream(setup: tuple[ServerProcess, AgentProcess]) -> None:
    server, agent = setup
    entry(server, "ledger", "--x509-ttl", "4s")
    agent.start()
    stream = stub(agent).FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=40)
    first = next(stream)
    assert [s.spiffe_id for s in first.svids] == ["spiffe://example.org/ledger"]
    svid = first.svids[0]
    chain = load_der_certificates(svid.x509_svid)
    roots = load_der_certificates(svid.bundle)
    td = TrustDomain("example.org")
    assert str(verify_x509_svid(chain, {td: roots})) == "spiffe://example.org/ledger"
    assert svid.x509_svid_key[:1] == b"\x30"  # PKCS#8 DER
    # Rotation is pushed on the open stream well before expiry.
    rotated = next(stream)
    assert leaf_of(rotated.svids[0]).serial_number != leaf_of(svid).serial_number
    assert leaf_of(rotated.svids[0]).not_valid_after_utc > leaf_of(svid).not_valid_after_utc
    # An entry added while streaming shows up; every message is a full snapshot.
    second = entry(server, "audit-reader")
    while True:
        message = next(stream)
        ids = sorted(s.spiffe_id for s in message.svids)
        if "spiffe://example.org/audit-reader" in ids:
            break
    assert ids == ["spiffe://example.org/audit-reader", "spiffe://example.org/ledger"]
    server.cli("entry", "delete", second, check=True)
    while True:
        message = next(stream)
        if len(message.svids) == 1:
            break
    assert message.svids[0].spiffe_id == "spiffe://example.org/ledger"
    stream.cancel()


def test_deleting_the_last_entry_withdraws_with_permission_denied(setup: tuple[ServerProcess, AgentProcess]) -> None:
    server, agent = setup
    eid = entry(server, "ledger")
    agent.start()
    stream = stub(agent).FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=30)
    assert next(stream).svids
    server.cli("entry", "delete", eid, check=True)
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # never a clean OK end


def test_header_required_and_unregistered_uid_denied(setup: tuple[ServerProcess, AgentProcess]) -> None:
    server, agent = setup
    entry(server, "ledger")
    agent.start()
    with pytest.raises(grpc.RpcError) as info:
        next(stub(agent).FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if UID != 0:
        pytest.skip("needs root to run a workload as another uid")
    # The client imports as root, then drops to uid 65534 before it connects: the kernel
    # records the credentials at connect(), so the agent sees uid 65534.
    script = textwrap.dedent(f"""
        import grpc, os, sys
        from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
        os.setgid(65534)
        os.setuid(65534)
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:{agent.socket}"))
        try:
            md = [("workload.spiffe.io", "true")]
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=md, timeout=10))
        except grpc.RpcError as err:
            print(err.code().name)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        cwd="/",
    )
    assert out.stdout.strip() == "PERMISSION_DENIED", out.stderr


def test_jwt_svid_and_bundles(setup: tuple[ServerProcess, AgentProcess]) -> None:
    server, agent = setup
    entry(server, "ledger")
    agent.start()
    api = stub(agent)
    reply = api.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["payments", "audit"]), metadata=HEADER, timeout=10)
    token = reply.svids[0].svid
    _, claims = parse_insecure(token)
    assert claims["sub"] == "spiffe://example.org/ledger" and sorted(claims["aud"]) == ["audit", "payments"]
    valid = api.ValidateJWTSVID(
        workload_pb2.ValidateJWTSVIDRequest(audience="audit", svid=token), metadata=HEADER, timeout=10
    )
    assert valid.spiffe_id == "spiffe://example.org/ledger"
    with pytest.raises(grpc.RpcError) as info:
        api.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="other", svid=token), metadata=HEADER, timeout=10
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        api.FetchJWTSVID(workload_pb2.JWTSVIDRequest(), metadata=HEADER, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bundles = next(api.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=10))
    assert b'"kid"' in bundles.bundles["spiffe://example.org"]
    x509_bundles = next(api.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=10))
    assert load_der_certificates(x509_bundles.bundles["spiffe://example.org"])


@pytest.mark.slow
def test_restart_after_sigkill_needs_no_token_and_outages_keep_svids(setup: tuple[ServerProcess, AgentProcess]) -> None:
    server, agent = setup
    entry(server, "ledger", "--x509-ttl", "30s")
    agent.start()
    first = next(stub(agent).FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=20))
    assert first.svids
    agent.kill()
    agent.join_token = None  # the stored identity must be enough
    started = time.monotonic()
    agent.start()
    again = next(stub(agent).FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=20))
    assert again.svids and time.monotonic() - started < 15
    assert "event=identity_loaded" in agent.log()
    # The same agent again, from the same address: no copied key suspected (issue 13, hole 6).
    [node] = json.loads(server.cli("agent", "list", "--json", check=True).stdout)
    assert node["status"] == "active"
    assert "agent.suspected_clone" not in server.cli("audit", "show", "--json", check=True).stdout
    # The control plane goes away for longer than a rotation period (15 s at a 30 s TTL).
    server.stop()
    time.sleep(16)
    during = next(stub(agent).FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=20))
    leaf = leaf_of(during.svids[0])
    assert leaf.not_valid_after_utc.timestamp() > time.time()
    assert "event=server_unreachable" in agent.log()
    # It catches up when the server returns.
    server.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and agent.log().count("event=sync_connected") < 2:
        time.sleep(0.2)
    assert agent.log().count("event=sync_connected") >= 2


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_churn_and_garbage_leak_nothing_and_hurt_no_one(setup: tuple[ServerProcess, AgentProcess]) -> None:
    import socket as socketlib

    server, agent = setup
    entry(server, "ledger")
    agent.start()
    assert agent.proc is not None
    watcher = stub(agent).FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=120)
    assert next(watcher).svids
    baseline = _fds(agent.proc.pid)
    # Garbage on the socket, and clients that hang up mid-stream, over and over.
    for i in range(1000):
        raw = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        raw.connect(str(agent.socket))
        if i % 2:
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n" if i % 4 == 1 else os.urandom(64))
        raw.close()
    for _ in range(100):
        channel = grpc.insecure_channel(f"unix:{agent.socket}")
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=10
        )
        next(stream)
        stream.cancel()
        channel.close()
    # The long-lived watcher still gets fresh snapshots, and nothing piled up in the agent.
    eid = entry(server, "second")
    while len(next(watcher).svids) < 2:
        pass
    server.cli("entry", "delete", eid, check=True)
    time.sleep(1)
    assert _fds(agent.proc.pid) <= baseline + 5
    assert agent.proc.poll() is None
    watcher.cancel()


def test_authorize_answers_from_the_policy_the_agent_holds(
    setup: tuple[ServerProcess, AgentProcess], tmp_path: Path
) -> None:
    from trustmesh._proto.trustmesh.v1 import agent_pb2, agent_pb2_grpc

    server, agent = setup
    entry(server, "ledger")
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: ledger-access}\n"
        "spec: {destination: spiffe://example.org/ledger, ports: [9443],"
        " allow: [{from: spiffe://example.org/payments}]}\n"
    )
    server.cli("policy", "apply", str(policy), check=True)
    agent.start()
    authz = agent_pb2_grpc.AgentAuthorizationStub(grpc.insecure_channel(f"unix:{agent.socket}"))

    def ask(source: str, port: int = 9443) -> agent_pb2.AuthorizeResponse:
        return authz.Authorize(
            agent_pb2.AuthorizeRequest(source_id=source, destination_id="spiffe://example.org/ledger", port=port),
            timeout=10,
        )

    deadline = time.monotonic() + 10
    while ask("spiffe://example.org/payments").policy_revision < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    allowed = ask("spiffe://example.org/payments")
    assert allowed.allowed and allowed.rule == "ledger-access allow[0]" and allowed.policy_revision == 1
    # Questions about identities the caller (ledger) is not are answered, never reported.
    for i in range(50):
        forged = authz.Authorize(agent_pb2.AuthorizeRequest(source_id=f"spiffe://example.org/intruder{i}",
                                                            destination_id="spiffe://example.org/vault"), timeout=10)
        assert not forged.allowed
    denied = ask("spiffe://example.org/frontend")
    assert not denied.allowed and denied.rule == "default deny" and "frontend" in denied.reason
    deadline = time.monotonic() + 15
    while "example.org/frontend" not in (audit := server.cli("audit", "show", "--json", check=True).stdout):
        assert time.monotonic() < deadline, "the ledger's own denial was not reported"
        time.sleep(0.2)
    assert "intruder" not in audit and "vault" not in audit
    assert not ask("spiffe://example.org/payments", port=22).allowed
    with pytest.raises(grpc.RpcError) as info:
        ask("not-an-id")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_authorize_covers_ports_prefixes_audit_mode_and_expiry(
    setup: tuple[ServerProcess, AgentProcess], tmp_path: Path
) -> None:
    from datetime import datetime, timedelta, timezone

    from trustmesh._proto.trustmesh.v1 import agent_pb2, agent_pb2_grpc

    server, agent = setup
    entry(server, "ledger")
    entry(server, "reports/daily")  # the node serves it, so its allowlists are sent to this agent
    lapse = datetime.now(timezone.utc) + timedelta(seconds=4)
    policy = tmp_path / "p.yaml"
    policy.write_text(f"""\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access}}
spec:
  destination: spiffe://example.org/ledger
  ports: [9443]
  allow:
    - from: spiffe://example.org/ns/batch/*
    - from: spiffe://example.org/oncall
      expires: {lapse:%Y-%m-%dT%H:%M:%SZ}
---
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: reports-rollout}}
spec:
  destination: spiffe://example.org/reports/*
  mode: audit
  allow:
    - from: spiffe://example.org/payments
""")
    server.cli("policy", "apply", str(policy), check=True)
    agent.start()
    authz = agent_pb2_grpc.AgentAuthorizationStub(grpc.insecure_channel(f"unix:{agent.socket}"))

    def ask(
        source: str, destination: str = "spiffe://example.org/ledger", port: int = 9443
    ) -> agent_pb2.AuthorizeResponse:
        return authz.Authorize(
            agent_pb2.AuthorizeRequest(source_id=source, destination_id=destination, port=port), timeout=10
        )

    deadline = time.monotonic() + 10
    while ask("spiffe://example.org/x").policy_revision < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ask("spiffe://example.org/ns/batch/nightly").rule == "ledger-access allow[0]"  # prefix
    assert not ask("spiffe://example.org/ns/batchjob").allowed  # whole segments only
    assert not ask("spiffe://example.org/ns/batch/nightly", port=8080).allowed  # port rule
    assert ask("spiffe://example.org/oncall").allowed  # time-bound, still valid
    audit = ask("spiffe://example.org/frontend", "spiffe://example.org/reports/daily", 443)
    assert audit.allowed and audit.audit_only and audit.rule == "reports-rollout (audit mode)"
    normal = ask("spiffe://example.org/payments", "spiffe://example.org/reports/daily", 443)
    assert normal.allowed and not normal.audit_only
    time.sleep(max(0.0, (lapse - datetime.now(timezone.utc)).total_seconds()) + 0.5)
    lapsed = ask("spiffe://example.org/oncall")
    assert not lapsed.allowed and "expired" in lapsed.reason  # lapsed by itself, nobody removed it


# --- attestation failures, bans and the agent's own rotation -------------------------------------


def _run_agent_once(server: ServerProcess, data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    from tests.integration.harness import trustmesh_cmd

    return subprocess.run(
        trustmesh_cmd(
            "agent",
            "run",
            "--server",
            server.bind,
            "--attest-server",
            server.attest_bind,
            "--trust-bundle",
            str(server.bundle_path),
            "--data-dir",
            str(data_dir),
            "--socket",
            str(data_dir / "w.sock"),
            *extra,
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_no_identity_and_a_refused_token_are_clear_errors(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = make_server()
    first = _run_agent_once(server, tmp_path / "a")
    assert first.returncode == 1
    assert (
        "trustmesh: error: this agent has no identity yet: start it once with --join-token "
        "(create one with `trustmesh token create --node NAME`)"
    ) in first.stderr
    tok = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    AgentProcess(server, tmp_path / "b", join_token=tok).start().stop()
    reused = _run_agent_once(server, tmp_path / "c", "--join-token", tok)  # single use: refused now
    assert reused.returncode == 1
    assert "refused the join token" in reused.stderr and "trustmesh token create" in reused.stderr
    assert "event=token_refused" in reused.stderr and "reason=token_refused" in reused.stderr


def _metrics(address: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _free_port() -> int:
    import socket as socketlib

    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_banned_agent_says_so_and_keeps_serving(setup: tuple[ServerProcess, AgentProcess], tmp_path: Path) -> None:
    server, agent = setup
    entry(server, "ledger", "--x509-ttl", "60s")
    metrics = f"127.0.0.1:{_free_port()}"
    agent.config = tmp_path / "agent.yaml"
    agent.config.write_text(f"metrics: {metrics}\n")
    agent.start()
    assert next(stub(agent).FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=20)).svids
    assert 'trustmesh_agent_server_state{state="connected"} 1' in _metrics(metrics)
    server.cli("agent", "ban", "node-1", check=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "event=agent_refused" not in agent.log():
        time.sleep(0.1)
    log = agent.log()
    assert "event=agent_refused" in log and "an operator must re-admit it" in log
    text = _metrics(metrics)
    assert 'trustmesh_agent_server_state{state="banned"} 1' in text
    assert 'trustmesh_agent_server_state{state="unreachable"} 0' in text
    # What it holds is still served until it expires.
    during = next(stub(agent).FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=20))
    assert during.svids and leaf_of(during.svids[0]).not_valid_after_utc.timestamp() > time.time()
    time.sleep(1.5)
    assert agent.log().count("event=agent_refused") <= 2, "no retry storm after a ban"


@pytest.mark.slow
def test_the_agent_svid_rotates_onto_a_new_channel(make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = make_server(extra=["--agent-ttl", "6s"])
    tok = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=tok)
    try:
        agent.start()
        first_key = (tmp_path / "agent" / "agent_key.pem").read_bytes()
        started = time.monotonic()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and agent.log().count("event=agent_renewed") < 2:
            time.sleep(0.1)
        assert agent.log().count("event=agent_renewed") >= 2
        assert time.monotonic() - started > 2.5, "renewed around half-life, not in a tight loop"
        assert (tmp_path / "agent" / "agent_key.pem").read_bytes() != first_key, "a new key on disk"
        # Every call after the rotation uses the new SVID: the old one has expired by now, and
        # an entry created now still gets its SVID.
        time.sleep(2)
        entry(server, "late", "--x509-ttl", "30s")
        stream = stub(agent).FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=20)
        assert [s.spiffe_id for s in next(stream).svids] == ["spiffe://example.org/late"]
        stream.cancel()
        assert "event=agent_refused" not in agent.log()
    finally:
        agent.stop()
