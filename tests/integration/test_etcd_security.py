"""TLS and authentication between the server and etcd, with a real etcd and real servers.

One etcd serves TLS only and demands a client certificate from its CA (--client-cert-auth);
another serves TLS with `auth enable` and a user whose role covers only trustmesh's prefix.
A server with the right settings works end to end; every wrong setting (an untrusted client
certificate, no certificate, a CA that did not sign etcd's certificate, plaintext to a TLS
etcd, a wrong password, a role over another prefix, a password file others can read) is
one line at `server run` and exit 1, never a traceback or a hang.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from aetcd import rpc

from tests.etcd_process import EtcdProcess, EtcdTls, make_tls_material, running_etcd
from tests.integration.harness import ServerProcess

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

KEK = {"TRUSTMESH_KEK": "33" * 32}
PREFIX = "/tm/"  # trustmesh's keys on the auth etcd; the role below covers only this prefix
PASSWORD = "s3cret-for-trustmesh"


def _need_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not on PATH; scripts/test installs etcd-server, so CI must have it")


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> EtcdTls:
    return make_tls_material(tmp_path_factory.mktemp("etcd-tls"))


@pytest.fixture(scope="module")
def cert_etcd(tls_material: EtcdTls) -> Iterator[EtcdProcess]:
    """etcd on TLS only, demanding a client certificate signed by its CA."""
    _need_etcd()
    with running_etcd(tls_material, client_cert_auth=True) as etcd:
        yield etcd


@dataclass(frozen=True)
class AuthEtcd:
    etcd: EtcdProcess
    tls: EtcdTls


async def _enable_auth(etcd: EtcdProcess, tls: EtcdTls) -> None:
    """What `etcdctl user add / role add / role grant-permission --prefix / auth enable` do,
    through etcd's own gRPC API (etcdctl is not always installed)."""
    credentials = grpc.ssl_channel_credentials(tls.ca.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{etcd.client_port}", credentials) as channel:
        auth = rpc.AuthStub(channel)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="root-password"), timeout=10)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
        for user, role, prefix in (("trustmesh", "trustmesh", PREFIX), ("stranger", "elsewhere", "/elsewhere/")):
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name=role), timeout=10)
            key = prefix.encode()
            end = key[:-1] + bytes([key[-1] + 1])  # etcdctl's --prefix=true: every key starting with it
            permission = rpc.Permission(permType=rpc.Permission.READWRITE, key=key, range_end=end)
            await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name=role, perm=permission), timeout=10)
            await auth.UserAdd(rpc.AuthUserAddRequest(name=user, password=PASSWORD), timeout=10)
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=role), timeout=10)
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=10)


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthEtcd]:
    """etcd on TLS (no client certificates) with authentication enabled."""
    _need_etcd()
    tls = make_tls_material(tmp_path_factory.mktemp("etcd-auth-tls"))
    with running_etcd(tls) as etcd:
        asyncio.run(_enable_auth(etcd, tls))
        yield AuthEtcd(etcd, tls)


def _password_file(tmp_path: Path, password: str = PASSWORD, mode: int = 0o600) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "etcd-password"
    path.write_text(password + "\n")
    path.chmod(mode)
    return path


def _refused(tmp_path: Path, store: str, *flags: str) -> str:
    """Run `server run` expected to fail at startup; the one line it printed."""
    server = ServerProcess(data_dir=tmp_path / "refused", store=store)
    kek = tmp_path / "kek.hex"
    kek.write_text(KEK["TRUSTMESH_KEK"])
    kek.chmod(0o600)
    result = server.cli("server", "run", "--trust-domain", "example.org", "--data-dir", str(server.data_dir),
                        "--bind", "127.0.0.1:0", "--attest-bind", "127.0.0.1:0", "--store", store,
                        "--kek-file", str(kek), *flags, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("trustmesh: error: "), result.stderr
    return errors[0]


def _works(make_server: Callable[..., ServerProcess], store: str, flags: list[str]) -> None:
    server = make_server(store=store, extra=flags, env=KEK)
    server.cli("token", "create", "--node", "node-1", check=True)
    server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/web", "--node", "node-1",
               "--selector", "unix:uid:1000", check=True)
    assert "spiffe://example.org/web" in server.cli("entry", "list", check=True).stdout


def _cert_flags(tls: EtcdTls, ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> list[str]:
    return ["--etcd-ca", str(ca or tls.ca), "--etcd-cert", str(cert or tls.client_cert),
            "--etcd-key", str(key or tls.client_key)]


# --- etcd with TLS and --client-cert-auth -----------------------------------------------------------


def test_a_server_on_tls_etcd_with_a_client_certificate_works(
        make_server: Callable[..., ServerProcess], cert_etcd: EtcdProcess, tls_material: EtcdTls) -> None:
    _works(make_server, f"{cert_etcd.url}/tls", _cert_flags(tls_material))


def test_tls_refusals_are_one_line_naming_the_cause(
        tmp_path: Path, cert_etcd: EtcdProcess, tls_material: EtcdTls) -> None:
    tls, url = tls_material, f"{cert_etcd.url}/tls"
    line = _refused(tmp_path, url, *_cert_flags(tls, cert=tls.other_client_cert, key=tls.other_client_key))
    assert "etcd refused trustmesh's client certificate" in line and str(tls.other_client_cert) in line
    line = _refused(tmp_path, url, "--etcd-ca", str(tls.ca))
    assert "etcd demands a client certificate" in line and "--etcd-cert" in line
    line = _refused(tmp_path, url, *_cert_flags(tls, ca=tls.other_ca))
    assert "etcd's certificate is not signed by a CA in --etcd-ca" in line and str(tls.other_ca) in line
    plain = url.replace("etcd+https://", "etcd://")
    assert "does it serve TLS?" in _refused(tmp_path, plain)
    insecure = url.replace("etcd+https://", "etcd+http://")
    assert "plaintext" in _refused(tmp_path, insecure, *_cert_flags(tls))
    assert "go together" in _refused(tmp_path, url, "--etcd-ca", str(tls.ca), "--etcd-cert", str(tls.client_cert))
    tls.client_key.chmod(0o644)
    try:
        assert "chmod 600" in _refused(tmp_path, url, *_cert_flags(tls))
    finally:
        tls.client_key.chmod(0o600)


# --- etcd with authentication enabled -----------------------------------------------------------------


def test_a_server_signs_in_to_etcd_as_a_user_limited_to_its_prefix(
        make_server: Callable[..., ServerProcess], auth_etcd: AuthEtcd, tmp_path: Path) -> None:
    flags = ["--etcd-ca", str(auth_etcd.tls.ca), "--etcd-user", "trustmesh",
             "--etcd-password-file", str(_password_file(tmp_path))]
    _works(make_server, f"{auth_etcd.etcd.url}{PREFIX}", flags)


def test_auth_refusals_are_one_line_naming_the_cause(auth_etcd: AuthEtcd, tmp_path: Path) -> None:
    url, ca = f"{auth_etcd.etcd.url}{PREFIX}", str(auth_etcd.tls.ca)
    wrong = _password_file(tmp_path / "wrong", "not-the-password")
    line = _refused(tmp_path, url, "--etcd-ca", ca, "--etcd-user", "trustmesh", "--etcd-password-file", str(wrong))
    assert "etcd refused user 'trustmesh'" in line and "password" in line
    right = _password_file(tmp_path / "right")
    line = _refused(tmp_path, url, "--etcd-ca", ca, "--etcd-user", "stranger", "--etcd-password-file", str(right))
    assert f"etcd denies user 'stranger' read and write on the prefix {PREFIX}" in line
    assert "etcd requires authentication" in _refused(tmp_path, url, "--etcd-ca", ca)
    readable = _password_file(tmp_path / "readable", mode=0o644)
    line = _refused(tmp_path, url, "--etcd-ca", ca, "--etcd-user", "trustmesh", "--etcd-password-file", str(readable))
    assert "open to other users" in line and "chmod 600" in line
    plain = url.replace("etcd+https://", "etcd://")
    line = _refused(tmp_path, plain, "--etcd-user", "trustmesh", "--etcd-password-file", str(right))
    assert "in clear" in line


async def test_an_expired_auth_token_is_renewed_without_losing_a_write(auth_etcd: AuthEtcd, tmp_path: Path) -> None:
    """etcd drops a user's tokens when its password is set (as when a token's TTL runs out):
    the next request, an unguarded write included, signs in again and goes through."""
    from trustmesh.controlplane.store.etcd import EtcdKV, EtcdSecurity, parse_endpoints  # this test's subject
    from trustmesh.controlplane.store.kv import Put

    security = EtcdSecurity(ca=auth_etcd.tls.ca, user="trustmesh", password_file=_password_file(tmp_path))
    kv = await EtcdKV.connect(parse_endpoints(auth_etcd.etcd.url), namespace=f"{PREFIX}renew/",
                              security=security, scheme="etcd+https")
    try:
        await kv.txn([], [Put("before", b"1")])
        credentials = grpc.ssl_channel_credentials(auth_etcd.tls.ca.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{auth_etcd.etcd.client_port}", credentials) as channel:
            auth = rpc.AuthStub(channel)
            token = (await auth.Authenticate(rpc.AuthenticateRequest(name="root", password="root-password"))).token
            root = (("token", token),)
            # A password change ends every token of the user; the password stays what the file says.
            await auth.UserChangePassword(rpc.AuthUserChangePasswordRequest(name="trustmesh", password=PASSWORD),
                                          metadata=root, timeout=10)
        await kv.txn([], [Put("after", b"2")])  # unguarded: retried only because etcd never ran it
        assert [(v.key, v.value) for v in await kv.range("")] == [("after", b"2"), ("before", b"1")]
    finally:
        await kv.close()
