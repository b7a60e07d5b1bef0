"""The KV backend contract, run unchanged against SQLite and a real etcd.

Both backends must agree on revisions, versions, compare semantics, atomicity and the
watch stream, because the typed Store above them is written once.
"""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.etcd_process import free_port, running_etcd
from trustmesh.controlplane.store.etcd import EtcdKV, parse_endpoints
from trustmesh.controlplane.store.kv import (
    CompactedError,
    Compare,
    CompareOp,
    Delete,
    DeletePrefix,
    Event,
    Get,
    InvalidTxnError,
    KVBackend,
    Put,
    Target,
)
from trustmesh.controlplane.store.sqlite import SqliteKV
from trustmesh.errors import StoreError, StoreUnavailableError

# Upper bound for waiting on a watch event that must come; a test that hits it fails.
WAIT = 10.0


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
async def kv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KVBackend]:
    backend: KVBackend
    if request.param == "sqlite":
        backend = await SqliteKV.open(tmp_path / "store.db")
    else:
        url = request.getfixturevalue("etcd_server")
        # A namespace of its own per test: tests share one etcd but never see each other.
        backend = await EtcdKV.connect(
            parse_endpoints(url), namespace=f"/test-{uuid.uuid4().hex}/"
        )
    try:
        yield backend
    finally:
        await backend.close()


async def put(kv: KVBackend, key: str, value: bytes) -> int:
    return (await kv.txn([], [Put(key, value)])).revision


async def next_batch(it: AsyncIterator[list[Event]]) -> list[Event]:
    return await asyncio.wait_for(anext(it), WAIT)


def summary(batch: list[Event]) -> list[tuple[str, str, bytes]]:
    return [(e.type.value, e.key, e.value) for e in batch]


# -- keys, versions, revisions ---------------------------------------------------------


async def test_put_get_tracks_versions_and_revisions(kv: KVBackend) -> None:
    start = await kv.current_revision()
    r1 = await put(kv, "a", b"one")
    assert r1 == start + 1
    got = await kv.get("a")
    assert got is not None
    assert (got.value, got.create_revision, got.mod_revision, got.version) == (b"one", r1, r1, 1)

    r2 = await put(kv, "a", b"two")
    assert r2 == r1 + 1
    got = await kv.get("a")
    assert got is not None
    assert (got.value, got.create_revision, got.mod_revision, got.version) == (b"two", r1, r2, 2)
    assert await kv.current_revision() == r2


async def test_missing_key_reads_as_none(kv: KVBackend) -> None:
    assert await kv.get("nope") is None
    assert await kv.range("nope/") == []


async def test_delete_then_recreate_starts_a_new_life(kv: KVBackend) -> None:
    await put(kv, "k", b"1")
    await put(kv, "k", b"2")
    res = await kv.txn([], [Delete("k")])
    assert res.responses[0].deleted == 1
    assert await kv.get("k") is None
    r = await put(kv, "k", b"3")
    got = await kv.get("k")
    assert got is not None
    assert (got.version, got.create_revision) == (1, r)


async def test_txn_that_changes_nothing_keeps_the_revision(kv: KVBackend) -> None:
    await put(kv, "x", b"1")
    before = await kv.current_revision()
    res = await kv.txn([], [Get("x"), Delete("not-there")])
    assert res.succeeded
    assert res.revision == before
    assert res.responses[0].kv is not None and res.responses[0].kv.value == b"1"
    assert res.responses[1].deleted == 0
    assert await kv.current_revision() == before


async def test_all_writes_of_a_txn_share_one_revision(kv: KVBackend) -> None:
    before = await kv.current_revision()
    res = await kv.txn([], [Put("m/1", b"a"), Put("m/2", b"b"), Put("m/3", b"c")])
    assert res.revision == before + 1
    assert {x.mod_revision for x in await kv.range("m/")} == {before + 1}


async def test_unicode_keys_and_binary_values_round_trip(kv: KVBackend) -> None:
    value = bytes(range(256))
    await put(kv, "nodes/spiffe://ex.org/agent/nœud-ü", value)
    got = await kv.get("nodes/spiffe://ex.org/agent/nœud-ü")
    assert got is not None and got.value == value
    assert [x.key for x in await kv.range("nodes/")] == ["nodes/spiffe://ex.org/agent/nœud-ü"]


# -- range -----------------------------------------------------------------------------


async def test_range_is_prefix_bounded_sorted_and_pageable(kv: KVBackend) -> None:
    # "ab" and "a0" sort right after "a/"-keys in byte order: they must not leak in.
    for key in ["a/3", "a/1", "ab", "a0", "a/2", "a", "b/1"]:
        await put(kv, key, key.encode())
    assert [x.key for x in await kv.range("a/")] == ["a/1", "a/2", "a/3"]
    assert [x.key for x in await kv.range("a/", limit=2)] == ["a/1", "a/2"]
    assert [x.key for x in await kv.range("a/", start_after="a/1")] == ["a/2", "a/3"]
    assert [x.key for x in await kv.range("a/", start_after="a/2", limit=5)] == ["a/3"]
    assert await kv.range("a/", start_after="a/3") == []
    assert [x.key for x in await kv.range("")] == ["a", "a/1", "a/2", "a/3", "a0", "ab", "b/1"]


async def test_range_returns_more_than_one_page(kv: KVBackend) -> None:
    # 1,200 keys is more than one etcd page (500): paging must neither lose nor repeat.
    keys = [f"p/{i:05d}" for i in range(1200)]
    for chunk in range(0, len(keys), 100):
        await kv.txn([], [Put(k, b"v") for k in keys[chunk : chunk + 100]])
    assert [x.key for x in await kv.range("p/")] == keys


# -- transactions ----------------------------------------------------------------------


async def test_failed_compare_writes_nothing_and_runs_failure_ops(kv: KVBackend) -> None:
    await put(kv, "held", b"mine")
    before = await kv.current_revision()
    res = await kv.txn(
        [Compare.absent("held")],
        [Put("held", b"theirs"), Put("side-effect", b"x")],
        [Get("held")],
    )
    assert not res.succeeded
    assert res.revision == before
    assert res.responses[0].kv is not None and res.responses[0].kv.value == b"mine"
    assert await kv.get("side-effect") is None
    got = await kv.get("held")
    assert got is not None and got.value == b"mine"


async def test_every_compare_must_hold(kv: KVBackend) -> None:
    r = await put(kv, "c1", b"v")
    ok = Compare.mod_revision("c1", r)
    bad = Compare.absent("c1")
    assert not (await kv.txn([ok, bad], [Put("out", b"1")])).succeeded
    assert await kv.get("out") is None
    assert (await kv.txn([ok, Compare.absent("c2")], [Put("out", b"1")])).succeeded


@pytest.mark.parametrize(
    ("compare", "holds"),
    [
        (Compare.exists("k"), True),
        (Compare.absent("k"), False),
        (Compare.version("k", 2), True),
        (Compare.version("k", 1), False),
        (Compare.value("k", b"v2"), True),
        (Compare.value("k", b"v1"), False),
        (Compare("k", Target.VERSION, CompareOp.GREATER, 1), True),
        (Compare("k", Target.VERSION, CompareOp.LESS, 2), False),
        (Compare("k", Target.VALUE, CompareOp.NOT_EQUAL, b"v2"), False),
        (Compare("k", Target.CREATE, CompareOp.NOT_EQUAL, 0), True),
        # A missing key: version/mod 0, and a value compare is always false (etcd's rule).
        (Compare.absent("missing"), True),
        (Compare.mod_revision("missing", 0), True),
        (Compare.value("missing", b""), False),
        (Compare("missing", Target.VALUE, CompareOp.NOT_EQUAL, b"x"), False),
    ],
)
async def test_compare_semantics(kv: KVBackend, compare: Compare, holds: bool) -> None:
    await put(kv, "k", b"v1")
    await put(kv, "k", b"v2")
    assert (await kv.txn([compare], [])).succeeded is holds


async def test_compare_on_create_revision(kv: KVBackend) -> None:
    r = await put(kv, "k", b"v")
    await put(kv, "k", b"w")
    assert (await kv.txn([Compare("k", Target.CREATE, CompareOp.EQUAL, r)], [])).succeeded
    assert not (await kv.txn([Compare("k", Target.CREATE, CompareOp.EQUAL, r + 1)], [])).succeeded


def test_compare_operand_type_is_checked() -> None:
    with pytest.raises(InvalidTxnError, match="bytes operand"):
        Compare("k", Target.VALUE, CompareOp.EQUAL, 1)
    with pytest.raises(InvalidTxnError, match="int operand"):
        Compare("k", Target.MOD, CompareOp.EQUAL, b"1")


async def test_compare_and_swap_race_has_exactly_one_winner(kv: KVBackend) -> None:
    r = await put(kv, "lock", b"free")
    guard = Compare.mod_revision("lock", r)
    results = await asyncio.gather(
        *(kv.txn([guard], [Put("lock", f"w{i}".encode())]) for i in range(8))
    )
    winners = [i for i, res in enumerate(results) if res.succeeded]
    assert len(winners) == 1
    got = await kv.get("lock")
    assert got is not None and got.value == f"w{winners[0]}".encode()


async def test_delete_prefix_deletes_only_that_prefix(kv: KVBackend) -> None:
    await kv.txn([], [Put("d/1", b""), Put("d/2", b""), Put("d2", b""), Put("e/1", b"")])
    res = await kv.txn([], [DeletePrefix("d/")])
    assert res.responses[0].deleted == 2
    assert [x.key for x in await kv.range("")] == ["d2", "e/1"]


@pytest.mark.parametrize(
    "ops",
    [
        [Put("a", b"1"), Put("a", b"2")],
        [Put("a", b"1"), Delete("a")],
        [Put("p/a", b"1"), DeletePrefix("p/")],
    ],
)
async def test_ambiguous_txn_is_refused_and_writes_nothing(kv: KVBackend, ops: list[Put]) -> None:
    before = await kv.current_revision()
    with pytest.raises(InvalidTxnError):
        await kv.txn([], ops)
    assert await kv.current_revision() == before
    assert await kv.range("") == []


async def test_txn_failing_midway_leaves_nothing_half_written(kv: KVBackend) -> None:
    # The second key cannot be encoded; the first put must not survive on its own.
    before = await kv.current_revision()
    with pytest.raises(UnicodeEncodeError):
        await kv.txn([], [Put("first", b"1"), Put("bad-\ud800", b"2")])
    assert await kv.get("first") is None
    assert await kv.current_revision() == before


# -- watch -----------------------------------------------------------------------------


async def test_watch_sees_later_changes_in_order_one_batch_per_txn(kv: KVBackend) -> None:
    await put(kv, "w/before", b"0")
    start = await kv.current_revision()
    watch = kv.watch("w/", start)
    r1 = await put(kv, "w/a", b"1")
    r2 = (await kv.txn([], [Put("w/b", b"2"), Put("w/c", b"3")])).revision
    await put(kv, "other/x", b"not watched")
    r3 = (await kv.txn([], [Delete("w/a")])).revision
    r4 = (await kv.txn([], [DeletePrefix("w/")])).revision

    b1, b2, b3, b4 = [await next_batch(watch) for _ in range(4)]
    assert summary(b1) == [("PUT", "w/a", b"1")]
    assert summary(b2) == [("PUT", "w/b", b"2"), ("PUT", "w/c", b"3")]
    assert summary(b3) == [("DELETE", "w/a", b"")]
    assert sorted(summary(b4)) == [
        ("DELETE", "w/b", b""),
        ("DELETE", "w/before", b""),
        ("DELETE", "w/c", b""),
    ]
    assert [b[0].mod_revision for b in (b1, b2, b3, b4)] == [r1, r2, r3, r4]
    assert all(e.mod_revision == b[0].mod_revision for b in (b2, b4) for e in b)


async def test_watch_resume_from_last_seen_gets_exactly_the_rest(kv: KVBackend) -> None:
    start = await kv.current_revision()
    revs = [await put(kv, f"r/{i}", str(i).encode()) for i in range(5)]

    first = kv.watch("r/", start)
    seen = [await next_batch(first) for _ in range(2)]
    await first.aclose()
    last = seen[-1][0].mod_revision
    assert last == revs[1]

    resumed = kv.watch("r/", last)
    rest = [await next_batch(resumed) for _ in range(3)]
    assert [b[0].key for b in rest] == ["r/2", "r/3", "r/4"]
    assert [b[0].mod_revision for b in rest] == revs[2:]
    # And nothing else is pending: the next batch is the next write, not a repeat.
    r = await put(kv, "r/5", b"5")
    nxt = await next_batch(resumed)
    assert (nxt[0].key, nxt[0].mod_revision) == ("r/5", r)


async def test_watch_from_a_compacted_revision_raises(kv: KVBackend) -> None:
    start = await kv.current_revision()
    for i in range(3):
        await put(kv, "c/k", str(i).encode())
    head = await kv.current_revision()
    await kv.compact(head)
    with pytest.raises(CompactedError) as caught:
        await next_batch(kv.watch("c/", start))
    assert caught.value.compacted_revision >= head
    assert "re-read" in str(caught.value)

    # Watching from the head is still fine, and compacting again is harmless.
    await kv.compact(head)
    live = kv.watch("c/", head)
    r = await put(kv, "c/k", b"after")
    batch = await next_batch(live)
    assert (batch[0].value, batch[0].mod_revision) == (b"after", r)
    # Values survive compaction; only history goes.
    got = await kv.get("c/k")
    assert got is not None and got.value == b"after"


async def test_watch_ends_when_the_backend_closes(kv: KVBackend) -> None:
    watch = kv.watch("z/", await kv.current_revision())
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0)  # let the watch start waiting
    await kv.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, WAIT)


# -- SQLite only -----------------------------------------------------------------------


async def test_sqlite_persists_across_restart_and_revisions_keep_growing(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    kv = await SqliteKV.open(path)
    r = await put(kv, "keep", b"me")
    await kv.close()

    kv = await SqliteKV.open(path)
    try:
        got = await kv.get("keep")
        assert got is not None and (got.value, got.mod_revision) == (b"me", r)
        assert await kv.current_revision() == r
        assert await put(kv, "next", b"x") == r + 1
        # History also survived: a watch from before the restart replays it.
        batch = await next_batch(kv.watch("", r - 1))
        assert summary(batch) == [("PUT", "keep", b"me")]
    finally:
        await kv.close()


async def test_sqlite_file_is_private(tmp_path: Path) -> None:
    kv = await SqliteKV.open(tmp_path / "store.db")
    await put(kv, "k", b"v")
    try:
        for name in ["store.db", "store.db-wal"]:
            mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
            assert mode == 0o600, f"{name} has mode {oct(mode)}"
    finally:
        await kv.close()


async def test_sqlite_keeps_a_bounded_history(tmp_path: Path) -> None:
    kv = await SqliteKV.open(tmp_path / "store.db", history=20)
    try:
        start = await kv.current_revision()
        for i in range(60):
            await put(kv, "h", str(i).encode())
        head = await kv.current_revision()
        with pytest.raises(CompactedError):
            await next_batch(kv.watch("", start))
        # The most recent `history` revisions are always still served.
        batch = await next_batch(kv.watch("", head - 20))
        assert batch[0].mod_revision == head - 19
    finally:
        await kv.close()


async def test_sqlite_watch_far_behind_reads_in_chunks_without_loss(tmp_path: Path) -> None:
    kv = await SqliteKV.open(tmp_path / "store.db")
    try:
        start = await kv.current_revision()
        # One big revision (more rows than one watch read) between many small ones.
        for i in range(600):
            await put(kv, f"s/{i:04d}", b"")
        await kv.txn([], [Put(f"big/{i:04d}", b"") for i in range(1500)])
        for i in range(600, 1200):
            await put(kv, f"s/{i:04d}", b"")
        watch = kv.watch("", start)
        keys: list[str] = []
        while len(keys) < 2700:
            batch = await next_batch(watch)
            assert len({e.mod_revision for e in batch}) == 1
            keys += [e.key for e in batch]
        expected = [f"s/{i:04d}" for i in range(600)]
        expected += [f"big/{i:04d}" for i in range(1500)]
        expected += [f"s/{i:04d}" for i in range(600, 1200)]
        assert keys == expected
    finally:
        await kv.close()


async def test_sqlite_refuses_a_corrupt_file_clearly(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not a sqlite database at all" * 100)
    with pytest.raises(StoreError, match="corrupt or not a database"):
        await SqliteKV.open(path)


async def test_sqlite_refuses_an_unopenable_path_clearly(tmp_path: Path) -> None:
    (tmp_path / "store.db").mkdir()  # a directory where the file should be
    with pytest.raises(StoreError, match="writable"):
        await SqliteKV.open(tmp_path / "store.db")
    with pytest.raises(StoreError, match="data directory exists"):
        await SqliteKV.open(tmp_path / "missing-dir" / "store.db")


async def test_sqlite_refuses_use_after_close(tmp_path: Path) -> None:
    kv = await SqliteKV.open(tmp_path / "store.db")
    await kv.close()
    with pytest.raises(StoreUnavailableError, match="closed"):
        await kv.get("k")


# -- etcd only -------------------------------------------------------------------------


@pytest.mark.etcd
async def test_etcd_namespaces_do_not_see_each_other(etcd_server: str) -> None:
    endpoints = parse_endpoints(etcd_server)
    one = await EtcdKV.connect(endpoints, namespace=f"/ns-{uuid.uuid4().hex}/")
    two = await EtcdKV.connect(endpoints, namespace=f"/ns-{uuid.uuid4().hex}")
    try:
        await put(one, "k", b"one")
        assert await two.get("k") is None
        assert await two.range("") == []
        assert (await two.txn([Compare.absent("k")], [Put("k", b"two")])).succeeded
        got = await one.get("k")
        assert got is not None and got.value == b"one"
    finally:
        await one.close()
        await two.close()


@pytest.mark.etcd
async def test_etcd_not_listening_is_unavailable_with_an_actionable_message() -> None:
    port = free_port()
    with pytest.raises(StoreUnavailableError) as caught:
        await asyncio.wait_for(
            EtcdKV.connect([("127.0.0.1", port)], timeout=2.0), timeout=15.0
        )
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "check that etcd is running" in message


@pytest.mark.etcd
async def test_etcd_tries_endpoints_in_order(etcd_server: str) -> None:
    dead = ("127.0.0.1", free_port())
    live = parse_endpoints(etcd_server)[0]
    kv = await asyncio.wait_for(
        EtcdKV.connect([dead, live], namespace=f"/ns-{uuid.uuid4().hex}/", timeout=2.0), 15.0
    )
    try:
        await put(kv, "k", b"v")
        got = await kv.get("k")
        assert got is not None and got.value == b"v"
    finally:
        await kv.close()


def test_etcd_url_parsing() -> None:
    assert parse_endpoints("etcd://a:1,b.example:2379") == [("a", 1), ("b.example", 2379)]
    for bad in ["etcd://", "etcd://host", "etcd://host:port", "etcd://h:0", "http://h:1"]:
        with pytest.raises(StoreError):
            parse_endpoints(bad)


@pytest.mark.etcd
async def test_etcd_lost_mid_run_is_unavailable_for_calls_and_watches() -> None:
    with running_etcd() as etcd:
        kv = await EtcdKV.connect(parse_endpoints(etcd.url), timeout=2.0)
        try:
            await put(kv, "k", b"v")
            watch = kv.watch("", await kv.current_revision())
            pending = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.1)  # let the watch stream open
            etcd.stop()
            with pytest.raises(StoreUnavailableError):
                await asyncio.wait_for(pending, WAIT)
            with pytest.raises(StoreUnavailableError, match="check"):
                await asyncio.wait_for(kv.get("k"), WAIT)
        finally:
            await kv.close()
