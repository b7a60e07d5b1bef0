"""An inbound listener on loopback with real TLS and a real echo service: permissive mode
forwards plaintext clients as unverified flows, serves mTLS clients as before, and meters
bytes at close and while a connection lasts; strict mode refuses plaintext."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.etcd_process import free_port
from tests.unit.test_workload_api import TD, Authority
from trustmesh.agent.config import AgentConfig
from trustmesh.agent.proxy.listeners import Flow, InboundConfig, InboundListener, ServiceConfig
from trustmesh.agent.proxy.reporter import FlowKey, kind_of
from trustmesh.agent.proxy.tls import client_context
from trustmesh.bundle import BundleSet
from trustmesh.metrics import Registry
from trustmesh.options import ConfigError
from trustmesh.policy import Decision, load_text
from trustmesh.spiffeid import SpiffeId

FX = TD.spiffe_id("/fx")
PAYMENTS = TD.spiffe_id("/payments")
POLICY = load_text(f"""
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: fx}}
spec: {{destination: "{FX}", allow: [{{from: "{PAYMENTS}"}}]}}
""", "fx.yaml").policy


@dataclass
class Seen:
    """What the listener reported: connections per key, and bytes per key."""

    connections: dict[FlowKey, int] = field(default_factory=dict)
    bytes: dict[FlowKey, list[int]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # the client host of each reported decision

    def report(self, source: SpiffeId | None, destination: SpiffeId, port: int, decision: Decision,
               client_host: str = "", route: str = "", request_id: str = "") -> FlowKey:
        self.hosts.append(client_host)
        key = (str(source or ""), str(destination), port, kind_of(decision), decision.rule, "", route)
        self.connections[key] = self.connections.get(key, 0) + 1
        return key

    def unverified(self, destination: SpiffeId, port: int, host: str, route: str = "") -> FlowKey:
        key = ("", str(destination), port, "unverified", "", host, route)
        self.connections[key] = self.connections.get(key, 0) + 1
        return key

    def traffic(self, key: FlowKey, bytes_in: int, bytes_out: int) -> None:
        total = self.bytes.setdefault(key, [0, 0])
        total[0] += bytes_in
        total[1] += bytes_out


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()
    writer.close()


@asynccontextmanager
async def listening(mtls: str, seen: Seen,
                    traffic_seconds: float = 60.0) -> AsyncIterator[tuple[InboundListener, Authority]]:
    authority = Authority.make(TD)
    svid, bundles = authority.svid("fx"), BundleSet([authority.bundle()])
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    service = ServiceConfig("fx", FX, InboundConfig(f"127.0.0.1:{free_port()}", f"127.0.0.1:{echo_port}", mtls))
    flow = Flow(lambda _sid: svid, lambda: bundles, lambda: POLICY, seen.report, Registry(), identities=None,  # type: ignore[arg-type]
                refused=lambda kind, subject, peer, reason: seen.refused.append(reason),
                traffic=seen.traffic, unverified=seen.unverified)
    listener = InboundListener(service, flow, traffic_seconds=traffic_seconds)
    await listener.start()
    try:
        yield listener, authority
    finally:
        await listener.close()
        echo.close()


async def _exchange(port: int, message: bytes, ssl_ctx: object = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,  # type: ignore[arg-type]
                                                   server_hostname="fx" if ssl_ctx else None)
    writer.write(message)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(len(message)), 5)
    except (ConnectionError, asyncio.IncompleteReadError):
        return b""
    finally:
        writer.close()


async def _until(predicate: object, timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_permissive_forwards_plaintext_as_unverified_and_still_serves_mtls() -> None:
    seen = Seen()
    async with listening("permissive", seen) as (listener, authority):
        assert await _exchange(listener.port, b"GET / HTTP/1.0\r\n\r\n") == b"GET / HTTP/1.0\r\n\r\n"
        plain = ("", str(FX), listener.port, "unverified", "", "127.0.0.1", "")
        await _until(lambda: seen.bytes.get(plain) == [18, 18])
        assert seen.connections == {plain: 1}  # no identity guessed, no policy consulted
        client = client_context(authority.svid("payments"), BundleSet([authority.bundle()]))
        assert await _exchange(listener.port, b"hello fx", client) == b"hello fx"
        allowed = (str(PAYMENTS), str(FX), listener.port, "allow", "fx allow[0]", "", "")
        await _until(lambda: seen.bytes.get(allowed) == [8, 8], timeout=20)  # TLS: at most 10 s after close
        assert seen.connections[allowed] == 1
        assert seen.hosts == ["127.0.0.1"]  # the verified client's host: the server finds its node by it


async def test_permissive_still_denies_an_mtls_client_the_policy_does_not_allow() -> None:
    seen = Seen()
    async with listening("permissive", seen) as (listener, authority):
        client = client_context(authority.svid("web"), BundleSet([authority.bundle()]))
        assert await _exchange(listener.port, b"hello fx", client) == b""
        denied = (str(TD.spiffe_id("/web")), str(FX), listener.port, "deny", "default deny", "", "")
        await _until(lambda: seen.connections)
        assert seen.connections == {denied: 1} and seen.bytes == {}  # identity known: never unverified


async def test_strict_refuses_plaintext() -> None:
    seen = Seen()
    async with listening("strict", seen) as (listener, _):
        assert await _exchange(listener.port, b"GET / HTTP/1.0\r\n\r\n") == b""
        await _until(lambda: seen.refused)
        assert seen.connections == {} and seen.bytes == {}


async def test_a_long_lived_connection_reports_its_bytes_before_it_ends() -> None:
    seen = Seen()
    async with listening("permissive", seen, traffic_seconds=0.2) as (listener, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        key = ("", str(FX), listener.port, "unverified", "", "127.0.0.1", "")
        await _until(lambda: seen.bytes.get(key) == [4, 4])  # reported by the loop, the connection still open
        writer.write(b"pong!")
        assert await reader.readexactly(5) == b"pong!"
        await _until(lambda: seen.bytes.get(key) == [9, 9])  # deltas only: nothing counted twice
        writer.close()
        await _until(lambda: not listener._meters)
        assert seen.bytes[key] == [9, 9]


async def test_a_silent_plaintext_client_is_forwarded_after_the_peek_wait(monkeypatch: object) -> None:
    import trustmesh.agent.proxy.listeners as listeners

    monkeypatch.setattr(listeners, "PEEK_SECONDS", 0.2)  # type: ignore[attr-defined]
    seen = Seen()
    async with listening("permissive", seen) as (listener, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        await asyncio.sleep(0.5)  # a server-speaks-first protocol: the client waits
        writer.write(b"late")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"late"
        writer.close()
        assert list(seen.connections) == [("", str(FX), listener.port, "unverified", "", "127.0.0.1", "")]


def _agent_config(tmp_path: Path, inbound: str) -> AgentConfig:
    from trustmesh.cli.agent_run_cmd import _build_config
    from trustmesh.cli.main import build_parser

    cfg = tmp_path / "agent.yaml"
    cfg.write_text("server: [127.0.0.1:8081]\ntrust-bundle: /x.pem\n"
                   f"services: [{{name: fx, spiffe_id: '{FX}', inbound: {inbound}}}]\n")
    config: AgentConfig = _build_config(build_parser().parse_args(["agent", "run", "--config", str(cfg)]))
    return config


@pytest.mark.parametrize(("inbound", "mtls"), [
    ("{listen: 127.0.0.1:9443, forward: 127.0.0.1:8080}", "strict"),
    ("{listen: 127.0.0.1:9443, forward: 127.0.0.1:8080, mtls: strict}", "strict"),
    ("{listen: 127.0.0.1:9443, forward: 127.0.0.1:8080, mtls: permissive}", "permissive"),
])
def test_the_config_reads_the_mtls_mode(tmp_path: Path, inbound: str, mtls: str) -> None:
    [service] = _agent_config(tmp_path, inbound).services
    assert service.inbound is not None and service.inbound.mtls == mtls


@pytest.mark.parametrize("mode", ["bogus", "Permissive", "[strict]", "true"])
def test_an_unknown_mtls_mode_is_a_one_line_config_error(tmp_path: Path, mode: str) -> None:
    with pytest.raises(ConfigError, match=r"services\[0\]\.inbound\.mtls: .* is not strict or permissive") as err:
        _agent_config(tmp_path, f"{{listen: 127.0.0.1:9443, forward: 127.0.0.1:8080, mtls: {mode}}}")
    assert "\n" not in str(err.value)
