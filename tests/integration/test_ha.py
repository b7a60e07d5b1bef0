"""High availability with real processes: server replicas on etcd, leader election, agent
failover, a root rotation under live mTLS traffic, and a control plane that is down.

Each test prints what it measured (`-s` shows it); README's reliability section quotes
these figures. Waits are bounded; nothing asserts on timing beyond "within a bound".
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.etcd_process import EtcdCluster, EtcdNotInstalled, free_port, running_etcd_cluster
from tests.integration.harness import AgentProcess, ServerProcess, wait_until
from tests.integration.test_agent import HEADER, UID, leaf_of
from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
from trustmesh.der import load_der_certificates
from trustmesh.errors import VerificationError
from trustmesh.spiffeid import TrustDomain
from trustmesh.x509svid import verify_x509_svid

pytestmark = pytest.mark.etcd
KEK = {"TRUSTMESH_KEK": "22" * 32}


def root_of(server: ServerProcess) -> str:
    match = re.search(r"root_sha256=(\w+)", server.log())
    assert match, server.log()
    return match.group(1)


@pytest.fixture
def replicas(make_server: Callable[..., ServerProcess], etcd_server: str) -> Callable[..., list[ServerProcess]]:
    """Start n replicas of one control plane on a fresh namespace of the session's etcd."""

    def start(n: int, *extra: str, store: str | None = None) -> list[ServerProcess]:
        url = store or f"{etcd_server}/ha{uuid.uuid4().hex[:10]}"
        return [make_server(f"replica-{i}", store=url, env=KEK, extra=["--replica-id", f"replica-{i}", *extra])
                for i in range(n)]

    return start


def leaders(servers: list[ServerProcess]) -> list[str]:
    """Replicas whose latest leadership event says they lead now."""
    out = []
    for s in servers:
        log = s.log()
        if log.rfind("event=leader_elected") > log.rfind("event=leader_stepped_down"):
            out.append(s.data_dir.name)
    return out


# --- replicas -----------------------------------------------------------------------------


def test_replicas_share_the_root_elect_one_leader_and_hand_over_when_it_dies(
        replicas: Callable[..., list[ServerProcess]]) -> None:
    servers = replicas(3)
    assert len({root_of(s) for s in servers}) == 1, "every replica serves the same root"
    assert wait_until(lambda: len(leaders(servers)) == 1, timeout=15)
    time.sleep(1.0)
    assert len(leaders(servers)) == 1, "exactly one leader"
    shown = json.loads(servers[1].cli("ca", "show", "--json", check=True).stdout)
    signing = [a for a in shown["authorities"] if a["kind"] == "signing-ca" and a["state"] == "active"]
    assert sorted(a["replica"] for a in signing) == ["replica-0", "replica-1", "replica-2"], \
        "each replica signs with its own signing CA"
    assert shown["leader"] == leaders(servers)[0]
    # SIGKILL the leader: its lease expires and another replica takes over.
    old = next(s for s in servers if s.data_dir.name == shown["leader"])
    killed_at = time.monotonic()
    old.kill()
    rest = [s for s in servers if s is not old]
    assert wait_until(lambda: len(leaders(rest)) == 1, timeout=20)
    takeover = time.monotonic() - killed_at
    print(f"\nleader takeover after SIGKILL: {takeover:.1f} s (lease ttl 5 s)")
    assert json.loads(rest[0].cli("ca", "show", "--json", check=True).stdout)["leader"] == leaders(rest)[0]


def test_a_ban_on_one_replica_cuts_the_agent_streaming_from_another(
        replicas: Callable[..., list[ServerProcess]], tmp_path: Path) -> None:
    a, b = replicas(2)
    token = a.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    a.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ledger", "--node", "node-1",
          "--selector", f"unix:uid:{UID}", check=True)
    # The agent knows only replica B: every call it makes lands there.
    agent = AgentProcess(b, tmp_path / "agent", join_token=token).start()
    try:
        assert wait_until(lambda: "event=sync_connected" in agent.log())
        banned_at = time.monotonic()
        a.cli("agent", "ban", "node-1", check=True)
        assert wait_until(lambda: "event=agent_refused" in agent.log(), timeout=10)
        print(f"\nban on replica A cut the stream on replica B after {time.monotonic() - banned_at:.2f} s")
    finally:
        agent.stop()


# --- agents fail over -----------------------------------------------------------------------


@dataclass
class WorkloadWatch:
    """A workload holding one FetchX509SVID stream open, recording every message and error."""

    agent: AgentProcess
    serials: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        channel = grpc.insecure_channel(f"unix:{self.agent.socket}")
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER)
        try:
            for message in stream:
                self.serials.append(leaf_of(message.svids[0]).serial_number)
                if self.stop.is_set():
                    break
        except grpc.RpcError as err:
            if not self.stop.is_set():
                self.errors.append(f"{err.code()}: {err.details()}")
        finally:
            stream.cancel()
            channel.close()


def test_an_agent_fails_over_when_its_replica_is_killed_and_workloads_notice_nothing(
        replicas: Callable[..., list[ServerProcess]], tmp_path: Path) -> None:
    a, b = replicas(2)
    token = a.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    a.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ledger", "--node", "node-1",
          "--selector", f"unix:uid:{UID}", "--x509-ttl", "6s", check=True)
    agent = AgentProcess(a, tmp_path / "agent", join_token=token, replicas=[b]).start()
    watch = WorkloadWatch(agent)
    thread = threading.Thread(target=watch.run, daemon=True)
    try:
        assert wait_until(lambda: f"event=sync_connected server={a.bind}" in agent.log())
        thread.start()
        assert wait_until(lambda: len(watch.serials) >= 2, timeout=20), "no rotation before the fault"
        a.kill()  # SIGKILL: no goodbye, connections just die
        killed_at, before = time.monotonic(), len(watch.serials)
        assert wait_until(lambda: f"event=sync_connected server={b.bind}" in agent.log(), timeout=20)
        failover = time.monotonic() - killed_at
        # Rotation carries on through replica B: at least two new SVIDs after the kill.
        assert wait_until(lambda: len(watch.serials) >= before + 2, timeout=20), agent.log()[-3000:]
        print(f"\nagent failover after SIGKILL of its replica: {failover:.1f} s; "
              f"SVIDs pushed to the workload: {len(watch.serials)}; workload-visible errors: {len(watch.errors)}")
        assert watch.errors == []
        assert len(set(watch.serials)) == len(watch.serials)
    finally:
        watch.stop.set()
        agent.stop()
        thread.join(10)


# --- a root rotation under live mTLS traffic -------------------------------------------------


def _echo_server(stop: threading.Event) -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()
        srv.close()

    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    return int(srv.getsockname()[1])


@dataclass
class Traffic:
    """payments -> ledger through the agent's mTLS listeners: one long-lived connection and
    a new connection every round; every failure is recorded with its time."""

    port: int
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        held: socket.socket | None = None
        while not self.stop.is_set():
            try:
                if held is None:
                    held = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                held.sendall(b"tick")
                if held.recv(16) != b"tick":
                    raise ConnectionError("the open connection was cut")
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
                    conn.sendall(b"new")
                    if conn.recv(16) != b"new":
                        raise ConnectionError("a new connection was refused")
                self.ok += 1
            except OSError as err:
                self.failures.append(f"{time.strftime('%X')} {err!r}")
                if held is not None:
                    held.close()
                held = None
            time.sleep(0.2)
        if held is not None:
            held.close()


def _mesh(server: ServerProcess, tmp_path: Path, ttl: str, replicas: list[ServerProcess] | None = None,
          ) -> tuple[AgentProcess, int, int]:
    """An agent running ledger (inbound mTLS to an echo service) and payments (outbound to
    the ledger) with an allowlist payments -> ledger; returns the agent and the ports."""
    stop = threading.Event()
    echo = _echo_server(stop)
    ledger, payments, frontend = free_port(), free_port(), free_port()
    for name in ("ledger", "payments", "frontend"):
        server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/{name}", "--node", "node-1",
                   "--selector", f"unix:uid:{UID}", "--x509-ttl", ttl, check=True)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access, owner: payments-platform}}
spec:
  destination: spiffe://example.org/ledger
  ports: [{ledger}]
  allow:
    - from: spiffe://example.org/payments
""")
    server.cli("policy", "apply", str(policy), check=True)
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
services:
  - name: ledger
    spiffe_id: spiffe://example.org/ledger
    inbound: {{listen: 127.0.0.1:{ledger}, forward: 127.0.0.1:{echo}}}
  - name: payments
    spiffe_id: spiffe://example.org/payments
    outbound:
      - {{listen: 127.0.0.1:{payments}, connect: 127.0.0.1:{ledger}, expect: spiffe://example.org/ledger}}
  - name: frontend
    spiffe_id: spiffe://example.org/frontend
    outbound:
      - {{listen: 127.0.0.1:{frontend}, connect: 127.0.0.1:{ledger}, expect: spiffe://example.org/ledger}}
""")
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=token, config=config, replicas=replicas or [])
    agent.start()
    assert wait_until(lambda: agent.log().count("outbound_listening") >= 2 and "inbound_listening" in agent.log())
    return agent, payments, frontend


def _talk(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"hello")
            return conn.recv(16)
    except OSError:
        return b""


def first_x509_message(agent: AgentProcess) -> workload_pb2.X509SVIDResponse:
    """The first FetchX509SVID message a workload (this process) gets from the agent now."""
    channel = grpc.insecure_channel(f"unix:{agent.socket}")
    try:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=10)
        message: workload_pb2.X509SVIDResponse = next(stream)
        stream.cancel()
    finally:
        channel.close()
    return message


def _workload_view(agent: AgentProcess) -> tuple[int, list[bytes], bytes]:
    """(number of roots in the workload's bundle, the SVID chain (DER certs), one message's raw
    bundle) as a workload sees them right now."""
    svid = first_x509_message(agent).svids[0]
    chain = [c.public_bytes(serialization.Encoding.DER) for c in load_der_certificates(svid.x509_svid)]
    return len(load_der_certificates(svid.bundle)), chain, svid.bundle


def _roots(server: ServerProcess) -> dict[str, dict[str, str]]:
    shown = json.loads(server.cli("ca", "show", "--json", check=True).stdout)
    return {a["id"]: a for a in shown["authorities"] if a["kind"] == "root"}


@pytest.mark.slow
def test_a_root_rotation_under_live_mtls_traffic_breaks_no_connection(
        replicas: Callable[..., list[ServerProcess]], tmp_path: Path) -> None:
    r0, r1 = replicas(2, "--ca-ttl", "20s", "--agent-ttl", "10s")
    agent, payments, _ = _mesh(r0, tmp_path, "4s", replicas=[r1])
    traffic = Traffic(payments)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    td = TrustDomain("example.org")
    try:
        assert wait_until(lambda: traffic.ok >= 5)
        (old_id,) = _roots(r0)
        # prepare on one replica: the new root reaches the workloads' bundles via both replicas.
        r1.cli("ca", "rotate", "--step", "prepare", check=True)
        roots = _roots(r0)
        (new_id,) = set(roots) - {old_id}
        assert roots[new_id]["state"] == "prepared"
        new_root = x509.load_pem_x509_certificate(roots[new_id]["certificate_pem"].encode())
        assert wait_until(lambda: _workload_view(agent)[0] == 2, timeout=15), "the new root never reached the workload"
        # activate on the other replica: new SVIDs chain to the new root.
        # (--force: no federated partner here to wait for, only the workload that has it already.)
        r0.cli("ca", "rotate", "--step", "activate", "--force", check=True)

        def chains_to_new_root() -> bool:
            chain = [x509.load_der_x509_certificate(c) for c in _workload_view(agent)[1]]
            try:
                verify_x509_svid(chain, {td: [new_root]})
                return True
            except VerificationError:  # still under the old root
                return False

        assert wait_until(chains_to_new_root, timeout=20), "SVIDs never moved under the new root"
        # retire: refused while a signing CA under the old root lives; the leader retires it
        # by itself once the last one has expired (--ca-ttl 20s).
        early = r0.cli("ca", "rotate", "--step", "retire")
        assert early.returncode != 0 and "cannot be retired yet" in early.stderr, early.stdout
        assert wait_until(lambda: set(_roots(r1)) == {new_id}, timeout=40), _roots(r1)
        assert wait_until(lambda: _workload_view(agent)[0] == 1, timeout=15)
        served = traffic.ok
        assert wait_until(lambda: traffic.ok >= served + 10, timeout=20), "traffic stopped after the retirement"
        audit = r1.cli("audit", "show", "--json", check=True).stdout
        for kind in ("ca.root_prepared", "ca.root_activated", "ca.authorities_retired", "ca.rotation_refused"):
            assert f'"{kind}"' in audit, kind
        print(f"\nroot rotation under traffic: {traffic.ok} exchanges (an open connection plus a new one each), "
              f"failures: {len(traffic.failures)}")
        assert traffic.failures == []
    finally:
        traffic.stop.set()
        thread.join(10)
        agent.stop()


# --- the whole control plane down -------------------------------------------------------------


@pytest.mark.slow
def test_a_control_plane_outage_longer_than_a_rotation_period(
        make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = make_server()
    agent, payments, frontend = _mesh(server, tmp_path, "20s")
    try:
        assert _talk(payments) == b"hello" and _talk(frontend) == b""
        _, chain_before, _ = _workload_view(agent)
        server.stop()
        down_at = time.monotonic()
        # Longer than the rotation period (half of 20 s): the agent cannot renew meanwhile.
        errors = 0
        while time.monotonic() - down_at < 12:
            count, chain, _ = _workload_view(agent)
            leaf = x509_load(chain[0])
            if leaf.not_valid_after_utc.timestamp() <= time.time() or count != 1:
                errors += 1
            if _talk(payments) != b"hello" or _talk(frontend) != b"":
                errors += 1  # enforcement must keep the last policy: allow and deny alike
            time.sleep(1)
        print(f"\ncontrol plane down 12 s (> rotation period 10 s): workload/enforcement errors: {errors}")
        assert errors == 0
        server.start()
        # Everything resumes: the agent reconnects and rotates again.
        assert wait_until(lambda: _workload_view(agent)[1][0] != chain_before[0], timeout=30)
        assert _talk(payments) == b"hello" and _talk(frontend) == b""
    finally:
        agent.stop()


def x509_load(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


# --- a 3-member etcd cluster under faults ------------------------------------------------------


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    try:
        with running_etcd_cluster(3) as cluster:
            yield cluster
    except EtcdNotInstalled as err:
        pytest.skip(str(err))


POLICY_REVISION = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access, owner: payments-platform}}
spec:
  destination: spiffe://example.org/ledger
  ports: [8443]
  allow:
    - from: spiffe://example.org/payments
    - from: spiffe://example.org/batch-{n}
"""


@pytest.mark.slow
def test_an_etcd_member_dies_while_agents_rotate_and_an_admin_applies_policies(
        make_server: Callable[..., ServerProcess], etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    url = f"{etcd_cluster.url}/ha{uuid.uuid4().hex[:8]}"
    a, b = (make_server(f"replica-{i}", store=url, env=KEK, extra=["--replica-id", f"replica-{i}"]) for i in range(2))
    token = a.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    a.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ledger", "--node", "node-1",
          "--selector", f"unix:uid:{UID}", "--x509-ttl", "4s", check=True)
    agent = AgentProcess(a, tmp_path / "agent", join_token=token, replicas=[b]).start()
    watch = WorkloadWatch(agent)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    acknowledged: list[str] = []
    admin_errors: list[str] = []
    rounds = 12
    try:
        assert wait_until(lambda: len(watch.serials) >= 2, timeout=20)
        for n in range(rounds):
            if n == 3:
                etcd_cluster.kill(0)  # the member every client tried first
                serials_at_kill = len(watch.serials)
            if n == 9:
                etcd_cluster.start(0)
            server = (a, b)[n % 2]
            policy = tmp_path / f"policy-{n}.yaml"
            policy.write_text(POLICY_REVISION.format(n=n))
            for args in (("policy", "apply", str(policy), "--comment", f"round {n}"),
                         ("entry", "create", "--spiffe-id", f"spiffe://example.org/batch-{n}", "--node", "node-1",
                          "--selector", "unix:uid:77")):
                result = server.cli(*args)
                if result.returncode == 0:
                    acknowledged.append(" ".join(args[:2]) + f" {n}")
                else:
                    admin_errors.append(result.stderr.strip())
            time.sleep(0.5)
        assert wait_until(lambda: len(watch.serials) >= serials_at_kill + 3, timeout=20), "rotation stalled"
        entries = {e["spiffe_id"] for e in json.loads(b.cli("entry", "list", "--json", check=True).stdout)}
        history = a.cli("policy", "history", check=True).stdout
        audit_ok = b.cli("audit", "verify")
        lost_entries = [n for n in range(rounds) if f"entry create {n}" in acknowledged
                        and f"spiffe://example.org/batch-{n}" not in entries]
        revisions = len([line for line in history.splitlines() if "round " in line])
        print(f"\netcd member SIGKILLed and restarted under load: {len(acknowledged)} admin writes acknowledged, "
              f"{len(admin_errors)} refused, lost entries {lost_entries}, policy revisions {revisions}, "
              f"SVID rotations seen by the workload {len(watch.serials)}, workload errors {len(watch.errors)}, "
              f"audit verify exit {audit_ok.returncode}")
        assert admin_errors == [], admin_errors
        assert lost_entries == []
        assert revisions == sum(1 for x in acknowledged if x.startswith("policy apply"))
        assert audit_ok.returncode == 0, audit_ok.stdout + audit_ok.stderr
        assert watch.errors == []
    finally:
        watch.stop.set()
        agent.stop()
        thread.join(10)


@pytest.mark.slow
def test_restarting_every_etcd_member_keeps_the_ca_and_the_registry(
        make_server: Callable[..., ServerProcess], etcd_cluster: EtcdCluster) -> None:
    url = f"{etcd_cluster.url}/ha{uuid.uuid4().hex[:8]}"
    server = make_server(store=url, env=KEK)
    for n in range(5):
        server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/svc-{n}", "--node", "node-1",
                   "--selector", "unix:uid:1000", check=True)
    entries = server.cli("entry", "list", "--json", check=True).stdout
    root = root_of(server)
    server.stop()
    for i in range(3):
        etcd_cluster.stop(i)
    for i in range(3):
        etcd_cluster.start(i)
    for i in range(3):
        etcd_cluster.wait_healthy(i)
    server.start()
    assert root_of(server) == root, "the same CA after a full etcd restart"
    assert server.cli("entry", "list", "--json", check=True).stdout == entries
    assert server.cli("audit", "verify").returncode == 0
