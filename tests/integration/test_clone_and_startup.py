"""A copied agent key, and an agent's start-up, with real server and agent processes.

Clone detection (issue 13, hole 6): one agent identity seen from two addresses is refused,
audited and marked suspected-clone; an operator clears the mark. The second machine is a
relay in this process that connects to the server from 127.0.0.2 (all of 127/8 is this
host, but the server sees another address, as it would see another machine).

Start-up (hole 7): a server the trust bundle does not trust is named once, at ERROR, with
the bundle's path and no gRPC core noise, while the agent keeps retrying; a second agent on
the same data directory exits at once naming the first one's pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.harness import READY_TIMEOUT, AgentProcess, ServerProcess, trustmesh_cmd
from tests.integration.node_client import NodeClient, SyncReader, pem_chain
from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.hostport import split_host_port
from trustmesh.keys import generate_private_key
from trustmesh.spiffeid import TrustDomain
from trustmesh.x509svid import build_ca_certificate, build_csr

NODE = "spiffe://example.org/agent/node-1"
GRPC_CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|E0000|All log messages before absl", re.M)


class Relay:
    """Forwards TCP connections to `target`, dialling it from `source`: to the server, the
    connections come from another machine."""

    def __init__(self, target: str, source: str = "127.0.0.2") -> None:
        self._target = split_host_port(target)
        self._source = source
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self._target, source_address=(self._source, 0))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            s.close()


@pytest.fixture
def relay_to() -> Iterator[Callable[[str], Relay]]:
    relays: list[Relay] = []

    def make(target: str) -> Relay:
        relays.append(Relay(target))
        return relays[-1]

    yield make
    for relay in relays:
        relay.close()


def agent_args(agent: AgentProcess, *extra: str, server: str | None = None, bundle: Path | None = None) -> list[str]:
    """`trustmesh agent run` for `agent`, reaching the server at `server` (e.g. a relay)."""
    return trustmesh_cmd("agent", "run", "--trust-bundle", str(bundle or agent.server.bundle_path),
                         "--data-dir", str(agent.data_dir), "--socket", str(agent.socket),
                         "--server", server or agent.server.bind, "--attest-server", agent.server.attest_bind, *extra)


def launch(agent: AgentProcess, args: list[str], until: str) -> AgentProcess:
    """Start `agent` with `args` and wait for a log line matching `until` (not only `ready`)."""
    agent._launch("agent", agent.data_dir, args, until, READY_TIMEOUT)
    return agent


def agents(server: ServerProcess) -> dict[str, dict[str, object]]:
    return {a["spiffe_id"]: a for a in json.loads(server.cli("agent", "list", "--json", check=True).stdout)}


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def audit(server: ServerProcess, kind: str) -> list[dict[str, object]]:
    events = json.loads(server.cli("audit", "show", "--kind", kind, "--json", check=True).stdout)
    return [e for e in events if e["kind"] == kind]


def details(event: dict[str, object]) -> dict[str, object]:
    value = event["details"]
    assert isinstance(value, dict)
    return value


def status(server: ServerProcess) -> object:
    return agents(server)[NODE]["status"]


# --- a copied agent key -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_thief_that_renews_a_copied_key_is_noticed_when_the_real_agent_returns(
        make_server: Callable[..., ServerProcess], relay_to: Callable[[str], Relay], tmp_path: Path) -> None:
    # Agent SVIDs of 20 s: the thief's copy is past half-life at once (see below), and the
    # real agent's SVID is still valid when it comes back a few seconds later.
    server = make_server(extra=["--agent-ttl", "20s"])
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    real = AgentProcess(server, tmp_path / "real", join_token=token).start()
    real.stop()
    serial = format(x509.load_pem_x509_certificate((real.data_dir / "agent_svid.pem").read_bytes()).serial_number,
                    "x")
    # The thief copies the data directory while the agent is down, and runs it from another
    # machine. Its copy looks old (mtime), so it renews at once, to a key only it holds.
    thief = AgentProcess(server, tmp_path / "thief")
    shutil.copytree(real.data_dir, thief.data_dir)
    old = time.time() - 3600
    os.utime(thief.data_dir / "agent_svid.pem", (old, old))
    relay = relay_to(server.bind)
    try:
        launch(thief, agent_args(thief, server=relay.address), r"event=agent_renewed")
        assert status(server) == "active", "the thief alone looks like the agent"
        # The real agent comes back with the SVID the thief's renewal superseded: refused,
        # audited with both addresses and serials, and the node is marked.
        launch(real, agent_args(real), r"event=agent_refused")
        assert "in use elsewhere" in real.log()
        wait_for(lambda: status(server) == "suspected-clone", "the suspected-clone mark")
        listed = agents(server)[NODE]
        assert listed["renewed_from"] == "127.0.0.2" and "127.0.0.1" in str(listed["status_reason"])
        table = server.cli("agent", "list", check=True).stdout
        assert any("node-1" in row and "suspected-clone" in row for row in table.splitlines())
        [event] = audit(server, "agent.suspected_clone")
        d = details(event)
        assert event["subject"] == NODE and event["outcome"] == "denied"
        assert (d["first_address"], d["second_address"]) == ("127.0.0.2", "127.0.0.1")
        assert d["presented_serial"] == serial and d["current_serial"] == listed["cert_serial"] != serial
        # An operator checks the node and clears the mark (or bans the agent): audited.
        cleared = server.cli("agent", "clear", "node-1", check=True)
        assert "cleared the suspected-clone mark of spiffe://example.org/agent/node-1: status active" in cleared.stdout
        assert status(server) == "active"
        [clear] = [e for e in audit(server, "agent.clear") if e["outcome"] == "ok"]
        assert clear["subject"] == NODE and details(clear)["previous_status"] == "suspected-clone"
    finally:
        thief.stop()
        real.stop()


async def test_two_live_copies_and_a_renewal_from_a_second_address_are_refused(
        make_server: Callable[..., ServerProcess], relay_to: Callable[[str], Relay]) -> None:
    server = make_server()
    real = NodeClient(server)
    await real.attest(server.cli("token", "create", "--node", "node-1", check=True).stdout.strip())
    relay = relay_to(server.bind)
    async with real.channel() as channel:
        stream = SyncReader(channel)
        await stream.snapshot()
        # The thief holds a copy of the key and SVID, and calls from another machine.
        async with server.node_channel(real.key, pem_chain(real.chain_der), address=relay.address) as stolen:
            stub = node_pb2_grpc.NodeStub(stolen)
            # A second sync stream, a renewal and a signing request from the second address.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await SyncReader(stolen).next()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "in use elsewhere" in (info.value.details() or "")
            for call in (stub.RenewAgent(node_pb2.RenewAgentRequest(csr=build_csr(generate_private_key())),
                                         timeout=10),
                         stub.BatchSignX509(node_pb2.BatchSignX509Request(items=[node_pb2.X509SignItem(
                             entry_id="e", csr=build_csr(generate_private_key()))]), timeout=10)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The first one goes on: same address, same SVID.
        await real.renew()
        async with real.channel() as again:
            await SyncReader(again).snapshot()
        stream.cancel()
    for _ in range(100):
        if status(server) == "suspected-clone":
            break
        await asyncio.sleep(0.1)
    assert status(server) == "suspected-clone"
    events = audit(server, "agent.suspected_clone")
    # Three refusals of one pair of addresses: one audit event, not one per call.
    assert len(events) == 1 and details(events[0])["reason"] == "second_address"
    assert (details(events[0])["first_address"], details(events[0])["second_address"]) == ("127.0.0.1", "127.0.0.2")


async def test_restarts_reconnects_and_a_lost_renewal_answer_do_not_flag(
        make_server: Callable[..., ServerProcess]) -> None:
    server = make_server()
    agent = NodeClient(server)
    await agent.attest(server.cli("token", "create", "--node", "node-1", check=True).stdout.strip())
    async with agent.channel() as first:
        stream = SyncReader(first)
        await stream.snapshot()
        # A reconnect while the server still holds the first stream (a restarted agent).
        async with agent.channel() as second:
            await SyncReader(second).snapshot()
        before = NodeClient(server, agent.key, list(agent.chain_der), agent.spiffe_id)
        await agent.renew()
        # The answer to that renewal "was lost": the agent retries with its previous SVID.
        await before.renew()
        stream.cancel()
    async with before.channel() as third:
        await SyncReader(third).snapshot()
    assert status(server) == "active"
    assert audit(server, "agent.suspected_clone") == []


# --- start-up ---------------------------------------------------------------------------------


def _metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _sample(text: str, sample: str) -> float:
    """The value of one sample line of a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _other_bundle(path: Path) -> Path:
    """A root of the same trust domain that the server's certificate does not chain to."""
    key = generate_private_key()
    now = datetime.now(timezone.utc)
    root = build_ca_certificate(trust_domain=TrustDomain("example.org"), public_key=key.public_key(), issuer=None,
                                issuer_key=key, not_before=now - timedelta(hours=1), not_after=now + timedelta(days=1),
                                path_length=1, common_name="another deployment's root")
    path.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return path


def test_a_wrong_trust_bundle_is_named_once_and_one_data_directory_holds_one_agent(
        make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = make_server()
    token_file = tmp_path / "token"
    token_file.write_text(server.cli("token", "create", "--node", "node-1", check=True).stdout.strip())
    wrong = _other_bundle(tmp_path / "other-bundle.pem")
    metrics = f"127.0.0.1:{_free_port()}"
    agent = AgentProcess(server, tmp_path / "agent")
    args = agent_args(agent, "--join-token-file", str(token_file), "--metrics", metrics, bundle=wrong)
    try:
        launch(agent, args, r"event=server_untrusted")
        # It keeps retrying (with backoff), and says so once.
        failures = 'trustmesh_agent_attest_failures_total{reason="untrusted"}'
        wait_for(lambda: _sample(_metrics(metrics), failures) >= 4, "several attestation attempts")
        text = _metrics(metrics)
        assert _sample(text, 'trustmesh_agent_server_state{state="untrusted"}') == 1
        assert _sample(text, 'trustmesh_agent_server_state{state="unreachable"}') == 0
        log = agent.log()
        errors = [line for line in log.splitlines() if "level=error" in line]
        assert len(errors) == 1, log
        assert (f"the server's certificate does not chain to the trust bundle {wrong}; check --trust-bundle"
                in errors[0]), errors[0]
        assert "event=server_unreachable" not in log, "an untrusted server is not called unreachable"
        assert not GRPC_CORE_LINE.search(log), f"gRPC core's own lines leaked:\n{log}"

        # A second agent on the same data directory: exit 1 at once, one line, naming the first.
        assert agent.proc is not None
        second = subprocess.run(agent_args(agent, bundle=wrong), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"trustmesh: error: another agent (pid {agent.proc.pid}) is running on the data directory "
            f"{agent.data_dir}; stop it first, or give this agent its own --data-dir"]
        assert agent.proc.poll() is None, "the first one runs on"
    finally:
        agent.stop()
    # Its lock went with it: the next agent on the directory starts.
    again = AgentProcess(server, tmp_path / "agent")
    try:
        launch(again, agent_args(again, "--join-token-file", str(token_file), bundle=wrong), r"event=server_untrusted")
    finally:
        again.stop()


@pytest.mark.etcd
async def test_failover_between_replicas_does_not_flag_but_a_renewal_elsewhere_does(
        make_server: Callable[..., ServerProcess], etcd_server: str, relay_to: Callable[[str], Relay]) -> None:
    url = f"{etcd_server}/clone{os.urandom(5).hex()}"
    a, b = (make_server(f"replica-{n}", store=url, env={"TRUSTMESH_KEK": "33" * 32}, extra=["--replica-id", n])
            for n in ("a", "b"))
    agent = NodeClient(a)
    await agent.attest(a.cli("token", "create", "--node", "node-1", check=True).stdout.strip())
    async with agent.channel(a) as on_a:
        stream = SyncReader(on_a)
        await stream.snapshot()
        await agent.renew()  # on A, from this machine
        # The agent fails over to B while A still holds its old stream: same machine, no flag.
        for _ in range(50):  # B learns of the renewal from the store's change feed
            try:
                async with agent.channel(b) as on_b:
                    await SyncReader(on_b).snapshot()
                break
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "superseded" in (err.details() or "")
                await asyncio.sleep(0.1)
        stream.cancel()
    assert status(a) == "active" and audit(a, "agent.suspected_clone") == []

    # Now a copy of the key renews on B from another machine while the agent streams on A:
    # A hears of the renewal from the store and ends the stream, naming the clone.
    async with agent.channel(a) as on_a:
        stream = SyncReader(on_a)
        await stream.snapshot()
        reader = asyncio.ensure_future(stream.next(timeout=20))
        thief = NodeClient(b, agent.key, list(agent.chain_der), agent.spiffe_id)
        relay = relay_to(b.bind)
        async with b.node_channel(thief.key, pem_chain(thief.chain_der), address=relay.address) as stolen:
            await node_pb2_grpc.NodeStub(stolen).RenewAgent(
                node_pb2.RenewAgentRequest(csr=build_csr(generate_private_key())), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reader
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "in use elsewhere" in (info.value.details() or "")
    wait_for(lambda: status(a) == "suspected-clone", "the mark, seen through replica A")
    [event] = audit(b, "agent.suspected_clone")
    assert (details(event)["first_address"], details(event)["second_address"]) == ("127.0.0.2", "127.0.0.1")
