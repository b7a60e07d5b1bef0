"""Leases with etcd's semantics, on both KV backends (the same tests, real etcd)."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_kv_contract import WAIT, kv, next_batch  # noqa: F401 - the fixture
from trustmesh.controlplane.store.kv import Delete, EventType, KVBackend, LeaseNotFoundError, Put

__all__ = ["kv"]


async def _gone(backend: KVBackend, key: str, timeout: float = WAIT) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await backend.get(key) is None:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_revoke_deletes_the_attached_keys_and_watchers_see_it(kv: KVBackend) -> None:
    lease = await kv.lease_grant(30)
    assert lease != 0
    start = await kv.current_revision()
    await kv.txn([], [Put("leader", b"a", lease=lease), Put("other", b"x", lease=lease), Put("free", b"y")])
    assert (await kv.get("leader")) is not None
    assert await kv.lease_keepalive(lease) > 0
    events = kv.watch("", start + 1)
    await kv.lease_revoke(lease)
    batch = await next_batch(events)
    assert sorted((e.type, e.key) for e in batch) == [(EventType.DELETE, "leader"), (EventType.DELETE, "other")]
    await events.aclose()
    assert await kv.get("leader") is None and await kv.get("other") is None
    assert (await kv.get("free")) is not None, "keys without the lease stay"
    assert await kv.lease_keepalive(lease) == 0
    await kv.lease_revoke(lease)  # revoking again is no error


async def test_an_expired_lease_takes_its_keys_with_it(kv: KVBackend) -> None:
    lease = await kv.lease_grant(1)
    await kv.txn([], [Put("leader", b"a", lease=lease)])
    # Nobody renews: the key disappears by itself (etcd may round the TTL up a little).
    assert await _gone(kv, "leader")
    assert await kv.lease_keepalive(lease) == 0


async def test_keepalive_keeps_the_key(kv: KVBackend) -> None:
    lease = await kv.lease_grant(2)
    await kv.txn([], [Put("leader", b"a", lease=lease)])
    for _ in range(8):  # 4 s, twice the TTL
        assert await kv.lease_keepalive(lease) > 0
        await asyncio.sleep(0.5)
    assert (await kv.get("leader")) is not None
    await kv.lease_revoke(lease)


async def test_a_put_with_an_unknown_lease_writes_nothing(kv: KVBackend) -> None:
    lease = await kv.lease_grant(30)
    await kv.lease_revoke(lease)
    before = await kv.current_revision()
    with pytest.raises(LeaseNotFoundError):
        await kv.txn([], [Put("a", b"1"), Put("b", b"2", lease=lease)])
    assert await kv.get("a") is None and await kv.current_revision() == before


async def test_a_put_without_the_lease_detaches_the_key(kv: KVBackend) -> None:
    lease = await kv.lease_grant(30)
    await kv.txn([], [Put("k", b"leased", lease=lease), Put("d", b"leased", lease=lease)])
    await kv.txn([], [Put("k", b"mine now")])
    await kv.txn([], [Delete("d")])
    await kv.txn([], [Put("d", b"again")])
    await kv.lease_revoke(lease)
    got = await kv.get("k")
    assert got is not None and got.value == b"mine now"
    assert (await kv.get("d")) is not None


@pytest.mark.parametrize("ttl", [0, -5])
async def test_a_lease_needs_a_positive_ttl(kv: KVBackend, ttl: int) -> None:
    with pytest.raises(ValueError, match="at least 1 second"):
        await kv.lease_grant(ttl)
