"""The open sync streams: each wakes when the registry view says its agent's view changed.

`SyncService` subscribes to the registry view and keeps one wake-up per open stream, indexed
by agent, so a change for one agent wakes that agent's streams only. A `SyncStream` reads
the view and lets `sync_delta` compute what to send; the Node servicer only relays it.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

from trustmesh._proto.trustmesh.v1 import node_pb2, types_pb2
from trustmesh.bundle import Bundle
from trustmesh.controlplane import sync_delta
from trustmesh.controlplane.clones import PresentedSvid
from trustmesh.controlplane.registry_view import (
    AgentsChanged,
    AllAgentsChanged,
    CAJournalChanged,
    RegistryEvent,
    RegistryView,
)
from trustmesh.controlplane.store.records import AttestedNode
from trustmesh.errors import UnavailableError
from trustmesh.metrics import Registry
from trustmesh.wire import bundle_to_pb

SYNC_KEEPALIVE = 300.0  # an idle sync stream gets an empty delta this often (finds dead peers)
OWN_BUNDLE_SECONDS = 1.0  # how long the wire form of our bundle is reused across streams


class StreamGuard(Protocol):
    """Who may hold a stream (clones.py's CloneGuard): one agent identity streams from one place."""

    def streaming(self, peer: PresentedSvid) -> AbstractContextManager[None]:
        """Refuse a stream from a second address; hold this one's address while it is open."""
        ...

    def recheck_stream(self, peer: PresentedSvid, opened: AttestedNode) -> None:
        """Raise when the stream's agent may no longer stream (banned, evicted, cloned)."""
        ...


class _ViewGuard:
    """The guard when none is given (tests of the stream alone): the view's own checks."""

    def __init__(self, view: RegistryView) -> None:
        self._view = view

    def streaming(self, peer: PresentedSvid) -> AbstractContextManager[None]:
        return nullcontext()

    def recheck_stream(self, peer: PresentedSvid, opened: AttestedNode) -> None:
        self._view.authenticate_stream(peer, opened)


class SyncStream:
    """One agent's open sync stream: wait for a change, re-check the agent, send the delta."""

    def __init__(self, service: SyncService, peer: PresentedSvid, node: AttestedNode, not_after: float,
                 http_routes: bool = True, time_windows: bool = True) -> None:
        self._service = service
        self._http_routes = http_routes  # the agent enforces route rules (it said so: SyncRequest.features)
        self._time_windows = time_windows  # ... and rules' time windows
        self._view = service.view
        self.peer = peer
        self._opened = node
        self._not_after = not_after  # the agent SVID's expiry: the stream must not outlive it
        self.wake = asyncio.Event()
        self._sent: sync_delta.Sent | None = None
        # The policy revision this stream last counted in the convergence histogram: a quarantine
        # or a grant re-sends the same revision recomposed, which is no new revision converging.
        self._converged = -1

    @property
    def policy_revision(self) -> int:
        """The policy revision last delivered on this stream: the one its agent enforces."""
        return self._converged

    def start(self, since: int, bundle_sequences: Mapping[str, int]) -> list[node_pb2.SyncResponse]:
        """The first messages: a delta when the agent can resume from `since`, else a snapshot."""
        view = self._view
        state = self._service.state_for(self.peer.id, self._http_routes, self._time_windows)
        changed = view.changed_since(self.peer.id, since) if 0 < since <= state.revision else None
        begun = sync_delta.start(state, since=since, changed=changed,
                                 known_trust_domains=set(view.federated_bundles) | view.deleted_bundles,
                                 bundle_sequences=bundle_sequences, policy_changed_at=view.policy_changed_at)
        self._service.starts.inc(kind="resume" if begun.resumed else "snapshot")
        self._sent = begun.sent
        self._converged = view.policy.revision  # what the first messages carry; not counted
        return begun.messages

    async def next(self) -> list[node_pb2.SyncResponse]:
        """Wait for a change (or the keepalive), then the delta since what was sent: maybe none.

        Raises UNAVAILABLE once the agent SVID the stream was opened with expires (the agent
        reconnects with its renewed one), and PERMISSION_DENIED once the agent is banned,
        evicted or attested again.
        """
        assert self._sent is not None, "start() the stream first"
        left = self._not_after - self._service.clock()
        if left <= 0:
            raise UnavailableError(f"the agent SVID this sync stream was opened with expired; "
                                   f"reconnect with the renewed one ({self.peer.id})")
        try:
            await asyncio.wait_for(self.wake.wait(), timeout=min(SYNC_KEEPALIVE, left))
            keepalive = False
        except asyncio.TimeoutError:
            keepalive = True
        self.wake.clear()
        self._service.guard.recheck_stream(self.peer, self._opened)
        state = self._service.state_for(self.peer.id, self._http_routes, self._time_windows)
        messages, self._sent = sync_delta.next_delta(state, self._sent, keepalive=keepalive)
        for message in messages:
            revision = sync_delta.delivered_policy_revision(message)
            if revision is not None and revision != self._converged:
                self._converged = revision
                self._service.observe_convergence(message)
        return messages


class SyncService:
    def __init__(self, view: RegistryView, own_bundle: Callable[[], Bundle], metrics: Registry,
                 clock: Callable[[], float] = time.time, guard: StreamGuard | None = None) -> None:
        self.view = view
        self.guard = guard or _ViewGuard(view)
        self.trust_bundle = own_bundle  # our trust domain's bundle as it is now
        self.clock = clock
        self._streams: dict[str, set[SyncStream]] = defaultdict(set)
        self._gauge = metrics.gauge("trustmesh_sync_streams", "open agent sync streams")
        self.starts = metrics.counter("trustmesh_sync_starts_total", "sync streams opened, by how they began",
                                      ["kind"])
        self._own: types_pb2.Bundle | None = None
        self._own_until = 0.0
        self._convergence = metrics.histogram(
            "trustmesh_policy_convergence_seconds", "from a policy revision's commit to its delivery to each agent")

    def _own_bundle(self) -> types_pb2.Bundle:
        """Our bundle in its wire form, built once per wake-up of the fleet rather than once per
        agent: it changes with the CA journal (whose event empties this) and, as old roots and
        keys expire, with time (hence the short lifetime)."""
        now = self.clock()
        if self._own is None or now >= self._own_until:
            self._own, self._own_until = bundle_to_pb(self.trust_bundle()), now + OWN_BUNDLE_SECONDS
        return self._own

    def state_for(self, agent: str, http_routes: bool = True, time_windows: bool = True) -> sync_delta.AgentState:
        view = self.view
        return sync_delta.agent_state(view.authorized_for(agent), own_bundle=self._own_bundle(),
                                      federated=view.federated_bundles, policy=view.policy,
                                      revoked_serials=view.revoked_serials, revision=view.revision,
                                      http_routes=http_routes, time_windows=time_windows)

    @contextmanager
    def open(self, peer: PresentedSvid, node: AttestedNode, not_after: float, *,
             http_routes: bool = True, time_windows: bool = True) -> Iterator[SyncStream]:
        """A stream for an authenticated agent, woken by the view until the block ends."""
        with self.guard.streaming(peer):
            stream = SyncStream(self, peer, node, not_after, http_routes, time_windows)
            self._streams[peer.id].add(stream)
            self._gauge.inc()
            try:
                yield stream
            finally:
                self._closed(peer, stream)

    def _closed(self, peer: PresentedSvid, stream: SyncStream) -> None:
        self._gauge.dec()
        streams = self._streams.get(peer.id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._streams[peer.id]

    def delivered_revisions(self) -> dict[str, int]:
        """Each agent with an open stream on this replica, and the policy revision last delivered
        to it (the newest of its streams: a reconnect briefly overlaps the stream it replaces)."""
        return {agent: max(s.policy_revision for s in streams) for agent, streams in self._streams.items() if streams}

    async def on_registry_event(self, event: RegistryEvent) -> None:
        """The view's subscriber: wake the streams of the agents whose view changed."""
        match event:
            case AgentsChanged(agents=agents):
                self._wake(agents)
            case AllAgentsChanged():
                self._wake(list(self._streams))
            case CAJournalChanged():
                # The CA has reloaded; the batch's AllAgentsChanged follows and pushes its bundle.
                self._own = None

    def _wake(self, agents: Iterable[str]) -> None:
        for agent in agents:
            for stream in self._streams.get(agent, ()):
                stream.wake.set()

    def observe_convergence(self, message: node_pb2.SyncResponse) -> None:
        """Time from a policy revision's commit to its delivery on an agent's stream, as the
        `trustmesh_policy_convergence_seconds` histogram (the fleet's propagation, live)."""
        view = self.view
        if sync_delta.delivered_policy_revision(message) == view.policy.revision and view.policy_committed_at:
            self._convergence.observe(max(0.0, self.clock() - view.policy_committed_at))
