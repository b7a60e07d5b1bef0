"""Leader election on the real store (SQLite, and etcd leases): one leader, clean handover."""

from __future__ import annotations

import asyncio

from trustmesh.controlplane.leader import LeaderElection
from trustmesh.controlplane.store import Store
from trustmesh.metrics import Registry


async def _until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


async def test_one_leader_runs_the_duty_and_hands_over_when_it_stops(store: Store) -> None:
    running: list[str] = []

    def duty(name: str):  # type: ignore[no-untyped-def]
        async def work() -> None:
            running.append(name)
            try:
                await asyncio.Event().wait()
            finally:
                running.remove(name)
        return work

    stops = {name: asyncio.Event() for name in ("a", "b", "c")}
    elections = {name: LeaderElection(store, name, Registry(), ttl=2, retry=0.1) for name in stops}
    tasks = {name: asyncio.create_task(e.run(stops[name], duty(name))) for name, e in elections.items()}
    try:
        assert await _until(lambda: len(running) == 1)
        await asyncio.sleep(1.0)  # several renewals: still exactly one
        assert len(running) == 1
        leader = running[0]
        assert [n for n, e in elections.items() if e.is_leader] == [leader]
        assert await store.get_leader("duties") == leader
        # The leader stops: it gives the lease back, so another takes over at once.
        stops[leader].set()
        await asyncio.wait_for(tasks[leader], 5)
        assert await _until(lambda: len(running) == 1 and running[0] != leader, timeout=5)
        assert not elections[leader].is_leader
    finally:
        for stop in stops.values():
            stop.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert running == []


async def test_a_failing_duty_ends_leadership_and_is_retried(store: Store) -> None:
    attempts: list[int] = []

    async def broken() -> None:
        attempts.append(1)
        raise RuntimeError("boom")

    stop = asyncio.Event()
    election = LeaderElection(store, "solo", Registry(), ttl=2, retry=0.1)
    task = asyncio.create_task(election.run(stop, broken))
    try:
        # Each failure steps down; the lease then lapses and the replica leads and tries again.
        assert await _until(lambda: len(attempts) >= 2, timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
