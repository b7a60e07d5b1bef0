"""The optional remote admin API: mTLS, and only SVIDs of entries marked admin get in."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.integration.harness import ServerProcess
from tests.integration.node_client import NodeClient, pem_chain
from trustmesh.keys import generate_private_key
from trustmesh.x509svid import build_csr


async def _svid_files(server: ServerProcess, agent: NodeClient, entry_id: str, directory: Path) -> tuple[Path, Path]:
    key = generate_private_key()
    reply = await agent.batch_sign([(entry_id, build_csr(key))])
    cert, key_path = directory / f"{entry_id}.pem", directory / f"{entry_id}.key"
    cert.write_bytes(pem_chain(list(reply.results[0].svid.cert_chain)))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key_path


async def test_only_admin_entries_may_administer_remotely(make_server: Callable[..., ServerProcess],
                                                          tmp_path: Path) -> None:
    server = make_server(extra=["--admin-bind", "127.0.0.1:0"])
    address = re.search(r"admin_bind=(\S+)", server.log())
    assert address is not None
    remote = address.group(1)
    agent = NodeClient(server)
    await agent.attest(server.cli("token", "create", "--node", "ops-host", check=True).stdout.strip())
    admin_entry = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ops", "--node", "ops-host",
                             "--selector", "unix:uid:1000", "--admin", check=True).stdout.strip()
    plain_entry = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/web", "--node", "ops-host",
                             "--selector", "unix:uid:1001", check=True).stdout.strip()
    admin_cert, admin_key = await _svid_files(server, agent, admin_entry, tmp_path)
    plain_cert, plain_key = await _svid_files(server, agent, plain_entry, tmp_path)

    def remote_cli(cert: Path, key: Path, *args: str) -> tuple[int, str, str]:
        result = server.cli(*args, "--admin-server", remote, "--admin-cert", str(cert), "--admin-key", str(key),
                            "--trust-bundle", str(server.bundle_path), "--admin-socket", "/nonexistent")
        return result.returncode, result.stdout, result.stderr

    code, out, _ = remote_cli(admin_cert, admin_key, "entry", "list", "--json")
    assert code == 0 and "spiffe://example.org/web" in out
    code, out, _ = remote_cli(admin_cert, admin_key, "token", "create", "--node", "node-7")
    assert code == 0 and out.strip()
    code, _, err = remote_cli(plain_cert, plain_key, "entry", "list")
    assert code == 1 and "may not use the admin API" in err
    audit = server.cli("audit", "show", "--json", check=True).stdout
    assert '"admin:spiffe://example.org/ops"' in audit  # changes name the remote admin
    assert '"admin.call"' in audit and "spiffe://example.org/web" in audit
    result = server.cli("entry", "list", "--admin-server", remote)
    assert result.returncode == 1 and "--admin-cert" in result.stderr


def _remote_address(server: ServerProcess) -> str:
    address = re.search(r"admin_bind=(\S+)", server.log())
    assert address is not None
    return address.group(1)


async def test_admin_rights_belong_to_the_entry_not_the_spiffe_id(make_server: Callable[..., ServerProcess],
                                                                   tmp_path: Path) -> None:
    """Hole 7: the same SPIFFE ID registered without --admin on another node gets nothing over
    --admin-bind; the admin entry's SVID does, until --no-admin is set on that entry."""
    server = make_server(extra=["--admin-bind", "127.0.0.1:0"])
    remote = _remote_address(server)
    ops, other = NodeClient(server), NodeClient(server)
    await ops.attest(server.cli("token", "create", "--node", "ops-host", check=True).stdout.strip())
    await other.attest(server.cli("token", "create", "--node", "node-2", check=True).stdout.strip())
    admin_entry = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ops", "--node", "ops-host",
                             "--selector", "unix:uid:1000", "--admin", check=True).stdout.strip()
    same_id = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ops", "--node", "node-2",
                         "--selector", "unix:uid:1000", check=True).stdout.strip()
    admin_cert, admin_key = await _svid_files(server, ops, admin_entry, tmp_path)
    same_cert, same_key = await _svid_files(server, other, same_id, tmp_path)

    def remote_cli(cert: Path, key: Path, *args: str) -> tuple[int, str, str]:
        result = server.cli(*args, "--admin-server", remote, "--admin-cert", str(cert), "--admin-key", str(key),
                            "--trust-bundle", str(server.bundle_path), "--admin-socket", "/nonexistent")
        return result.returncode, result.stdout, result.stderr

    code, _, err = remote_cli(same_cert, same_key, "token", "create", "--node", "rogue")
    assert code == 1 and "may not use the admin API" in err, err
    code, out, err = remote_cli(admin_cert, admin_key, "token", "create", "--node", "node-3")
    assert code == 0 and out.strip(), err
    # The remote admin's changes name its SPIFFE ID and the address it called from.
    events = json.loads(server.cli("audit", "show", "--json", check=True).stdout)
    made = [e for e in events if e["kind"] == "token.create" and e["actor"] == "admin:spiffe://example.org/ops"]
    assert len(made) == 1 and made[0]["details"]["source"].startswith("127.0.0.1:")
    refused = [e for e in events if e["kind"] == "admin.call" and e["outcome"] == "denied"]
    assert [e["actor"] for e in refused] == ["spiffe://example.org/ops"]
    assert refused[0]["details"]["source"].startswith("127.0.0.1:")

    server.cli("entry", "update", admin_entry, "--no-admin", check=True)
    # The listener reads the registry view, which follows the store's change feed: poll.
    deadline = time.monotonic() + 20
    while (code := remote_cli(admin_cert, admin_key, "entry", "list")[0]) == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    code, _, err = remote_cli(admin_cert, admin_key, "token", "create", "--node", "node-4")
    assert code == 1 and "may not use the admin API" in err, err
