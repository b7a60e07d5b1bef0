"""Leader election among server replicas, on a store lease.

Work that must happen once per trust domain (root rotation, pruning expired join tokens
and dead node records) runs only on the replica that holds the leader key. The key is
created in a transaction that succeeds only when it is absent, and it is attached to a
lease the leader keeps alive; when the leader dies, etcd drops the key once the lease
expires (`ttl` seconds) and the next replica to try creates it. A leader that cannot renew
its lease for `ttl` seconds stops its duties before anyone else can have taken over, so
two replicas never run them at the same time for longer than the clock skew of a renewal.

On the embedded SQLite store there is one server process, which always wins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from trustmesh.controlplane.store import Store
from trustmesh.errors import StoreError, StoreUnavailableError
from trustmesh.logs import log_event
from trustmesh.metrics import Registry

log = logging.getLogger("trustmesh.leader")

DEFAULT_TTL = 5
RETRY_SECONDS = 1.0


class LeaderElection:
    def __init__(self, store: Store, holder: str, metrics: Registry, *, name: str = "duties",
                 ttl: int = DEFAULT_TTL, retry: float = RETRY_SECONDS) -> None:
        if ttl < 2:
            raise ValueError("the leader lease must last at least 2 seconds")
        self._store = store
        self._holder = holder
        self._name = name
        self._ttl = ttl
        self._retry = retry
        self._leader = False
        self._gauge = metrics.gauge("trustmesh_leader", "1 while this replica holds the leader lease")
        self._elections = metrics.counter("trustmesh_leader_elections_total", "times this replica became leader")

    @property
    def is_leader(self) -> bool:
        return self._leader

    async def current_leader(self) -> str | None:
        return await self._store.get_leader(self._name)

    async def run(self, stop: asyncio.Event, duty: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Campaign until `stop`; while leader, run `duty` (cancelled when leadership ends)."""
        while not stop.is_set():
            try:
                lease = await self._acquire()
                if lease is not None:
                    await self._lead(lease, duty, stop)
            except StoreUnavailableError as err:
                log_event(log, "leader_campaign_unavailable", level=logging.WARNING, error=str(err))
            if not stop.is_set():
                await _sleep_or_stop(stop, self._retry)

    async def _acquire(self) -> int | None:
        if await self._store.get_leader(self._name) is not None:
            return None  # someone leads; look again after `retry`
        lease = await self._store.lease_grant(self._ttl)
        if await self._store.try_become_leader(self._name, self._holder, lease):
            return lease
        await self._store.lease_revoke(lease)  # lost the race
        return None

    async def _lead(self, lease: int, duty: Callable[[], Coroutine[Any, Any, None]], stop: asyncio.Event) -> None:
        self._leader = True
        self._gauge.set(1)
        self._elections.inc()
        log_event(log, "leader_elected", holder=self._holder, ttl=self._ttl)
        work = asyncio.create_task(duty(), name="leader-duty")
        reason = "stopping"
        try:
            reason = await self._keep(lease, stop, work)
        finally:
            self._leader = False
            self._gauge.set(0)
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            log_event(log, "leader_stepped_down", level=logging.WARNING if reason != "stopping" else logging.INFO,
                      holder=self._holder, reason=reason)
            if reason in ("stopping", "duty ended"):
                # Hand over at once instead of making the others wait for the lease to expire.
                try:
                    await self._store.lease_revoke(lease)
                except StoreError:
                    pass

    async def _keep(self, lease: int, stop: asyncio.Event, work: asyncio.Task[None]) -> str:
        """Keep the lease alive; return why leadership ended."""
        renewed = time.monotonic()
        while True:
            tick = asyncio.ensure_future(_sleep_or_stop(stop, self._ttl / 3))
            await asyncio.wait({work, tick}, return_when=asyncio.FIRST_COMPLETED)
            tick.cancel()
            if stop.is_set():
                return "stopping"
            if work.done():
                error = work.exception()
                if error is not None:
                    log_event(log, "leader_duty_failed", level=logging.ERROR, error=repr(error))
                return "duty ended"
            try:
                if await self._store.lease_keepalive(lease) <= 0:
                    return "lease expired"
                renewed = time.monotonic()
            except StoreUnavailableError as err:
                # etcd expires the lease `ttl` after the last renewal it saw; stop before that
                # so another replica never runs the duties while this one still does.
                if time.monotonic() - renewed > self._ttl * 2 / 3:
                    return f"store unreachable ({err})"


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


__all__ = ["LeaderElection"]
