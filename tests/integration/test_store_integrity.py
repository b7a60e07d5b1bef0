"""A store writer without the KEK cannot mint identities, lift a ban, or cut the audit log unseen.

The attacker here writes the real SQLite file with sqlite3 (and a real etcd through its
client) while holding no key-encryption key: forged rows, rows moved under another key, an
older validly sealed row put back, the audit log cut or wiped. Each must be refused or
detected by the real server process, and `audit verify` must say so.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.integration.harness import ServerProcess
from tests.integration.node_client import NodeClient
from trustmesh.controlplane.store import JoinToken, Store, open_store

KEK_ENV = {"TRUSTMESH_KEK": "33" * 32}


def _db(server: ServerProcess) -> sqlite3.Connection:
    return sqlite3.connect(server.data_dir / "store.db")


def _rows(server: ServerProcess, prefix: str) -> dict[str, bytes]:
    with _db(server) as db:
        return {k.decode(): v for k, v in db.execute("SELECT key, value FROM kv WHERE key >= ? AND key < ?",
                                                     (prefix.encode(), prefix.encode() + b"\xff"))}


def _write(server: ServerProcess, key: str, value: bytes | None) -> None:
    """What someone with write access to store.db (and no KEK) can do: any row, any bytes."""
    with _db(server) as db:
        if value is None:
            db.execute("DELETE FROM kv WHERE key = ?", (key.encode(),))
            return
        rev = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0] + 1
        db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
        db.execute("INSERT OR REPLACE INTO kv (key, value, create_rev, mod_rev, version) VALUES (?, ?, ?, ?, 1)",
                   (key.encode(), value, rev, rev))


def _forged_token(secret: str, node: str) -> tuple[str, bytes]:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    now = time.time()
    return f"tokens/{digest}", JoinToken(digest, node, now + 3600, now).to_json()


async def _attest_refused(server: ServerProcess, secret: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await NodeClient(server).attest(secret)
    return info.value


def _events(server: ServerProcess, kind: str) -> list[dict[str, object]]:
    shown = server.cli("audit", "show", "--kind", kind, "--json", check=True).stdout
    return list(json.loads(shown))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(address: str, name: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


async def test_rows_written_without_the_kek_are_never_used(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(env=KEK_ENV)
    server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/payments", "--node", "node-2",
               "--selector", "unix:uid:1000", check=True)
    server.stop()
    entry_key, sealed_entry = next(iter(_rows(server, "entries/").items()))
    # 1. a join token hash inserted by hand; 2. an admin entry for node-1 written as plain JSON;
    # 3. node-2's validly sealed entry copied under another key (for node-1 to claim).
    token_key, token_value = _forged_token("tmjt_forged-by-a-store-writer", "rogue")
    _write(server, token_key, token_value)
    forged = json.loads(sealed_entry.split(b"\n~")[0])
    forged.update(id="forged", parent_id="spiffe://example.org/agent/node-1", admin=True)
    _write(server, "entries/forged", json.dumps(forged).encode())
    _write(server, "entries/moved", sealed_entry)
    metrics = f"127.0.0.1:{_free_port()}"
    server.extra = ["--metrics", metrics]
    server.start()

    err = await _attest_refused(server, "tmjt_forged-by-a-store-writer")
    assert err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
                          grpc.StatusCode.UNAUTHENTICATED), err
    listed = json.loads(server.cli("entry", "list", "--json", check=True).stdout)
    assert [e["id"] for e in listed] == [entry_key.removeprefix("entries/")]
    verify = server.cli("audit", "verify")
    assert verify.returncode == 1, verify.stdout
    for needle in ("join-token " + token_key, "entry entries/forged", "entry entries/moved"):
        assert needle in verify.stdout, verify.stdout
    failures = _events(server, "store.integrity_failure")
    assert {e["subject"] for e in failures} >= {token_key, "entries/forged", "entries/moved"}
    assert all(e["outcome"] == "denied" for e in failures)
    assert "store.integrity_failure" in server.log()
    counted = _metric(metrics, "trustmesh_store_integrity_failures_total")
    assert 'kind="join-token"' in counted and 'kind="entry"' in counted, counted


async def test_an_existing_store_is_sealed_once_and_a_deleted_marker_launders_nothing(
        make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    # A store as the version before record MACs wrote it: the same records, no MAC.
    data_dir = tmp_path / "server"
    data_dir.mkdir(mode=0o700)
    old: Store = await open_store("sqlite", data_dir)
    now = time.time()
    secret = "tmjt_issued-before-the-upgrade"
    await old.create_join_token(JoinToken(hashlib.sha256(secret.encode()).hexdigest(), "node-1", now + 3600, now))
    await old.close()

    server = make_server(env=KEK_ENV)
    sealed = _events(server, "store.sealed")
    assert len(sealed) == 1 and sealed[0]["details"] == {"records": 1}, sealed
    await NodeClient(server).attest(secret)  # the upgraded token still works
    server.stop()

    # Deleting the marker must not make the next start seal rows written without the KEK.
    _write(server, "meta/sealed", None)
    key, value = _forged_token("tmjt_planted-after-the-marker-was-deleted", "rogue")
    _write(server, key, value)
    server.start()
    await _attest_refused(server, "tmjt_planted-after-the-marker-was-deleted")
    assert len(_events(server, "store.sealed")) == 1
    assert server.cli("audit", "verify").returncode == 1


@pytest.mark.parametrize("how", ["wiped", "cut"])
def test_cutting_or_wiping_the_audit_log_is_detected(make_server: Callable[..., ServerProcess], how: str) -> None:
    server = make_server(env=KEK_ENV)
    for i in range(4):
        server.cli("token", "create", "--node", f"node-{i}", check=True)
    assert server.cli("audit", "verify").returncode == 0
    server.stop()  # a clean stop anchors the last event
    events = _rows(server, "audit/events/")
    if how == "wiped":
        for key in [*events, "audit/head"]:
            _write(server, key, None)
    else:
        # Drop the last two events and point the head at the one before: a chain that links.
        keys = sorted(events)
        for key in keys[-2:]:
            _write(server, key, None)
        _write(server, "audit/head", events[keys[-3]])
    server.start()
    result = server.cli("audit", "verify")
    assert result.returncode == 1, result.stdout
    assert "removed from the end or the log was wiped" in result.stdout, result.stdout
    assert _events(server, "audit.anchor_mismatch")
    # Later events do not make the cut disappear.
    server.cli("token", "create", "--node", "node-9", check=True)
    assert server.cli("audit", "verify").returncode == 1


async def test_a_lifted_ban_put_back_from_an_older_record_does_not_hold(
        make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(env=KEK_ENV)
    agent = NodeClient(server)
    await agent.attest(server.cli("token", "create", "--node", "node-1", check=True).stdout.strip())
    (node_key, before_ban), = _rows(server, "nodes/").items()
    server.cli("agent", "ban", "node-1", check=True)
    server.stop()
    _write(server, node_key, before_ban)  # validly sealed, only older
    server.start()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.renew()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
    for _ in range(50):
        failures = [e for e in _events(server, "store.integrity_failure") if e["subject"] == node_key]
        if failures:
            break
        await asyncio.sleep(0.1)
    assert failures and "banned" in str(failures[0]["details"])


@pytest.mark.etcd
async def test_a_record_forged_in_etcd_is_not_used_even_live(make_server: Callable[..., ServerProcess],
                                                             etcd_server: str, tmp_path: Path) -> None:
    url = f"{etcd_server}/tint{time.time_ns()}"
    server = make_server(store=url, env=KEK_ENV)
    attacker: Store = await open_store(url, tmp_path / "attacker")
    try:
        forged = {"v": 1, "id": "forged", "spiffe_id": "spiffe://example.org/payments",
                  "parent_id": "spiffe://example.org/agent/node-1", "selectors": ["unix:uid:0"], "x509_ttl": 3600,
                  "jwt_ttl": 300, "dns_names": [], "federates_with": [], "admin": True, "created_at": 1.0,
                  "updated_at": 1.0}
        await attacker.raw_put("entries/forged", json.dumps(forged).encode())
        for _ in range(50):  # the server sees it through its watch and reports it
            if _events(server, "store.integrity_failure"):
                break
            await asyncio.sleep(0.1)
        assert [e["subject"] for e in _events(server, "store.integrity_failure")] == ["entries/forged"]
        assert json.loads(server.cli("entry", "list", "--json", check=True).stdout) == []
    finally:
        await attacker.close()
