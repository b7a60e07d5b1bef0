"""The server process: start, restart with the same CA, refuse a wrong KEK, clean stop."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.harness import ServerProcess


def _roots(server: ServerProcess) -> list[bytes]:
    return [
        c.fingerprint(c.signature_hash_algorithm)
        for c in x509.load_pem_x509_certificates(server.bundle_path.read_bytes())
    ]  # type: ignore[arg-type]


async def test_serves_health_over_tls_and_on_the_admin_socket(server: ServerProcess) -> None:
    async with server.node_channel() as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with server.admin_channel() as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    mode = stat.S_IMODE(server.admin_socket.stat().st_mode)
    assert mode == 0o600


async def test_a_client_trusting_another_ca_cannot_connect(
    server: ServerProcess, tmp_path: Path, make_server: Callable[..., ServerProcess]
) -> None:
    other = make_server("other")
    async with server.node_channel(roots_pem=other.bundle_path.read_bytes()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_restart_keeps_the_same_root(server: ServerProcess) -> None:
    before = _roots(server)
    assert server.stop() == 0
    assert "event=stopping" in server.log()
    server.start()
    assert _roots(server) == before


def test_wrong_kek_is_a_clear_error_never_a_new_ca(make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = make_server("s1")
    before = server.bundle_path.read_bytes()
    server.stop()
    kek = server.data_dir / "kek.bin"
    kek.write_text("22" * 32 + "\n")
    with pytest.raises(RuntimeError) as info:
        server.start(timeout=20)
    assert "key-encryption key does not match" in str(info.value)
    assert server.proc is not None and server.proc.returncode == 1
    assert server.bundle_path.read_bytes() == before


def test_missing_trust_domain_and_bad_flags_are_reported(tmp_path: Path) -> None:
    server = ServerProcess(data_dir=tmp_path / "x")
    result = server.cli("server", "run", "--data-dir", str(tmp_path / "x"))
    assert result.returncode == 1
    assert "--trust-domain is required" in result.stderr
    result = server.cli("server", "run", "--trust-domain", "Example.ORG", "--data-dir", str(tmp_path / "x"))
    assert result.returncode == 1 and "lower case" in result.stderr
    result = server.cli(
        "server", "run", "--trust-domain", "example.org", "--ca-ttl", "soon", "--data-dir", str(tmp_path / "x")
    )
    assert result.returncode == 1 and "--ca-ttl" in result.stderr


def test_etcd_store_needs_a_shared_kek(tmp_path: Path, etcd_server: str) -> None:
    server = ServerProcess(data_dir=tmp_path / "e", store=f"{etcd_server}/nokek")
    result = server.cli(
        "server",
        "run",
        "--trust-domain",
        "example.org",
        "--data-dir",
        str(tmp_path / "e"),
        "--store",
        f"{etcd_server}/nokek",
        "--bind",
        "127.0.0.1:0",
    )
    assert result.returncode == 1
    assert "--kek-file" in result.stderr


def test_config_file_values_and_unknown_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text("trust-domain: example.org\nbogus_option: 1\n")
    server = ServerProcess(data_dir=tmp_path / "c")
    result = server.cli("server", "run", "--config", str(cfg))
    assert result.returncode == 1 and "bogus_option" in result.stderr


def test_metrics_health_and_readiness_over_http(make_server: Callable[..., ServerProcess]) -> None:
    import urllib.error
    import urllib.request

    from tests.etcd_process import free_port

    address = f"127.0.0.1:{free_port()}"
    make_server("m", extra=["--metrics", address])  # returns once the server logged `ready`

    def get(path: str) -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as reply:
                return reply.status, reply.headers["Content-Type"], reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers["Content-Type"], err.read().decode()

    status, kind, text = get("/metrics")
    assert status == 200 and kind == "text/plain; version=0.0.4; charset=utf-8"
    assert "trustmesh_leader " in text and "process_resident_memory_bytes " in text
    assert 'trustmesh_build_info{version="' in text
    assert get("/healthz")[0] == 200 and get("/readyz")[0] == 200
    assert get("/nothing")[0] == 404


def test_a_second_server_on_the_same_ports_is_refused_not_sharing_them(
        server: ServerProcess, make_server: Callable[..., ServerProcess]) -> None:
    """gRPC's default SO_REUSEPORT let a second server (another trust domain) bind our ports
    and take a share of the connections; each listener now owns its port."""
    for flag, address in (("--bind", server.bind), ("--attest-bind", server.attest_bind)):
        other = ServerProcess(data_dir=server.data_dir.parent / f"other{flag}", trust_domain="other.org",
                              bind=server.bind if flag == "--bind" else "127.0.0.1:0",
                              attest_bind=server.attest_bind if flag == "--attest-bind" else "127.0.0.1:0")
        with pytest.raises(RuntimeError):
            other.start(timeout=20)
        assert other.proc is not None and other.proc.returncode == 1
        lines = [line for line in other.log().splitlines() if line.strip()]
        assert f"cannot listen on {address} ({flag}): it is already in use" in lines[-1], lines
        assert "Traceback" not in other.log()
    assert server.cli("entry", "list").returncode == 0  # the first one is untouched
