"""The registry view: the in-memory registry every API of this replica reads.

It loads the registry once, then follows the store's change feed forever (it is its only
reader), and owns what the feed keeps current: the authorized-entry index with the attested
nodes (whose records carry each agent's superseded SVIDs), the evictions it remembers, the
federated bundles, the partner-certificate revocations and the policy in force: the applied
revision plus one allowlist per just-in-time grant that is active (access.py), and the SPIFFE
IDs in quarantine (quarantine.py). Answering a call from it costs no store read, so an idle
fleet causes none.

After every applied batch it publishes one typed event to its subscribers: which agents'
view changed (`AgentsChanged`), or that every agent's did (`AllAgentsChanged`). A moved CA
journal is published first as `CAJournalChanged` and awaited, so that the subscriber that
reloads the CA has done so before the agents are woken to receive the new bundle.

Agent authentication is a read of the view too: a ban or eviction takes effect for the next
call (and ends the agent's sync stream at its next wake-up) on every replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from trustmesh.backoff import backoff_ceiling
from trustmesh.bundle import Bundle
from trustmesh.controlplane.access import grant_allowlists
from trustmesh.controlplane.authorized import AuthorizedIndex
from trustmesh.controlplane.policy_store import PolicyService
from trustmesh.controlplane.store import CompactedError, Store
from trustmesh.controlplane.store.records import (
    AccessChanged,
    AccessGrant,
    AttestedNode,
    BundleChanged,
    BundleRecord,
    CaChanged,
    Change,
    EntryChanged,
    NodeChanged,
    PartnerChanged,
    PolicyChanged,
    PolicyRevision,
    Quarantine,
    QuarantineChanged,
    RecordFormatError,
    RegistrationEntry,
)
from trustmesh.controlplane.store.store import quarantine_key
from trustmesh.errors import (
    BundleError,
    InvalidSpiffeIdError,
    PermissionDeniedError,
    StoreError,
    StoreUnavailableError,
    UnavailableError,
)
from trustmesh.logs import log_event
from trustmesh.metrics import Registry
from trustmesh.naming import server_id
from trustmesh.policy import Policy
from trustmesh.spiffeid import TrustDomain

log = logging.getLogger("trustmesh.registry")

MAX_REMEMBERED_EVICTIONS = 10_000
FEED_RETRY_MAX = 5.0


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentsChanged:
    """What these agents are authorized for (entries, node record) may have changed."""

    agents: frozenset[str]
    revision: int


@dataclass(frozen=True)
class AllAgentsChanged:
    """Something every agent receives changed (bundles, policy, revocations), or the
    registry was (re)loaded."""

    revision: int


@dataclass(frozen=True)
class CAJournalChanged:
    """Another replica (or our own rotation) moved the CA journal."""

    revision: int


RegistryEvent = AgentsChanged | AllAgentsChanged | CAJournalChanged
RegistrySubscriber = Callable[[RegistryEvent], Awaitable[None]]


class PresentedSvid(Protocol):
    """The agent SVID a caller presented: its agent ID and certificate serial (hex)."""

    @property
    def id(self) -> str: ...

    @property
    def serial(self) -> str: ...


# --- the view -----------------------------------------------------------------------------


class RegistryView:
    def __init__(self, store: Store, trust_domain: TrustDomain, metrics: Registry,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._td = trust_domain
        self._metrics = metrics
        self._clock = clock
        self._subscribers: list[RegistrySubscriber] = []
        self.index = AuthorizedIndex(server_id(trust_domain))
        self.ready = asyncio.Event()  # set once the registry is loaded: nothing is answered before
        self.revision = 0  # every change up to this store revision is in the view
        self.policy = Policy()  # what agents enforce: the applied revision plus the active grants
        self._applied = Policy()  # the policy revision in force, as applied
        self._grants: dict[str, AccessGrant] = {}  # just-in-time access requests, by id
        self._quarantines: dict[str, Quarantine] = {}  # by store key (the sha256 of the target)
        self._quarantined: frozenset[str] = frozenset()  # their targets: what every agent refuses
        self._quarantined_gauge = metrics.gauge("trustmesh_quarantined",
                                                "SPIFFE IDs in quarantine (identities, and nodes' agent IDs)")
        self.policy_changed_at = 0  # the store revision at which the policy in force arrived
        self.policy_committed_at = 0.0  # when the policy in force was applied (its record's time)
        self._federated: dict[str, Bundle] = {}  # trust domain -> its stored bundle
        self._gone_bundles: set[str] = set()  # trust domains whose stored bundle was deleted
        self._revoked: frozenset[str] = frozenset()  # serials of revoked partner certificates
        self._partner_revocations: dict[str, bool] = {}  # serial -> revoked, for every partner certificate
        self._evicted: OrderedDict[str, None] = OrderedDict()

    def subscribe(self, subscriber: RegistrySubscriber) -> None:
        self._subscribers.append(subscriber)

    async def _publish(self, event: RegistryEvent) -> None:
        for subscriber in self._subscribers:
            await subscriber(event)

    # --- reads --------------------------------------------------------------------------

    @property
    def trust_domain(self) -> TrustDomain:
        return self._td

    @property
    def federated_bundles(self) -> Mapping[str, Bundle]:
        """The usable stored bundle of every federated trust domain."""
        return self._federated

    @property
    def deleted_bundles(self) -> frozenset[str]:
        """Trust domains whose stored bundle was deleted since the server started."""
        return frozenset(self._gone_bundles)

    @property
    def revoked_serials(self) -> frozenset[str]:
        """Serials of the revoked partner certificates: every agent enforces them."""
        return self._revoked

    def quarantines(self) -> list[Quarantine]:
        """Every quarantine in force, oldest first."""
        return sorted(self._quarantines.values(), key=lambda q: (q.created_at, q.target))

    def is_quarantined(self, spiffe_id: str) -> bool:
        """True when this SPIFFE ID (a workload's, or an agent's: its node) is in quarantine."""
        return spiffe_id in self._quarantined

    def authorized_for(self, agent: str) -> list[RegistrationEntry]:
        """The entries this agent may use (its own and its node aliases'), by id."""
        return self.index.authorized_for(agent)

    def attested_nodes(self) -> list[AttestedNode]:
        """Every attested node's record (for the detectors: which node is at which address)."""
        return list(self.index.nodes.values())

    def changed_since(self, agent: str, revision: int) -> set[str] | None:
        """Ids of this agent's entries that changed after `revision`; None when the view
        cannot tell (the agent needs a snapshot)."""
        return self.index.changed_since(agent, revision)

    def authorized_entry(self, agent: str, entry_id: str) -> RegistrationEntry | None:
        """The entry when it exists and this agent may use it; else None (the same answer
        for unknown and foreign entries)."""
        entry = self.index.entries.get(entry_id)
        if entry is None or not self.index.is_authorized(agent, entry_id):
            return None
        return entry

    def is_admin_entry(self, entry_id: str, spiffe_id: str) -> bool:
        """True when entry `entry_id` exists now, is marked admin, and is for `spiffe_id`: the
        remote admin listener's check of an SVID that names the admin entry it came from."""
        entry = self.index.entries.get(entry_id)
        return entry is not None and entry.admin and str(entry.spiffe_id) == spiffe_id

    # --- agent authentication -----------------------------------------------------------

    def node_for(self, agent: str) -> AttestedNode:
        """The agent's node record, if it may act as that agent at all: refuses evicted, banned
        and unknown agents. Which SVID it presents, from where, is clones.py's question."""
        return self._current_node(agent)

    def authenticate_stream(self, peer: PresentedSvid, opened: AttestedNode) -> None:
        """Re-check an open stream after a change: the same attestation, not banned.

        A renewal does not end the stream (the agent renewed, it was not revoked); an
        eviction does, and so does a new attestation of the same name after one.
        """
        node = self._current_node(peer.id)
        if node.created_at != opened.created_at:
            raise PermissionDeniedError(f"agent {peer.id} was attested again since this stream opened; "
                                        "reconnect with the new agent SVID")

    def _current_node(self, agent: str) -> AttestedNode:
        if not self.ready.is_set():
            raise UnavailableError("the server is still loading its registry; retry in a moment")
        node = self.index.nodes.get(agent)
        if node is None:
            name = agent.rsplit("/", 1)[-1]
            if agent in self._evicted:
                raise PermissionDeniedError(f"agent {agent} was evicted; re-attest with a new join token "
                                            f"(`trustmesh token create --node {name}`)")
            raise PermissionDeniedError(f"agent {agent} is not attested; attest with a join token "
                                        f"(`trustmesh token create --node {name}`) or x509pop")
        if node.banned:
            raise PermissionDeniedError(f"agent {agent} is banned")
        return node

    # --- changes ------------------------------------------------------------------------

    async def node_written(self, node: AttestedNode) -> None:
        """Apply our own node write at once; the change feed will confirm it."""
        if self.ready.is_set():
            agents = self._node_change(str(node.spiffe_id), node, node.revision)
            if agents:
                await self._publish(AgentsChanged(frozenset(agents), self.revision))

    def _node_change(self, agent: str, node: AttestedNode | None, revision: int) -> set[str]:
        old = self.index.nodes.get(agent)
        if old is not None and revision and old.revision > revision:
            return set()  # we already applied a newer write of our own (node_written)
        if node is None:
            self._evicted[agent] = None
            self._evicted.move_to_end(agent)
            while len(self._evicted) > MAX_REMEMBERED_EVICTIONS:
                self._evicted.popitem(last=False)
        else:
            self._evicted.pop(agent, None)
        # Our own writes may come without a revision; the revision we are at is a safe
        # lower bound for where this agent's resumable history starts.
        return self.index.apply_node(agent, node, revision or self.revision)

    def _set_federated(self, trust_domain: str, record: BundleRecord | None) -> None:
        if record is None or trust_domain == self._td.name:
            self._federated.pop(trust_domain, None)
            self._gone_bundles.add(trust_domain)
            return
        try:
            bundle = Bundle.from_jwks(record.jwks, TrustDomain(trust_domain)).with_sequence_number(record.sequence)
        except (BundleError, InvalidSpiffeIdError) as err:
            log_event(log, "federated_bundle_unusable", level=logging.ERROR, trust_domain=trust_domain,
                      error=str(err), hint="store a valid SPIFFE bundle for it again")
            self._federated.pop(trust_domain, None)
            return
        self._federated[trust_domain] = bundle
        self._gone_bundles.discard(trust_domain)

    async def _load(self) -> int:
        store = self._store
        revision = await store.current_revision()
        entries, nodes = await store.list_entries(), await store.list_attested_nodes()
        policy = PolicyService.parse_stored(await store.get_policy_head())
        bundles = await store.list_bundles()
        partners = await store.list_partner_certificates()
        self._grants = {g.id: g for g in await store.list_access_grants()}
        self._quarantines = {quarantine_key(q.target): q for q in await store.list_quarantines()}
        self._count_quarantines()
        self.index.load(entries, nodes, revision)
        self._partner_revocations = {c.serial: c.revoked_at > 0 for c in partners}
        self._revoked = frozenset(serial for serial, revoked in self._partner_revocations.items() if revoked)
        self._applied, self.policy_changed_at = policy, revision
        self._compose_policy()
        self._gone_bundles |= set(self._federated)
        self._federated.clear()
        for record in bundles:
            self._set_federated(record.trust_domain.name, record)
        self.revision = revision
        self.ready.set()
        log_event(log, "registry_loaded", entries=len(self.index.entries), agents=len(self.index.nodes),
                  federated_bundles=len(self._federated), revision=revision)
        return revision

    async def _apply(self, change: Change) -> set[str] | None:
        """Apply one change; return the agents whose view changed (None: all)."""
        match change:
            case EntryChanged(key, entry, revision):
                return self.index.apply_entry(key, entry, revision)
            case NodeChanged(key, node, revision):
                return self._node_change(key, node, revision)
            case BundleChanged(key, bundle):
                self._set_federated(key, bundle)
                return None
            case PolicyChanged(policy=PolicyRevision() as policy, revision=revision) \
                    if policy.revision > self._applied.revision:
                self._applied = PolicyService.parse_stored(policy)
                self._compose_policy()
                self.policy_changed_at = revision
                self.policy_committed_at = policy.created_at
                self._metrics.gauge("trustmesh_policy_revision", "policy revision in force").set(policy.revision)
                return None
            case PartnerChanged(serial, certificate):
                # A revocation reaches every agent at once: it is part of what each enforces.
                if certificate is None:
                    self._partner_revocations.pop(serial, None)
                else:
                    self._partner_revocations[serial] = certificate.revoked_at > 0
                revoked = frozenset(s for s, gone in self._partner_revocations.items() if gone)
                if revoked == self._revoked:
                    return set()
                self._revoked = revoked
                return None
            case AccessChanged(key, grant, revision):
                if grant is None:
                    self._grants.pop(key, None)
                else:
                    self._grants[key] = grant
                before = self.policy
                self._compose_policy()
                if self.policy == before:
                    return set()  # e.g. a request filed or denied: nothing any agent enforces changed
                self.policy_changed_at = revision
                return None
            case QuarantineChanged(key, quarantine, revision):
                if quarantine is None:
                    self._quarantines.pop(key, None)
                else:
                    self._quarantines[key] = quarantine
                if not self._count_quarantines():
                    return set()  # e.g. the same quarantine written again: nothing any agent enforces changed
                self._compose_policy()
                self.policy_changed_at = revision
                # Every agent at once: any of them may hold a connection from or to the target.
                return None
            case CaChanged(revision=revision):
                # The CA subscriber picks up the new roots and keys (and republishes bundle.pem)
                # before the batch ends and every agent is woken to receive the new bundle.
                await self._publish(CAJournalChanged(revision))
                return None
        return set()

    def _compose_policy(self) -> None:
        """The policy agents receive: the applied revision plus the grants active now and the IDs
        in quarantine. A grant lapses by itself on every agent (its rule carries `expires`);
        revocation recomposes."""
        granted = grant_allowlists(list(self._grants.values()), self._clock())
        self.policy = replace(self._applied, allowlists=self._applied.allowlists + granted,
                              quarantined=self._quarantined)

    def _count_quarantines(self) -> bool:
        """Recompute the quarantined IDs from the records; True when they changed."""
        quarantined = frozenset(q.target for q in self._quarantines.values())
        self._quarantined_gauge.set(len(quarantined))
        changed = quarantined != self._quarantined
        self._quarantined = quarantined
        return changed

    async def _follow(self) -> None:
        """Keep the view current from the change feed, forever; resume after outages."""
        connected = self._metrics.gauge("trustmesh_change_feed_connected", "1 while the store's change feed runs")
        revision: int | None = None  # None: (re)load everything first
        failures = 0
        while True:
            try:
                if revision is None:
                    revision = await self._load()
                    await self._publish(AllAgentsChanged(revision))
                connected.set(1)
                async for batch in self._store.watch(revision):
                    wake: set[str] | None = set()
                    for change in batch:
                        agents = await self._apply(change)
                        wake = None if agents is None or wake is None else wake | agents
                        revision = max(revision, change.revision)
                    # Subscribers hear of a batch only once all of it is in, so the revision
                    # streams report to agents covers everything they send.
                    self.revision = revision
                    if wake is None:
                        await self._publish(AllAgentsChanged(revision))
                    elif wake:
                        await self._publish(AgentsChanged(frozenset(wake), revision))
                    if failures:
                        log_event(log, "change_feed_resumed", revision=revision, after_failures=failures)
                        failures = 0
            except CompactedError:
                log_event(log, "change_feed_compacted", level=logging.WARNING, revision=revision)
                revision = None
                continue
            except RecordFormatError as err:
                if revision is None:
                    raise  # the registry itself is unreadable: stop loudly, do not serve a guess
                # A record we cannot read (e.g. an audit event edited by hand): reload what
                # we need and carry on after it, rather than stop serving every agent.
                log_event(log, "change_feed_unreadable_record", level=logging.ERROR, revision=revision,
                          error=str(err))
                revision = None
                continue
            except StoreUnavailableError as err:
                connected.set(0)
                failures += 1
                delay = backoff_ceiling(failures, base=0.1, cap=FEED_RETRY_MAX)
                # Calls keep being answered from the view meanwhile; changes made while the
                # store is unreachable arrive when the watch resumes from `revision`.
                log_event(log, "change_feed_unavailable", level=logging.WARNING, revision=revision,
                          error=str(err), retry_in=f"{delay:.1f}s")
                await asyncio.sleep(delay)
                continue
            connected.set(0)
            raise UnavailableError("the store's change feed ended unexpectedly (store closed?)")

    async def run(self, stop: asyncio.Event) -> None:
        """Load, then follow the change feed until `stop` is set; a lost feed is an error."""
        follow = asyncio.create_task(self._follow(), name="change-feed")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait({follow, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if follow in done:
                follow.result()  # re-raise: the change feed must never end silently
        except StoreError as err:
            raise UnavailableError(f"lost the store's change feed: {err}") from err
        finally:
            for task in (follow, stopper):
                task.cancel()
            await asyncio.gather(follow, stopper, return_exceptions=True)
