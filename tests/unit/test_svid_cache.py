"""The SVID cache against a fake signer (a fake of the server; the integration tests run the
real one) and an injected clock: batching, rotation timing, entry changes, outages, JWT."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh._proto.trustmesh.v1 import node_pb2
from trustmesh.agent.config import RotationConfig
from trustmesh.agent.convert import AgentEntry
from trustmesh.agent.identity import IdentitySource, NoIdentityError
from trustmesh.agent.svid_cache import MAX_JWT_CACHE, IdentityUnavailableError, SvidCache
from trustmesh.keys import generate_private_key
from trustmesh.metrics import Registry
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_ca_certificate, build_leaf_certificate

TD = TrustDomain("example.org")
T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeSigner:
    """Signs like the server would, from a local CA, at the fake clock's time."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.key = generate_private_key()
        self.root = build_ca_certificate(trust_domain=TD, public_key=self.key.public_key(), issuer=None,
                                         issuer_key=self.key, not_before=T0 - timedelta(days=1),
                                         not_after=T0 + timedelta(days=30), path_length=1, common_name="root")
        self.batches: list[list[str]] = []
        self.refuse: set[str] = set()
        self.down: grpc.StatusCode | None = None
        self.ttl = timedelta(minutes=10)
        self.jwt_calls = 0
        self.csr_keys: dict[str, object] = {}

    async def batch_sign(self, items: list[tuple[str, bytes]]) -> list[node_pb2.X509SignResult]:
        if self.down is not None:
            raise rpc_error(self.down, "server is down")
        self.batches.append([e for e, _ in items])
        out = []
        for entry_id, csr_der in items:
            if entry_id in self.refuse:
                out.append(node_pb2.X509SignResult(entry_id=entry_id, error=node_pb2.ItemError(
                    code=5, message="entry not found")))
                continue
            csr = x509.load_der_x509_csr(csr_der)
            self.csr_keys[entry_id] = csr.public_key()
            sid = SpiffeId.parse(f"spiffe://example.org/{entry_id}")
            leaf = build_leaf_certificate(spiffe_id=sid, public_key=csr.public_key(), issuer=self.root,  # type: ignore[arg-type]
                                          issuer_key=self.key, not_before=self.clock.now,
                                          not_after=self.clock.now + self.ttl)
            out.append(node_pb2.X509SignResult(entry_id=entry_id, svid=node_pb2.X509Svid(
                spiffe_id=str(sid), cert_chain=[leaf.public_bytes(serialization.Encoding.DER)])))
        return out

    async def sign_jwt(self, entry_id: str, audiences: list[str]) -> node_pb2.SignJWTResponse:
        if self.down is not None:
            raise rpc_error(self.down, "server is down")
        self.jwt_calls += 1
        expires = self.clock.now + timedelta(minutes=5)
        return node_pb2.SignJWTResponse(token=f"jwt-{entry_id}-{'+'.join(audiences)}-{self.jwt_calls}",
                                        expires_at=int(expires.timestamp()))


def entry(name: str, uid: int = 1000, **kw: object) -> AgentEntry:
    fields: dict[str, object] = dict(id=name, spiffe_id=f"spiffe://example.org/{name}", selectors=(f"unix:uid:{uid}",),
                                     x509_ttl=0, jwt_ttl=0, dns_names=(), federates_with=(), revision=1)
    fields.update(kw)
    return AgentEntry(**fields)  # type: ignore[arg-type]


def make(rotation: RotationConfig | None = None) -> tuple[SvidCache, FakeSigner, Clock]:
    clock = Clock()
    signer = FakeSigner(clock)
    cache = SvidCache(TD, signer, Registry(), clock=clock, rand=random.Random(5),
                      rotation=rotation or RotationConfig(renew_low=0.5, renew_high=0.6))
    return cache, signer, clock


def ids(cache: SvidCache, *selectors: str) -> list[str]:
    return [str(s.svid.spiffe_id) for s in cache.x509_svids_for(selectors or ("unix:uid:1000",))]


def test_it_is_an_identity_source() -> None:
    cache, _, _ = make()
    source: IdentitySource = cache  # mypy checks the protocol; this checks it at runtime too
    for name in ("trust_domain", "version", "wait_for_change", "wait_until_synced", "entries_match",
                 "x509_svids_for", "bundles", "jwt_svids_for"):
        assert hasattr(source, name)


async def test_all_due_entries_go_in_one_batch_and_keys_stay_here() -> None:
    cache, signer, _ = make()
    cache.set_entries({n: entry(n) for n in ("a", "b", "c")})
    assert await cache.refresh_once() == 3
    assert signer.batches == [["a", "b", "c"]], "one RPC for every entry that needs an SVID"
    for svid in cache.x509_svids_for(["unix:uid:1000"]):
        assert svid.svid.private_key is not None
        assert svid.svid.private_key.public_key() == signer.csr_keys[svid.entry_id], "only the CSR left the node"


async def test_rotation_happens_inside_the_jitter_window_and_not_before() -> None:
    cache, signer, clock = make()
    cache.set_entries({"a": entry("a")})
    await cache.refresh_once()
    first = cache.x509_svids_for(["unix:uid:1000"])[0].svid
    deadline = cache.next_deadline()
    assert deadline is not None
    assert T0 + timedelta(minutes=5) <= deadline <= T0 + timedelta(minutes=6), "renew in [0.5, 0.6] of 10 min"
    clock.now = deadline - timedelta(seconds=1)
    assert await cache.refresh_once() == 0 and len(signer.batches) == 1
    clock.now = deadline
    version = cache.version
    assert await cache.refresh_once() == 1
    second = cache.x509_svids_for(["unix:uid:1000"])[0].svid
    assert second.leaf.serial_number != first.leaf.serial_number
    assert second.private_key is not None and first.private_key is not None
    assert second.private_key.public_key() != first.private_key.public_key(), "a fresh key on each rotation"
    assert cache.version > version, "open streams are woken for the new SVID"


async def test_entries_renew_at_different_times() -> None:
    cache, _, _ = make()
    cache.set_entries({f"e{i}": entry(f"e{i}") for i in range(30)})
    await cache.refresh_once()
    assert len({c.renew_at for c in cache._svids.values()}) > 25  # noqa: SLF001 (jitter is the point)


async def test_new_entry_wakes_waiters_and_is_issued_promptly_by_run() -> None:
    cache, signer, _ = make()
    runner = asyncio.create_task(cache.run())
    try:
        cache.set_entries({"a": entry("a")})
        await asyncio.wait_for(cache.wait_until_synced(), 1)
        version = cache.version
        while not ids(cache):
            version = await asyncio.wait_for(cache.wait_for_change(version), 2)
        cache.set_entries({"a": entry("a"), "b": entry("b")})
        while len(ids(cache)) < 2:
            version = await asyncio.wait_for(cache.wait_for_change(version), 2)
        assert signer.batches == [["a"], ["b"]]
    finally:
        runner.cancel()


async def test_a_deleted_entry_is_withdrawn_at_once_and_a_changed_id_too() -> None:
    cache, _, _ = make()
    cache.set_entries({"a": entry("a"), "b": entry("b")})
    await cache.refresh_once()
    version = cache.version
    cache.set_entries({"a": entry("a")})
    assert cache.version > version and ids(cache) == ["spiffe://example.org/a"]
    cache.set_entries({"a": entry("a", spiffe_id="spiffe://example.org/renamed", revision=2)})
    assert ids(cache) == [], "the old identity is not served under the new entry"


async def test_a_new_ttl_renews_now_but_keeps_serving_meanwhile() -> None:
    cache, signer, _ = make()
    cache.set_entries({"a": entry("a")})
    await cache.refresh_once()
    cache.set_entries({"a": entry("a", x509_ttl=60, revision=2)})
    assert ids(cache) == ["spiffe://example.org/a"], "no gap while the new one is signed"
    assert await cache.refresh_once() == 1 and len(signer.batches) == 2


async def test_selectors_must_all_match() -> None:
    cache, _, _ = make()
    cache.set_entries({"a": entry("a", selectors=("unix:uid:1000", "unix:gid:50")), "b": entry("b")})
    await cache.refresh_once()
    assert ids(cache, "unix:uid:1000") == ["spiffe://example.org/b"]
    assert ids(cache, "unix:uid:1000", "unix:gid:50") == ["spiffe://example.org/a", "spiffe://example.org/b"]
    assert not cache.entries_match(["unix:gid:50"])


async def test_outage_serves_until_expiry_then_withdraws_and_wakes() -> None:
    cache, signer, clock = make()
    cache.set_entries({"a": entry("a")})
    await cache.refresh_once()
    signer.down = grpc.StatusCode.UNAVAILABLE
    clock.advance(minutes=7)  # past renewal, before expiry
    with pytest.raises(grpc.aio.AioRpcError):
        await cache.refresh_once()
    assert ids(cache) == ["spiffe://example.org/a"], "a valid SVID is still served during the outage"
    assert cache.expire() == 0
    expiry = cache.next_expiry()
    assert expiry == T0 + timedelta(minutes=10)
    clock.now = expiry
    assert ids(cache) == [], "an expired SVID is never handed out"
    version = cache.version
    assert cache.expire() == 1 and cache.version > version, "open streams learn it is gone"
    signer.down = None
    assert await cache.refresh_once() == 1 and ids(cache) == ["spiffe://example.org/a"], "catches up"


class RealClock(Clock):
    @property
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    @now.setter
    def now(self, _value: datetime) -> None:
        pass


async def test_run_withdraws_at_expiry_even_while_the_server_is_down() -> None:
    clock = RealClock()  # run() sleeps in real time
    signer = FakeSigner(clock)
    signer.ttl = timedelta(seconds=1)
    cache = SvidCache(TD, signer, Registry(), clock=clock,
                      rotation=RotationConfig(renew_low=0.5, renew_high=0.6, backoff_base=5, backoff_cap=10))
    cache.set_entries({"a": entry("a")})
    await cache.refresh_once()
    signer.down = grpc.StatusCode.UNAVAILABLE
    runner = asyncio.create_task(cache.run())
    try:
        version = cache.version
        async with asyncio.timeout(3):  # far shorter than the backoff: the expiry wakes it
            while cache.next_expiry() is not None:
                version = await cache.wait_for_change(version)
        assert ids(cache) == []
    finally:
        runner.cancel()


async def test_refused_items_are_retried_later_not_hammered() -> None:
    cache, signer, clock = make(RotationConfig(item_retry=30))
    signer.refuse = {"b"}
    cache.set_entries({"a": entry("a"), "b": entry("b")})
    assert await cache.refresh_once() == 1
    assert await cache.refresh_once() == 0 and len(signer.batches) == 1
    deadline = cache.next_deadline()
    assert deadline == T0 + timedelta(seconds=30)
    clock.advance(seconds=30)
    signer.refuse = set()
    assert await cache.refresh_once() == 1 and signer.batches[-1] == ["b"]


async def test_refused_items_are_asked_again_at_once_after_a_release() -> None:
    cache, signer, _clock = make(RotationConfig(item_retry=30))
    signer.refuse = {"b"}  # b is in quarantine
    cache.set_entries({"a": entry("a"), "b": entry("b")})
    assert await cache.refresh_once() == 1
    signer.refuse = set()  # released: the agent hears of it in its next policy
    assert await cache.refresh_once() == 0, "without a release it waits out item_retry"
    cache.retry_refused()
    assert await cache.refresh_once() == 1 and signer.batches[-1] == ["b"]


async def test_a_refused_renewal_does_not_spin() -> None:
    cache, signer, clock = make(RotationConfig(renew_low=0.5, renew_high=0.6, item_retry=30))
    cache.set_entries({"a": entry("a")})
    await cache.refresh_once()
    clock.advance(minutes=7)
    signer.refuse = {"a"}
    assert await cache.refresh_once() == 0
    deadline = cache.next_deadline()
    assert deadline is not None and deadline > clock.now, "the next wake-up is the retry, not the past renewal"


async def test_jwt_cached_per_audiences_for_half_life_and_kept_through_outages() -> None:
    cache, signer, clock = make()
    cache.set_entries({"a": entry("a")})
    one = await cache.jwt_svids_for(["unix:uid:1000"], ["x", "y"])
    again = await cache.jwt_svids_for(["unix:uid:1000"], ["y", "x"])
    assert one[0].token == again[0].token and signer.jwt_calls == 1
    other = await cache.jwt_svids_for(["unix:uid:1000"], ["z"])
    assert other[0].token != one[0].token and signer.jwt_calls == 2
    clock.advance(minutes=3)  # past half of 5 min
    signer.down = grpc.StatusCode.UNAVAILABLE
    during = await cache.jwt_svids_for(["unix:uid:1000"], ["x", "y"])
    assert during[0].token == one[0].token, "still valid, so still served during an outage"
    clock.advance(minutes=3)  # now expired
    with pytest.raises(IdentityUnavailableError):
        await cache.jwt_svids_for(["unix:uid:1000"], ["x", "y"])
    signer.down = None
    fresh = await cache.jwt_svids_for(["unix:uid:1000"], ["x", "y"])
    assert fresh[0].token != one[0].token
    with pytest.raises(NoIdentityError):
        await cache.jwt_svids_for(["unix:uid:2000"], ["x"])
    with pytest.raises(NoIdentityError):
        await cache.jwt_svids_for(["unix:uid:1000"], ["x"], spiffe_id="spiffe://example.org/other")


async def test_jwt_cache_is_bounded() -> None:
    cache, _, _ = make()
    cache.set_entries({"a": entry("a")})
    for i in range(MAX_JWT_CACHE + 50):
        await cache.jwt_svids_for(["unix:uid:1000"], [f"aud-{i}"])
    assert len(cache._jwt) <= MAX_JWT_CACHE  # noqa: SLF001


async def test_a_deleted_entry_loses_its_jwts() -> None:
    cache, signer, _ = make()
    cache.set_entries({"a": entry("a")})
    await cache.jwt_svids_for(["unix:uid:1000"], ["x"])
    cache.set_entries({})
    cache.set_entries({"a": entry("a", revision=2)})
    await cache.jwt_svids_for(["unix:uid:1000"], ["x"])
    assert signer.jwt_calls == 2
