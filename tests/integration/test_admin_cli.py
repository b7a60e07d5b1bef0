"""The admin CLI against the real server: entries, tokens, refusals, audit, tampering."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from controlplane.store import Store, open_store
from tests.integration.harness import ServerProcess


def _entries(server: ServerProcess) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(server.cli("entry", "list", "--json", check=True).stdout)


def test_token_create_prints_only_a_strong_token_stored_hashed(server: ServerProcess) -> None:
    first = server.cli("token", "create", "--node", "node-1", check=True).stdout
    second = server.cli("token", "create", "--node", "node-2", check=True).stdout
    assert first.count("\n") == 1 and first.strip() != second.strip()
    token = first.strip()
    assert token.startswith("tmjt_")  # never starts with "-", so it is safe on a command line
    assert len(token) >= 5 + 43 and all(c.isalnum() or c in "-_" for c in token)  # 256 bits, urlsafe
    if server.store == "sqlite":
        server.stop()
        for path in server.data_dir.glob("store.db*"):
            assert token.encode() not in path.read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spiffe-id", "not-an-id", "--node", "n1", "--selector", "unix:uid:1"], "invalid SPIFFE ID"),
        (["--spiffe-id", "spiffe://partner.example/x", "--node", "n1", "--selector", "unix:uid:1"], "trust domain"),
        (["--spiffe-id", "spiffe://example.org/agent/x", "--node", "n1", "--selector", "unix:uid:1"], "reserved"),
        (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", "--selector", "k8s:ns:x"], "unknown selector type"),
        (["--spiffe-id", "spiffe://example.org/x", "--node", "n1"], "at least one --selector"),
        (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", "--selector", "unix:uid:1", "--x509-ttl", "90d"],
         "out of range"),
        (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", "--selector", "unix:uid:1", "--dns-name", "bad_name!"],
         "invalid DNS name"),
        (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", "--selector", "unix:uid:1",
          "--dns-name", "trustmesh-server.example.org"], "reserved"),
        (["--spiffe-id", "spiffe://example.org/x", "--selector", "unix:uid:1"], "--node NAME or --parent-id"),
        (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", "--selector", "unix:uid:1",
          "--federates-with", "example.org"], "own trust domain"),
    ],
)
def test_bad_entries_are_refused_write_nothing_and_are_audited(server: ServerProcess, args: list[str],
                                                               message: str) -> None:
    result = server.cli("entry", "create", *args)
    assert result.returncode == 1, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr
    assert _entries(server) == []
    # Two are refused by the CLI itself (no trust domain to place --node in), before any call.
    if message not in ("--node NAME or --parent-id", "invalid SPIFFE ID"):
        audit = server.cli("audit", "show", "--kind", "entry.create", "--json", check=True).stdout
        assert '"denied"' in audit


def test_entry_round_trip_and_duplicates(server: ServerProcess) -> None:
    eid = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ledger", "--node", "node-1",
                     "--selector", "unix:uid:1000", "--selector", "unix:gid:1000", "--x509-ttl", "30m",
                     "--dns-name", "ledger.internal", "--federates-with", "partner.example", check=True).stdout.strip()
    shown = json.loads(server.cli("entry", "show", eid, "--json", check=True).stdout)
    assert shown["spiffe_id"] == "spiffe://example.org/ledger"
    assert shown["parent_id"] == "spiffe://example.org/agent/node-1"
    assert [f"{s['type']}:{s['value']}" for s in shown["selectors"]] == ["unix:gid:1000", "unix:uid:1000"]
    assert shown["x509_ttl_seconds"] == "1800" or shown["x509_ttl_seconds"] == 1800
    assert shown["dns_names"] == ["ledger.internal"] and shown["federates_with"] == ["partner.example"]
    dup = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ledger", "--node", "node-1",
                     "--selector", "unix:gid:1000", "--selector", "unix:uid:1000")
    assert dup.returncode == 1 and eid in dup.stderr and "ALREADY_EXISTS" in dup.stderr
    server.cli("entry", "update", eid, "--selector", "unix:uid:1001", check=True)
    shown = json.loads(server.cli("entry", "show", eid, "--json", check=True).stdout)
    assert [s["value"] for s in shown["selectors"]] == ["uid:1001"]
    stale = server.cli("entry", "update", eid, "--x509-ttl", "5m", "--expected-revision", "1")
    assert stale.returncode == 1 and "ABORTED" in stale.stderr
    table = server.cli("entry", "list", check=True).stdout
    assert eid in table and "spiffe://example.org/ledger" in table
    server.cli("entry", "delete", eid, check=True)
    assert _entries(server) == []
    gone = server.cli("entry", "show", eid)
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr


def test_unknown_agents_and_a_missing_socket(server: ServerProcess, tmp_path: Path) -> None:
    result = server.cli("agent", "ban", "node-9")
    assert result.returncode == 1 and "no attested agent" in result.stderr
    result = server.cli("agent", "evict", "spiffe://other.org/agent/x")
    assert result.returncode == 1 and "not an agent ID" in result.stderr
    result = server.cli("entry", "list", "--admin-socket", str(tmp_path / "nope.sock"))
    assert result.returncode == 1 and "is `trustmesh server run` running?" in result.stderr


def test_help_is_complete() -> None:
    server = ServerProcess(data_dir=Path("/nonexistent"))
    top = server.cli("--help", check=True).stdout
    for command in ("server", "token", "entry", "agent", "audit"):
        assert command in top
        assert server.cli(command, "--help", check=True).stdout
    entry_help = server.cli("entry", "--help", check=True).stdout
    for sub in ("create", "list", "show", "update", "delete"):
        assert sub in entry_help
        assert "--admin-socket" in server.cli("entry", sub, "--help", check=True).stdout or sub == "update"


async def _tamper(server: ServerProcess, store_url: str, seq: int, remove: bool) -> None:
    url = "sqlite" if store_url == "sqlite" else store_url
    store: Store = await open_store(url, server.data_dir)
    try:
        if remove:
            from controlplane.store.kv import Delete

            await store._kv.txn([], [Delete(Store.audit_event_key(seq))])  # noqa: SLF001 - tampering on purpose
        else:
            raw = await store.raw_get(Store.audit_event_key(seq))
            assert raw is not None
            doc = json.loads(raw)
            doc["subject"] = "spiffe://example.org/covered-up"
            await store.raw_put(Store.audit_event_key(seq), json.dumps(doc).encode())
    finally:
        await store.close()


@pytest.mark.parametrize("remove", [False, True], ids=["edited", "removed"])
def test_audit_verify_names_the_first_broken_event(server: ServerProcess, store_url: str, remove: bool) -> None:
    for i in range(4):
        server.cli("token", "create", "--node", f"node-{i}", check=True)
    ok = server.cli("audit", "verify", check=True).stdout
    assert "audit log intact: 4 events verified" in ok
    shown = server.cli("audit", "show", check=True).stdout
    assert shown.count("token.create") == 4
    server.stop()
    asyncio.run(_tamper(server, server.store, 2, remove))
    server.start()
    result = server.cli("audit", "verify")
    assert result.returncode == 1
    assert "BROKEN at event 2" in result.stdout
    assert ("edited" if not remove else "missing") in result.stdout
