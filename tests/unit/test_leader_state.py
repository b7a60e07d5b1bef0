"""The leader decides what is due from memory kept by the change feed, not by re-reading the store."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from trustmesh.controlplane.duties import LeaderState
from trustmesh.controlplane.store import open_store
from trustmesh.controlplane.store.records import AttestedNode, FederationRecord, JoinToken
from trustmesh.spiffeid import SpiffeId, TrustDomain


async def _until(condition: Any) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the change feed did not deliver in time")


async def test_state_follows_the_feed_without_reading_the_store(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    ops: list[str] = []
    store.observe(ops.append)
    await store.create_federation(
        FederationRecord(
            TrustDomain("partner.example"), "https://p.example/b", "https_web", None, 1.0, next_refresh_at=50.0
        ),
        None,
    )
    await store.create_join_token(JoinToken("h1", "n1", expires_at=500.0, created_at=1.0))
    rt = SimpleNamespace(store=store, config=SimpleNamespace(prune_agents_after=timedelta(seconds=100)))
    state = LeaderState(rt)  # type: ignore[arg-type]
    await state.load()
    assert set(state.federations) == {"partner.example"} and state.next_expiry() == 500.0
    follower = asyncio.create_task(state.follow())
    try:
        await asyncio.sleep(0.05)
        ops.clear()
        await asyncio.sleep(0.3)
        assert ops == [], "an idle leader state reads nothing"
        await store.create_join_token(JoinToken("h2", "n2", expires_at=200.0, created_at=1.0))
        await store.create_federation(FederationRecord(TrustDomain("other.example"), "", "", None, 1.0), None)
        await store.create_attested_node(
            AttestedNode(
                SpiffeId.parse("spiffe://example.org/agent/n3"), "n3", "join_token", "1", 250.0, False, 1.0, 1.0
            )
        )
        await _until(lambda: state.next_expiry() == 200.0 and "other.example" in state.federations)
        await store.delete_federation("partner.example")
        # a banned agent is never pruned: it adds no expiry
        await store.consume_join_token_and_attest(
            "h2",
            AttestedNode(SpiffeId.parse("spiffe://example.org/agent/n2"), "n2", "join_token", "2", 9.0, True, 1.0, 1.0),
        )
        await _until(lambda: "partner.example" not in state.federations)
        await _until(lambda: state.next_expiry() == 350.0)  # the spent token is gone; agent n3 is next
    finally:
        follower.cancel()
        await store.close()
