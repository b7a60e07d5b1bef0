"""One agent identity, one place: noticing a copied agent key (transport-free).

An agent identity is a key on one node. A thief who copies it can renew it to a key only
the thief holds, after which the real agent is locked out. So when the control plane sees
one agent identity in two places at once it refuses the second, audits it
(`agent.suspected_clone`, with both addresses and the serials) and marks the node record
`suspected-clone`, for an operator to ban the agent or clear the mark
(`trustmesh agent clear`). "Two places" is either of:

- **a superseded SVID in use elsewhere**: a call or open sync stream presents an SVID of
  this attestation that a renewal replaced, from another address than the one that
  renewed it (the thief renewed; the real agent, still on the old SVID, shows up; or the
  other way round). The renewing address is kept in the node record, so every replica
  judges alike.
- **a second address while the agent is live**: any call (a second sync stream, a
  RenewAgent, a signing request) from another address than the agent's open sync stream
  on this replica. The check is made again where the stream registers, with no await in
  between, so two streams opening at once cannot both pass.

What must not flag: a restart or reconnect from the same address (one machine, one
address); a RenewAgent retried after its answer was lost (the previous SVID, within
RENEWAL_GRACE of the renewal, from the renewing address: admitted); a failover between
replicas (the renewing address travels in the shared record; live streams are per replica
and an agent holds one at a time).

Limits, by construction: addresses are what the server sees, so agents behind one NAT look
like one machine, and a copy used from that same machine or NAT is not told apart from the
agent (its superseded SVID is refused, but nothing is flagged). Two copies streaming to two
replicas at once are noticed when one of them renews. An agent that moves to a new address
while the server still holds its old, silently dead stream is flagged too, and so is one
whose connections leave from changing (temporary IPv6) addresses: give agent hosts a stable
address towards the control plane, or clear the mark.

`judge` is the pure rule; `CloneGuard` applies it to the call layer's agents, holds where
each agent's streams come from, and writes marks and audit events from its own task (so the
refusal never waits on the store, and a flood of refused calls makes one event per pair of
addresses, not one per call).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from trustmesh.backoff import backoff_ceiling
from trustmesh.controlplane.store.records import AttestedNode, NodeStatus, SupersededSvid
from trustmesh.errors import ConflictError, NotFoundError, PermissionDeniedError, StoreError
from trustmesh.logs import log_event
from trustmesh.metrics import Registry

log = logging.getLogger("trustmesh.clones")

# How long the SVID a renewal replaced keeps working, from the renewing address only: long
# enough for a RenewAgent retried after a lost answer, and for calls already on their way.
RENEWAL_GRACE = 300.0
# At most this many superseded-but-valid SVIDs per agent: renewing more often than that
# within one SVID lifetime is refused, so nobody can renew a copied key's traces away.
MAX_SUPERSEDED = 16
QUEUE_SIZE = 1024  # suspicions waiting to be recorded; more are counted and dropped
MAX_REPORTS_PER_AGENT = 8  # audited address pairs per agent until an operator clears the mark
FLAG_RETRIES = 5


class PresentedSvid(Protocol):
    """The agent SVID a caller presented, and the address it came from."""

    @property
    def id(self) -> str: ...

    @property
    def serial(self) -> str: ...

    @property
    def host(self) -> str: ...


@dataclass(frozen=True)
class Suspicion:
    """One agent identity seen in two places: where it already was, and the caller refused."""

    agent: str
    reason: str  # "superseded_svid" or "second_address"
    first_address: str
    second_address: str
    presented_serial: str
    current_serial: str

    def describe(self) -> str:
        if self.reason == "superseded_svid":
            return (f"superseded agent SVID {self.presented_serial} used from {self.second_address} after the "
                    f"identity renewed from {self.first_address} to {self.current_serial}")
        return f"used from {self.second_address} while connected from {self.first_address}"

    def refusal(self) -> str:
        return (f"agent {self.agent} is in use elsewhere: {self.describe()}; this looks like a copied agent key, "
                "so the second is refused and the node is marked suspected-clone (an operator bans the agent "
                "or runs `trustmesh agent clear`)")


class SuspectedCloneError(PermissionDeniedError):
    def __init__(self, suspicion: Suspicion) -> None:
        super().__init__(suspicion.refusal())
        self.suspicion = suspicion


def superseded_refusal(agent: str, serial: str) -> PermissionDeniedError:
    return PermissionDeniedError(f"agent {agent} presented a superseded SVID (serial {serial}); use the renewed one, "
                                 "or attest again")


def judge(node: AttestedNode, peer: PresentedSvid, live: Collection[str], now: float,
          grace: float = RENEWAL_GRACE) -> None:
    """Admit `peer` as the agent of `node`, or raise: SuspectedCloneError when the identity is
    in use elsewhere, PermissionDeniedError for an SVID that is merely out of date.

    `live` holds the addresses of the agent's open sync streams (on this replica)."""
    if peer.serial != node.cert_serial:
        old = next((s for s in node.superseded if s.serial == peer.serial), None)
        if old is None:
            raise superseded_refusal(peer.id, peer.serial)  # of an earlier attestation, or expired
        if node.renewed_from and peer.host and peer.host != node.renewed_from:
            raise SuspectedCloneError(Suspicion(peer.id, "superseded_svid", node.renewed_from, peer.host,
                                                peer.serial, node.cert_serial))
        if old.serial != node.superseded[0].serial or now > node.renewed_at + grace:
            raise superseded_refusal(peer.id, peer.serial)
        # The previous SVID, right after the renewal, from the renewing address: a retry of a
        # renewal whose answer was lost, or a call already under way when it renewed.
    others = sorted(h for h in live if h != peer.host)
    if others and peer.host:
        raise SuspectedCloneError(Suspicion(peer.id, "second_address", others[0], peer.host, peer.serial,
                                            node.cert_serial))


def judge_stream(node: AttestedNode, peer: PresentedSvid) -> None:
    """An open stream after its node record changed: its SVID superseded by a renewal from
    another address means another holder of the key renewed it (possibly on another replica)."""
    if (peer.serial != node.cert_serial and node.renewed_from and peer.host and peer.host != node.renewed_from
            and any(s.serial == peer.serial for s in node.superseded)):
        raise SuspectedCloneError(Suspicion(peer.id, "superseded_svid", node.renewed_from, peer.host, peer.serial,
                                            node.cert_serial))


def next_superseded(node: AttestedNode, now: float) -> tuple[SupersededSvid, ...]:
    """What `node.superseded` becomes when its current SVID is replaced now: the current one
    first, then those still valid. Raises when the agent renewed too often to keep track."""
    kept = tuple(s for s in node.superseded if s.not_after > now)
    if len(kept) >= MAX_SUPERSEDED:
        raise PermissionDeniedError(
            f"agent {node.spiffe_id} renewed {len(kept) + 1} times within one SVID lifetime; renew at half-life, "
            "or ask an operator to evict the agent and attest it again")
    current = (SupersededSvid(node.cert_serial, node.cert_not_after),) if node.cert_not_after > now else ()
    return current + kept


# --- the guard ----------------------------------------------------------------------------


class NodeRecords(Protocol):
    """What the guard needs of the registry view."""

    def node_for(self, agent: str) -> AttestedNode: ...

    def authenticate_stream(self, peer: Any, opened: AttestedNode) -> None: ...

    async def node_written(self, node: AttestedNode) -> None: ...


class NodeStore(Protocol):
    async def get_attested_node(self, spiffe_id: str) -> AttestedNode: ...

    async def update_attested_node(self, node: AttestedNode, *,
                                   expected_revision: int | None = None) -> AttestedNode: ...


class AuditRecorder(Protocol):
    async def record(self, kind: str, *, actor: str, subject: str = "", outcome: str = "ok",
                     **details: Any) -> object: ...


class CloneGuard:
    """The call layer's agent authenticator: the node record (via the view), then `judge`."""

    def __init__(self, view: NodeRecords, store: NodeStore, audit: AuditRecorder, metrics: Registry,
                 clock: Callable[[], float] = time.time, *, grace: float = RENEWAL_GRACE) -> None:
        self._view = view
        self._store = store
        self._audit = audit
        self._clock = clock
        self._grace = grace
        self._live: dict[str, Counter[str]] = {}  # agent -> address -> open sync streams
        self._queue: asyncio.Queue[Suspicion] = asyncio.Queue(QUEUE_SIZE)
        self._reported: dict[str, set[tuple[str, str, str]]] = {}
        self._refused = metrics.counter("trustmesh_agent_clone_refusals_total",
                                        "calls refused because their agent identity is in use elsewhere",
                                        ["reason"])
        self._unrecorded = metrics.counter("trustmesh_agent_clone_reports_dropped_total",
                                           "suspected clones not written to the audit log (queue full, or "
                                           "already reported for that pair of addresses)")

    # --- checks (synchronous: the refusal never waits) ------------------------------------

    def authenticate(self, peer: PresentedSvid) -> AttestedNode:
        """The caller's node record; refuses evicted, banned, superseded and cloned identities."""
        node = self._view.node_for(peer.id)
        self._judged(lambda: judge(node, peer, self._live.get(peer.id, ()), self._clock(), self._grace))
        return node

    def recheck_stream(self, peer: PresentedSvid, opened: AttestedNode) -> None:
        """An open sync stream after a change of its agent's record."""
        self._view.authenticate_stream(peer, opened)
        node = self._view.node_for(peer.id)
        self._judged(lambda: judge_stream(node, peer))

    @contextmanager
    def streaming(self, peer: PresentedSvid) -> Iterator[None]:
        """Hold the stream's address as where the agent is, until the block ends."""
        node = self._view.node_for(peer.id)
        # Judged again here: between the call layer's check and now another stream may have
        # registered, and nothing awaits between this check and the registration below.
        self._judged(lambda: judge(node, peer, self._live.get(peer.id, ()), self._clock(), self._grace))
        hosts = self._live.setdefault(peer.id, Counter())
        hosts[peer.host] += 1
        try:
            yield
        finally:
            hosts[peer.host] -= 1
            if hosts[peer.host] <= 0:
                del hosts[peer.host]
            if not hosts and self._live.get(peer.id) is hosts:
                del self._live[peer.id]

    def check_reattestation(self, agent: str, host: str) -> None:
        """x509pop re-attestation replaces the agent's SVID like a renewal: not from a second
        address while the agent is connected from another."""
        others = sorted(h for h in self._live.get(agent, ()) if h != host)
        if others and host:
            node = self._view.node_for(agent)
            self._judged(lambda: judge(node, _Presented(agent, node.cert_serial, host), others, self._clock()))

    def live_addresses(self, agent: str) -> frozenset[str]:
        return frozenset(self._live.get(agent, ()))

    def _judged(self, check: Callable[[], None]) -> None:
        try:
            check()
        except SuspectedCloneError as err:
            self._refused.inc(reason=err.suspicion.reason)
            try:
                self._queue.put_nowait(err.suspicion)
            except asyncio.QueueFull:
                self._unrecorded.inc()
            raise

    # --- marks and audit (the guard's own task) --------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Record suspicions as they come, until `stop` is set."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                getting = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    return
                await self.record(getting.result())
        finally:
            stopping.cancel()

    async def record(self, suspicion: Suspicion) -> None:
        """Mark the node suspected-clone (once) and audit this pair of addresses (once until
        an operator clears the mark)."""
        for attempt in range(FLAG_RETRIES):
            try:
                await self._record_once(suspicion)
                return
            except ConflictError:
                continue  # the record changed meanwhile (a renewal): judge it as it is now
            except NotFoundError:
                return  # evicted meanwhile: nothing left to mark
            except StoreError as err:
                log_event(log, "suspected_clone_unrecorded", level=logging.WARNING, agent=suspicion.agent,
                          error=str(err), attempt=attempt)
                await asyncio.sleep(backoff_ceiling(attempt, base=0.2, cap=5.0))
        log_event(log, "suspected_clone_unrecorded", level=logging.ERROR, agent=suspicion.agent,
                  first_address=suspicion.first_address, second_address=suspicion.second_address,
                  hint="the store kept failing; the refusal stands, but the node is not marked")

    async def _record_once(self, s: Suspicion) -> None:
        node = await self._store.get_attested_node(s.agent)
        reported = self._reported.setdefault(s.agent, set())
        if node.status is NodeStatus.ACTIVE:
            reported.clear()  # cleared by an operator since: report afresh
        pair = (s.reason, s.first_address, s.second_address)
        if pair in reported or len(reported) >= MAX_REPORTS_PER_AGENT:
            self._unrecorded.inc()
            return
        marked = node.status is not NodeStatus.SUSPECTED_CLONE
        if marked:
            now = self._clock()
            updated = await self._store.update_attested_node(
                replace(node, status=NodeStatus.SUSPECTED_CLONE, status_reason=s.describe(), status_at=now,
                        updated_at=now),
                expected_revision=node.revision or None)
            await self._view.node_written(updated)
        reported.add(pair)
        await self._audit.record("agent.suspected_clone", actor=s.agent, subject=s.agent, outcome="denied",
                                 reason=s.reason, first_address=s.first_address, second_address=s.second_address,
                                 presented_serial=s.presented_serial, current_serial=s.current_serial,
                                 marked=marked)
        log_event(log, "agent_suspected_clone", level=logging.WARNING, agent=s.agent, reason=s.reason,
                  first_address=s.first_address, second_address=s.second_address,
                  presented_serial=s.presented_serial, current_serial=s.current_serial,
                  hint=f"ban it (`trustmesh agent ban {node.node_name}`) or, once the node is checked, "
                       f"`trustmesh agent clear {node.node_name}`")


@dataclass(frozen=True)
class _Presented:
    id: str
    serial: str
    host: str
