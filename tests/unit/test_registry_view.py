"""The registry view over a real SQLite store: what it publishes to its subscribers for each
kind of change, how it authenticates agents from its node records, how sync streams are
woken, and the CA subscriber that server.py wires (reload + bundle.pem)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509

from trustmesh.controlplane.ca.authority import CAConfig, CertificateAuthority
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.registry_view import (
    AgentsChanged,
    AllAgentsChanged,
    CAJournalChanged,
    RegistryEvent,
    RegistryView,
)
from trustmesh.controlplane.server import republish_ca
from trustmesh.controlplane.store import Store, open_store
from trustmesh.controlplane.store.records import AttestedNode, BundleRecord, PartnerCertificate, RegistrationEntry
from trustmesh.controlplane.sync_service import SyncService
from trustmesh.errors import PermissionDeniedError, UnavailableError
from trustmesh.metrics import Registry
from trustmesh.selectors import Selector
from trustmesh.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
KEK = KeyEncryptionKey(bytes(range(32)))
A = "spiffe://example.org/agent/a"
B = "spiffe://example.org/agent/b"
T0 = 1_800_000_000.0
WAIT = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Presented:
    id: str
    serial: str


def node(agent: str, serial: str = "1", created_at: float = T0, banned: bool = False) -> AttestedNode:
    name = agent.rsplit("/", 1)[1]
    return AttestedNode(
        spiffe_id=SpiffeId.parse(agent),
        node_name=name,
        attestation_type="join_token",
        cert_serial=serial,
        cert_not_after=T0 + 3600,
        banned=banned,
        created_at=created_at,
        updated_at=created_at,
        selectors=(Selector.parse(f"node:name:{name}"),),
    )


def entry(i: int, parent: str) -> RegistrationEntry:
    return RegistrationEntry(
        id=f"e{i}",
        spiffe_id=SpiffeId.parse(f"spiffe://example.org/w{i}"),
        parent_id=SpiffeId.parse(parent),
        selectors=(Selector.parse("unix:uid:1"),),
        x509_ttl=0,
        jwt_ttl=0,
        dns_names=(),
        federates_with=(),
        admin=i == 99,
        created_at=T0,
        updated_at=T0,
    )


POLICY = """apiVersion: trustmesh/v1
kind: Allowlist
metadata: {name: to-w1}
spec:
  destination: spiffe://example.org/w1
  allow:
    - from: spiffe://example.org/w2
"""


class World:
    def __init__(self, store: Store, view: RegistryView, clock: Clock) -> None:
        self.store, self.view, self.clock = store, view, clock
        self.events: asyncio.Queue[RegistryEvent] = asyncio.Queue()

    async def record(self, event: RegistryEvent) -> None:
        await self.events.put(event)

    async def next_event(self) -> RegistryEvent:
        return await asyncio.wait_for(self.events.get(), WAIT)

    async def quiet(self) -> None:
        """No event within a short while."""
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(self.events.get(), 0.3)


@contextlib.asynccontextmanager
async def running(view: RegistryView) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(view.run(stop))
    try:
        await asyncio.wait_for(view.ready.wait(), WAIT)
        yield
    finally:
        stop.set()
        await task


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = await open_store("sqlite", tmp_path)
    clock = Clock()
    view = RegistryView(store, TD, Registry(), clock)
    w = World(store, view, clock)
    view.subscribe(w.record)
    try:
        yield w
    finally:
        await store.close()


async def test_the_load_is_published_to_every_agent_and_nothing_is_answered_before(world: World) -> None:
    await world.store.create_attested_node(node(A))
    with pytest.raises(UnavailableError, match="still loading"):
        world.view.node_for(A)
    async with running(world.view):
        loaded = await world.next_event()
        assert isinstance(loaded, AllAgentsChanged) and loaded.revision == world.view.revision > 0
        assert str(world.view.node_for(A).spiffe_id) == A


async def test_entry_and_node_changes_name_the_agents_they_concern(world: World) -> None:
    await world.store.create_attested_node(node(A))
    async with running(world.view):
        await world.next_event()  # the load
        created = await world.store.create_entry(entry(1, A))
        event = await world.next_event()
        assert event == AgentsChanged(frozenset({A}), created.revision)
        assert world.view.revision == created.revision
        assert world.view.authorized_entry(A, "e1") is not None and world.view.authorized_entry(B, "e1") is None

        await world.store.create_entry(entry(2, B))  # B is not attested: nobody's view changed
        await world.quiet()

        await world.store.create_attested_node(node(B))
        assert await world.next_event() == AgentsChanged(frozenset({B}), world.view.revision)
        assert world.view.authorized_entry(B, "e2") is not None

        await world.store.create_entry(entry(99, B))
        await world.next_event()
        assert world.view.is_admin_entry("e99", "spiffe://example.org/w99")
        assert not world.view.is_admin_entry("e1", "spiffe://example.org/w1")
        assert not world.view.is_admin_entry("e99", "spiffe://example.org/w1")


async def test_bundles_policy_and_revocations_reach_every_agent(world: World) -> None:
    async with running(world.view):
        await world.next_event()
        unusable = BundleRecord(trust_domain=TrustDomain("partner.example"), jwks=b"{}", sequence=1, updated_at=T0)
        await world.store.put_bundle(unusable)
        assert isinstance(await world.next_event(), AllAgentsChanged)
        assert "partner.example" not in world.view.federated_bundles, "an unusable bundle is never used"
        await world.store.delete_bundle("partner.example")
        assert isinstance(await world.next_event(), AllAgentsChanged)
        assert world.view.deleted_bundles == {"partner.example"}

        head = await world.store.append_policy_revision(POLICY, "ops", "first", T0 - 5, expected_head=0)
        event = await world.next_event()
        assert isinstance(event, AllAgentsChanged)
        assert world.view.policy.revision == head.revision == 1
        assert world.view.policy_changed_at == event.revision and world.view.policy_committed_at == T0 - 5

        cert = PartnerCertificate(
            serial="ab12",
            spiffe_id=SpiffeId.parse("spiffe://example.org/partner/x"),
            not_after=T0 + 60,
            issued_at=T0,
            issued_by="ops",
        )
        await world.store.create_partner_certificate(cert)
        await world.quiet()  # a new unrevoked certificate changes nothing any agent enforces
        _, revision = await world.store.get_partner_certificate("ab12")
        await world.store.replace_partner_certificate(replace(cert, revoked_at=T0 + 1), revision)
        assert isinstance(await world.next_event(), AllAgentsChanged)
        assert world.view.revoked_serials == {"ab12"}


async def test_a_moved_ca_journal_is_published_and_awaited_before_agents_are_woken(world: World) -> None:
    async with running(world.view):
        await world.next_event()
        order: list[str] = []

        async def slow_reload(event: RegistryEvent) -> None:
            if isinstance(event, CAJournalChanged):
                await asyncio.sleep(0.05)
                order.append("reloaded")
            else:
                order.append(type(event).__name__)

        world.view.subscribe(slow_reload)
        version = await world.store.save_ca_state(b"opaque", 0)
        assert version == 1
        assert isinstance(await world.next_event(), CAJournalChanged)
        assert isinstance(await world.next_event(), AllAgentsChanged)
        assert order == ["reloaded", "AllAgentsChanged"]


async def test_authentication_follows_renewals_bans_and_evictions(world: World) -> None:
    """The node record an agent is judged by (which SVID, from where: test_clones.py)."""
    await world.store.create_attested_node(node(A, serial="1"))
    async with running(world.view):
        await world.next_event()
        opened = world.view.node_for(A)
        current = world.view.index.nodes[A]

        renewed = await world.store.update_attested_node(
            replace(current, cert_serial="2"), expected_revision=current.revision
        )
        await world.view.node_written(renewed)  # our own write applies at once, before the feed
        assert world.events.get_nowait() == AgentsChanged(frozenset({A}), world.view.revision)
        assert world.view.node_for(A).cert_serial == "2"
        world.view.authenticate_stream(Presented(A, "1"), opened)  # a renewal does not end a stream

        await world.next_event()  # the feed confirms the renewal
        banned = await world.store.update_attested_node(
            replace(renewed, banned=True), expected_revision=renewed.revision
        )
        await world.next_event()
        with pytest.raises(PermissionDeniedError, match="banned"):
            world.view.node_for(A)
        with pytest.raises(PermissionDeniedError, match="banned"):
            world.view.authenticate_stream(Presented(A, "2"), opened)

        await world.store.delete_attested_node(banned.spiffe_id)
        assert await world.next_event() == AgentsChanged(frozenset({A}), world.view.revision)
        with pytest.raises(PermissionDeniedError, match="was evicted"):
            world.view.node_for(A)
        with pytest.raises(PermissionDeniedError, match="not attested"):
            world.view.node_for(B)

        await world.store.create_attested_node(node(A, serial="9", created_at=T0 + 500))
        await world.next_event()
        assert world.view.node_for(A).cert_serial == "9"
        with pytest.raises(PermissionDeniedError, match="attested again"):
            world.view.authenticate_stream(Presented(A, "9"), opened)


async def test_sync_streams_wake_only_for_their_own_agent(world: World) -> None:
    await world.store.create_attested_node(node(A))
    await world.store.create_attested_node(node(B))
    own = Registry()
    sync = SyncService(world.view, lambda: pytest.fail("no bundle is needed here"), own, world.clock)
    world.view.subscribe(sync.on_registry_event)
    async with running(world.view):
        await world.next_event()
        with (
            sync.open(Presented(A, "1"), world.view.index.nodes[A], T0 + 3600) as a,
            sync.open(Presented(B, "1"), world.view.index.nodes[B], T0 + 3600) as b,
        ):
            assert own.gauge("trustmesh_sync_streams", "").value() == 2
            await world.store.create_entry(entry(1, A))
            await world.next_event()
            assert a.wake.is_set() and not b.wake.is_set()
            a.wake.clear()
            await world.store.put_bundle(
                BundleRecord(trust_domain=TrustDomain("partner.example"), jwks=b"{}", sequence=1, updated_at=T0)
            )
            await world.next_event()
            assert a.wake.is_set() and b.wake.is_set()
        assert own.gauge("trustmesh_sync_streams", "").value() == 0


async def test_the_ca_subscriber_reloads_the_ca_and_rewrites_bundle_pem(world: World, tmp_path: Path) -> None:
    def when() -> datetime:
        return datetime.fromtimestamp(world.clock.now, timezone.utc)

    ours = await CertificateAuthority.load_or_create(
        CAConfig(trust_domain=TD, replica_id="r1"), world.store, KEK, clock=when
    )
    other = await CertificateAuthority.load_or_create(
        CAConfig(trust_domain=TD, replica_id="r2"), world.store, KEK, clock=when
    )
    pem = tmp_path / "bundle.pem"
    world.view.subscribe(republish_ca(ours, pem))
    async with running(world.view):
        await world.next_event()
        prepared = await other.prepare_root()  # another replica starts a root rotation
        assert isinstance(await world.next_event(), CAJournalChanged)
        await world.next_event()
        roots = x509.load_pem_x509_certificates(pem.read_bytes())
        assert len(roots) == 2 and len(ours.x509_authorities()) == 2
        assert prepared.id in {r.id for r in ours.journal.roots}
