"""The SVID cache: local keys, batched CSRs, rotation at half-life with jitter.

It implements `agent.identity.IdentitySource` for the Workload API. Keys are generated on
this node and kept only in memory; only CSRs leave. Entries come from the sync stream; every
change that can alter a Workload API answer bumps `version`, which wakes open streams at once.
During an outage it keeps serving what it has until each SVID expires; at expiry the SVID
is withdrawn (a version bump), so open streams never keep offering a dead certificate.
JWT-SVIDs are cached per (entry, audiences) for half their life, and served from the cache
during an outage while they are valid.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Protocol

import grpc
from cryptography import x509

from trustmesh._proto.trustmesh.v1 import node_pb2
from trustmesh.agent.config import DEFAULT_ROTATION, RotationConfig
from trustmesh.agent.convert import AgentEntry
from trustmesh.agent.identity import NoIdentityError, WorkloadJwtSvid, WorkloadX509Svid
from trustmesh.backoff import backoff_delay, renew_at, seconds_until
from trustmesh.bundle import BundleSet
from trustmesh.clock import Clock, utc_now
from trustmesh.errors import TrustmeshError
from trustmesh.keys import PrivateKey, generate_private_key
from trustmesh.logs import log_event
from trustmesh.metrics import Registry
from trustmesh.selectors import matches
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import X509Svid, build_csr

log = logging.getLogger("trustmesh.svid_cache")

MAX_BATCH = 500
MAX_JWT_CACHE = 4096  # (entry, audiences) pairs; workloads choose audiences, so it is bounded
REFUSED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class IdentityUnavailableError(TrustmeshError):
    """The server could not be asked for an SVID just now and none is cached (retry later)."""


class Signer(Protocol):
    """What the cache needs of the control plane (NodeClient; a fake in unit tests)."""

    async def batch_sign(self, items: list[tuple[str, bytes]]) -> list[node_pb2.X509SignResult]: ...
    async def sign_jwt(self, entry_id: str, audiences: list[str]) -> node_pb2.SignJWTResponse: ...


@dataclass(frozen=True)
class _Cached:
    entry: AgentEntry
    svid: X509Svid
    renew_at: datetime


def _shape(entry: AgentEntry) -> tuple[object, ...]:
    """What an issued SVID depends on."""
    return (entry.spiffe_id, entry.dns_names, entry.x509_ttl)


class SvidCache:
    def __init__(self, trust_domain: TrustDomain, signer: Signer, metrics: Registry,
                 clock: Clock = utc_now, rand: random.Random | None = None, *,
                 rotation: RotationConfig = DEFAULT_ROTATION) -> None:
        self._td = trust_domain
        self._rotation = rotation
        self._signer = signer
        self._clock = clock
        self._rand = rand or random.Random()
        self._entries: dict[str, AgentEntry] = {}
        self._svids: dict[str, _Cached] = {}
        self._bundles = BundleSet()
        # (entry id, sorted audiences) -> (token, expires at, refresh at); insertion-ordered
        # so the oldest are dropped first when the cap is reached.
        self._jwt: dict[tuple[str, tuple[str, ...]], tuple[str, datetime, datetime]] = {}
        self._version = 0
        self._retry_after: dict[str, datetime] = {}  # refused entries wait before asking again
        self._changed = asyncio.Event()
        self._work = asyncio.Event()
        self._synced = asyncio.Event()
        self._issued = metrics.counter("trustmesh_agent_svids_issued_total", "X509-SVIDs received from the server")
        self._failures = metrics.counter("trustmesh_agent_svid_failures_total", "failed SVID requests", ["reason"])
        self._cached = metrics.gauge("trustmesh_agent_svids_cached", "X509-SVIDs held by the agent")

    # --- IdentitySource -----------------------------------------------------------------

    @property
    def trust_domain(self) -> TrustDomain:
        return self._td

    @property
    def version(self) -> int:
        return self._version

    def _bump(self) -> None:
        self._version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        self._cached.set(len(self._svids))

    async def wait_for_change(self, after_version: int) -> int:
        while self._version <= after_version:
            await self._changed.wait()
        return self._version

    async def wait_until_synced(self) -> None:
        await self._synced.wait()

    def _matching(self, selectors: Collection[str]) -> list[AgentEntry]:
        return [e for e in self._entries.values() if matches(e.selectors, selectors)]

    def entries_match(self, selectors: Collection[str]) -> bool:
        return bool(self._matching(selectors))

    def spiffe_ids_for(self, selectors: Collection[str]) -> frozenset[str]:
        """The SPIFFE IDs of every entry these selectors match, whether or not an SVID is ready."""
        return frozenset(str(e.spiffe_id) for e in self._matching(selectors))

    def x509_svids_for(self, selectors: Collection[str]) -> list[WorkloadX509Svid]:
        now = self._clock()
        out = []
        for entry in sorted(self._matching(selectors), key=lambda e: (e.spiffe_id, e.id)):
            cached = self._svids.get(entry.id)
            if cached is not None and cached.svid.expires_at > now:
                out.append(WorkloadX509Svid(entry.id, cached.svid,
                                            tuple(TrustDomain(t) for t in entry.federates_with)))
        return out

    def bundles(self) -> BundleSet:
        return self._bundles

    def svid_for(self, spiffe_id: SpiffeId) -> X509Svid | None:
        """The current SVID for a SPIFFE ID this node holds (for the agent's own listeners)."""
        now = self._clock()
        for cached in self._svids.values():
            if cached.svid.spiffe_id == spiffe_id and cached.svid.expires_at > now:
                return cached.svid
        return None

    async def jwt_svids_for(self, selectors: Collection[str], audiences: Sequence[str],
                            spiffe_id: str | None = None) -> list[WorkloadJwtSvid]:
        entries = self._matching(selectors)
        if spiffe_id is not None:
            entries = [e for e in entries if e.spiffe_id == spiffe_id]
        if not entries:
            raise NoIdentityError("no identity issued")
        out = []
        for entry in sorted(entries, key=lambda e: (e.spiffe_id, e.id)):
            token = await self._jwt_for(entry, audiences)
            out.append(WorkloadJwtSvid(entry.spiffe_id, token))
        return out

    async def _jwt_for(self, entry: AgentEntry, audiences: Sequence[str]) -> str:
        key = (entry.id, tuple(sorted(set(audiences))))
        now = self._clock()
        hit = self._jwt.get(key)
        if hit is not None and hit[2] > now:
            return hit[0]
        try:
            reply = await self._signer.sign_jwt(entry.id, list(audiences))
        except grpc.aio.AioRpcError as err:
            self._failures.inc(reason=f"jwt_{err.code().name.lower()}")
            if hit is not None and hit[1] > self._clock() and err.code() not in REFUSED:
                # Outage: the token we hold is still valid, so it is still the right answer.
                return hit[0]
            log_event(log, "jwt_svid_failed", level=logging.WARNING, entry_id=entry.id, code=err.code().name,
                      detail=err.details())
            raise IdentityUnavailableError(f"cannot obtain a JWT-SVID for {entry.spiffe_id} now "
                                           f"({err.code().name}); try again") from err
        expires = datetime.fromtimestamp(reply.expires_at, timezone.utc)
        now = self._clock()
        refresh = now + (expires - now) / 2  # reuse a token for half of its life
        self._jwt.pop(key, None)
        self._jwt[key] = (reply.token, expires, refresh)
        self._prune_jwt(now)
        return reply.token

    def _prune_jwt(self, now: datetime) -> None:
        if len(self._jwt) <= MAX_JWT_CACHE:
            return
        self._jwt = {k: v for k, v in self._jwt.items() if v[1] > now}
        while len(self._jwt) > MAX_JWT_CACHE:
            del self._jwt[next(iter(self._jwt))]

    # --- fed by the sync stream --------------------------------------------------------

    def set_entries(self, entries: dict[str, AgentEntry]) -> None:
        removed = set(self._entries) - set(entries)
        changed = {i for i, e in entries.items() if self._entries.get(i) != e}
        self._entries = dict(entries)
        self._synced.set()
        for entry_id in removed | changed:
            cached = self._svids.get(entry_id)
            if cached is None:
                continue
            if entry_id in removed or cached.entry.spiffe_id != entries[entry_id].spiffe_id:
                self._svids.pop(entry_id, None)  # that identity is withdrawn at once
            elif _shape(cached.entry) != _shape(entries[entry_id]):
                # Same ID, new TTL or DNS names: renew now, serving the current SVID meanwhile.
                self._svids[entry_id] = replace(cached, renew_at=self._clock())
        self._jwt = {k: v for k, v in self._jwt.items() if k[0] in entries}
        self._retry_after = {k: v for k, v in self._retry_after.items() if k in entries}
        if removed or changed:
            self._bump()
            self._work.set()

    def retry_refused(self) -> None:
        """Ask again now for the SVIDs the server refused (a quarantine was released: waiting
        out item_retry would keep a released workload without an identity for no reason)."""
        if self._retry_after:
            self._retry_after.clear()
            self._work.set()

    def set_bundles(self, bundles: BundleSet) -> None:
        if bundles != self._bundles:
            self._bundles = bundles
            self._bump()

    # --- rotation -------------------------------------------------------------------------

    def _due(self, now: datetime) -> list[AgentEntry]:
        return [e for i, e in self._entries.items()
                if (i not in self._svids or self._svids[i].renew_at <= now)
                and self._retry_after.get(i, now) <= now]

    def next_deadline(self) -> datetime | None:
        """The next time something is due: a renewal (not before its retry time, if the
        server refused it), or an expiry to withdraw."""
        times = []
        for entry_id in self._entries:
            cached = self._svids.get(entry_id)
            retry = self._retry_after.get(entry_id)
            if cached is not None:
                times.append(max(cached.renew_at, retry) if retry is not None else cached.renew_at)
                times.append(cached.svid.expires_at)
            elif retry is not None:
                times.append(retry)
        return min(times) if times else None

    def next_expiry(self) -> datetime | None:
        times = [c.svid.expires_at for c in self._svids.values()]
        return min(times) if times else None

    def expire(self) -> int:
        """Withdraw SVIDs that have expired (the server was out of reach for too long)."""
        now = self._clock()
        gone = [i for i, c in self._svids.items() if c.svid.expires_at <= now]
        for entry_id in gone:
            cached = self._svids.pop(entry_id)
            log_event(log, "svid_expired", level=logging.WARNING, entry_id=entry_id,
                      spiffe_id=cached.svid.spiffe_id, expired_at=cached.svid.expires_at.isoformat())
        if gone:
            self._failures.inc(len(gone), reason="expired")
            self._bump()
        return len(gone)

    async def refresh_once(self) -> int:
        """Issue or renew every due SVID in batches; return how many were received."""
        due = self._due(self._clock())[:MAX_BATCH]
        if not due:
            return 0

        def make() -> list[tuple[AgentEntry, PrivateKey, bytes]]:
            out = []
            for entry in due:
                key = generate_private_key()
                out.append((entry, key, build_csr(key, SpiffeId.parse(entry.spiffe_id))))
            return out

        prepared = await asyncio.to_thread(make)
        results = await self._signer.batch_sign([(e.id, csr) for e, _, csr in prepared])
        by_id = {r.entry_id: r for r in results}
        received = 0
        for entry, key, _ in prepared:
            result = by_id.get(entry.id)
            if result is None or result.WhichOneof("outcome") != "svid":
                reason = result.error.message if result is not None else "no result"
                self._failures.inc(reason="refused")
                self._retry_after[entry.id] = self._clock() + timedelta(seconds=self._rotation.item_retry)
                log_event(log, "svid_refused", level=logging.WARNING, entry_id=entry.id, reason=reason)
                continue
            if entry.id not in self._entries:
                continue  # deleted while we were signing
            chain = tuple(x509.load_der_x509_certificate(d) for d in result.svid.cert_chain)
            svid = X509Svid(SpiffeId.parse(result.svid.spiffe_id), chain, key)
            # Measure the lifetime from when we received it: the CA back-dates NotBefore for
            # clock skew, which would otherwise pull the renewal time into the past.
            start = max(chain[0].not_valid_before_utc, min(self._clock(), chain[0].not_valid_after_utc))
            when = renew_at(start, chain[0].not_valid_after_utc, rand=self._rand,
                            low=self._rotation.renew_low, high=self._rotation.renew_high)
            self._svids[entry.id] = _Cached(entry, svid, when)
            self._retry_after.pop(entry.id, None)
            received += 1
        if received:
            self._issued.inc(received)
            log_event(log, "svids_updated", count=received)
            self._bump()
        return received

    async def run(self) -> None:
        attempt = 0
        while True:
            self.expire()
            delay: float | None = None
            try:
                await self.refresh_once()
                attempt = 0
            except grpc.aio.AioRpcError as err:
                self._failures.inc(reason=err.code().name.lower())
                if err.code() in REFUSED:
                    # Banned or evicted: sync says so in its logs; ask again only rarely.
                    log_event(log, "svid_request_refused", level=logging.ERROR, code=err.code().name,
                              detail=err.details())
                    delay = self._rotation.refused_retry
                else:
                    log_event(log, "svid_request_failed", level=logging.WARNING, code=err.code().name,
                              detail=err.details(), attempt=attempt)
                    delay = backoff_delay(attempt, base=self._rotation.backoff_base,
                                          cap=min(10.0, self._rotation.backoff_cap), rand=self._rand)
                    attempt += 1
            if delay is not None:
                # Never sleep past an expiry: withdrawing a dead SVID must not wait for the server.
                expiry = self.next_expiry()
                if expiry is not None:
                    delay = min(delay, seconds_until(expiry, self._clock()) + 0.01)
            else:
                deadline = self.next_deadline()
                delay = seconds_until(deadline, self._clock()) if deadline else 3600.0
                if self._due(self._clock()):
                    delay = 0.0
            self._work.clear()
            try:
                await asyncio.wait_for(self._work.wait(), timeout=max(delay, 0.01))
            except asyncio.TimeoutError:
                pass


