"""The web console's parts that need no server: sessions, the role check before a call, and
the translations of views.py (tests/integration/test_console_api.py runs it for real)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from trustmesh._proto.trustmesh.v1 import types_pb2
from trustmesh.controlplane.console.admin import AdminClient, ApiError, OperatorIdentity, Upstream, may_call
from trustmesh.controlplane.console.sessions import Session, SessionStore, same_token
from trustmesh.controlplane.console.views import agent_json, agent_state, since_seconds

UPSTREAM = Upstream("127.0.0.1:1", "127.0.0.1:2", "trustmesh-server.example.org", lambda: b"")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _session(name: str, expires_at: float) -> Session:
    identity = OperatorIdentity(name, f"spiffe://example.org/operator/{name}", ("viewer",), expires_at,
                                b"chain", b"secret key")
    return Session(name, identity.spiffe_id, identity.roles, expires_at, "192.0.2.1", AdminClient(UPSTREAM, identity))


async def test_a_session_is_found_by_its_token_until_it_expires() -> None:
    clock = Clock()
    store = SessionStore(clock=clock)
    session = _session("ada", 1060.0)
    token = await store.add(session)
    assert len(token) >= 43 and token not in repr(store._sessions)  # kept by digest, not by token
    assert await store.lookup(token) == (session, "")
    assert await store.lookup(None) == (None, "missing")
    assert await store.lookup("x" * 43) == (None, "unknown")
    clock.now = 1060.0
    assert await store.lookup(token) == (None, "expired")
    assert session.ended.is_set() and len(store) == 0
    assert await store.lookup(token) == (None, "unknown")


async def test_the_store_is_bounded_and_drops_the_oldest() -> None:
    store = SessionStore(max_sessions=2, clock=Clock())
    first, second, third = (_session(n, 5000.0) for n in ("a", "b", "c"))
    tokens = [await store.add(s) for s in (first, second, third)]
    assert len(store) == 2 and first.ended.is_set() and not second.ended.is_set()
    assert (await store.lookup(tokens[0]))[0] is None and (await store.lookup(tokens[2]))[0] is third
    await store.discard(second)
    assert second.ended.is_set() and (await store.lookup(tokens[1]))[0] is None
    assert await store.end(tokens[2]) is third and third.ended.is_set()


async def test_sweep_ends_expired_sessions_only() -> None:
    clock = Clock()
    store = SessionStore(clock=clock)
    short, long = _session("a", 1010.0), _session("b", 2000.0)
    await store.add(short)
    await store.add(long)
    clock.now = 1500.0
    assert await store.sweep() == 1 and short.ended.is_set() and not long.ended.is_set()


def test_tokens_compare_whole_and_never_empty() -> None:
    assert same_token("abc", "abc")
    assert not same_token("abd", "abc") and not same_token("", "") and not same_token(None, "abc")


def test_the_key_never_shows_in_a_repr() -> None:
    identity = _session("ada", 1.0).client.identity
    assert "secret key" not in repr(identity)


@pytest.mark.parametrize(("roles", "method", "allowed"), [
    (("viewer",), "ListAgents", True),
    (("viewer",), "ApproveAccess", False),
    (("viewer",), "ListPolicyRevisions", False),
    (("security-officer",), "ApproveAccess", True),
    (("auditor",), "ListAuditEvents", True),
    (("admin",), "ReleaseQuarantine", True),
    (("admin",), "NoSuchMethod", False),
])
def test_the_console_asks_the_servers_role_table(roles: tuple[str, ...], method: str, allowed: bool) -> None:
    assert may_call(roles, method) is allowed


def test_since_takes_durations_and_iso_times() -> None:
    assert since_seconds("1h", "24h", now=10_000.0) == 6400
    assert since_seconds(None, "15m", now=10_000.0) == 9100
    assert since_seconds("2026-11-22T10:00:00Z", "1h") == datetime(2026, 11, 22, 10, tzinfo=timezone.utc).timestamp()
    for bad in ("yesterday", "-1h", "9999d"):
        with pytest.raises(ApiError) as refused:
            since_seconds(bad, "1h", now=10_000.0)
        assert refused.value.status == 400


def test_agents_are_connected_by_their_stream_and_banned_first() -> None:
    live = types_pb2.AttestedNode(spiffe_id="spiffe://example.org/agent/n1", node_name="n1", connected=True,
                                  policy_revision=7, updated_at=10, cert_not_after=4000)
    assert agent_state(live) == "connected"
    shown = agent_json(live, 3000.0)
    assert shown["policy_revision"] == 7 and shown["last_seen"] == "1970-01-01T00:50:00Z"
    assert shown["svid_expires_at"] == "1970-01-01T01:06:40Z" and shown["address"] is None
    gone = types_pb2.AttestedNode(spiffe_id="spiffe://example.org/agent/n2", node_name="n2", updated_at=10)
    assert agent_state(gone) == "unreachable" and agent_json(gone, 3000.0)["policy_revision"] is None
    assert agent_state(types_pb2.AttestedNode(banned=True, connected=True)) == "banned"
