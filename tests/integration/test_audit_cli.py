"""`trustmesh audit show` and `audit verify` against the real server (SQLite and etcd),
including a store edited behind the server's back: an event edited, removed, reordered,
or cut off the end of the chain."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from tests.integration.harness import ServerProcess
from trustmesh.controlplane.store import Store, open_store
from trustmesh.controlplane.store.kv import Delete


def _shown(server: ServerProcess, *args: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(server.cli("audit", "show", "--json", *args, check=True).stdout)
    return data


def test_audit_show_lists_changes_and_refusals(server: ServerProcess) -> None:
    started = time.time()
    server.cli("token", "create", "--node", "node-1", check=True)
    eid = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ledger", "--node", "node-1",
                     "--selector", "unix:uid:1000", check=True).stdout.strip()
    refused = server.cli("entry", "create", "--spiffe-id", "spiffe://partner.example/x", "--node", "node-1",
                         "--selector", "unix:uid:1000")
    assert refused.returncode == 1
    server.cli("agent", "ban", "node-9")  # unknown: refused
    server.cli("entry", "delete", eid, check=True)

    events = _shown(server)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    mine = [(e["kind"], e["outcome"]) for e in events if e["actor"] == "local-root (uid 0)"]
    assert mine == [("token.create", "ok"), ("entry.create", "ok"), ("entry.create", "denied"),
                    ("agent.ban", "denied"), ("entry.delete", "ok")]
    created = next(e for e in events if e["kind"] == "entry.create" and e["outcome"] == "ok")
    assert created["subject"] == "spiffe://example.org/ledger" and created["details"]["entry_id"] == eid
    assert len(created["hash"]) == 64
    denied = next(e for e in events if e["kind"] == "entry.create" and e["outcome"] == "denied")
    assert "not this server's" in denied["details"]["reason"]
    assert abs(datetime.fromisoformat(created["time"]).timestamp() - started) < 60

    # The text form: one line per event, with kind, outcome, actor and subject.
    lines = server.cli("audit", "show", check=True).stdout.splitlines()
    assert len(lines) == len(events)
    assert any("entry.create" in ln and "denied" in ln and
               re.search(r"local-root \(uid 0\) \[pid \d+\] -> spiffe://partner\.example/x", ln) for ln in lines)

    # Filters.
    assert [e["kind"] for e in _shown(server, "--kind", "entry.delete")] == ["entry.delete"]
    assert len(_shown(server, "--limit", "2")) == 2 and _shown(server, "--limit", "2")[0]["seq"] == 1
    assert len(_shown(server, "--since", "1h")) == len(events)
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert _shown(server, "--since", later) == []
    assert server.cli("audit", "show", "--since", later, check=True).stdout.strip() == "no audit events"
    earlier = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    assert len(_shown(server, "--since", earlier)) == len(events)
    for args, message in ((["--since", "yesterday"], "ISO time"), (["--limit", "0"], "positive")):
        bad = server.cli("audit", "show", *args)
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr


def test_audit_show_escapes_control_characters(server: ServerProcess) -> None:
    """A refused input with a newline cannot forge a line of the listing."""
    server.cli("agent", "ban", "spiffe://example.org/agent/x\n     99 2026-01-01T00:00:00Z forged")
    lines = server.cli("audit", "show", "--kind", "agent.ban", check=True).stdout.splitlines()
    assert len(lines) == 1 and "\\n" in lines[0]


async def _tamper(server: ServerProcess, how: str, seq: int) -> None:
    store: Store = await open_store(server.store, server.data_dir)
    try:
        key = Store.audit_event_key(seq)
        raw = await store.raw_get(key)
        assert raw is not None
        if how == "edited":
            doc = json.loads(raw)
            doc["subject"] = "spiffe://example.org/covered-up"
            await store.raw_put(key, json.dumps(doc).encode())
        elif how == "reordered":
            after = await store.raw_get(Store.audit_event_key(seq + 1))
            assert after is not None
            await store.raw_put(key, after)
            await store.raw_put(Store.audit_event_key(seq + 1), raw)
        else:
            # The Store is append-only and offers no delete; an attacker with access to the
            # backend could, so tamper through the backend itself.
            await store._kv.txn([], [Delete(key)])  # noqa: SLF001
    finally:
        await store.close()


@pytest.mark.parametrize(("how", "seq", "words"), [
    ("edited", 2, "was edited"),
    ("removed", 2, "missing"),
    ("reordered", 2, "event 2"),
    # The restarted server finds event 5 gone from under its anchor and records that as event 6.
    ("truncated", 5, "event 5 is missing"),
])
def test_audit_verify_names_the_first_broken_event(server: ServerProcess, how: str, seq: int, words: str) -> None:
    for i in range(4):
        server.cli("token", "create", "--node", f"node-{i}", check=True)
    ok = server.cli("audit", "verify", check=True)
    # Event 1 is the server's store.sealed (records carry MACs from the first start on).
    assert ok.stdout.startswith("audit log intact: 5 events verified"), ok.stdout
    server.stop()
    asyncio.run(_tamper(server, how, seq))
    server.start()
    result = server.cli("audit", "verify")
    assert result.returncode == 1, result.stdout
    assert result.stdout.startswith(f"audit log BROKEN at event {seq}: ") and words in result.stdout, result.stdout
    assert "Traceback" not in result.stderr
    # The server keeps recording on top of the broken chain; the break stays visible.
    server.cli("token", "create", "--node", "node-9", check=True)
    assert server.cli("audit", "verify").returncode == 1
