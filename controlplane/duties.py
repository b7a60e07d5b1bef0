"""Work that runs once per trust domain, on the elected leader replica only.

Every few seconds the leader: takes the root-rotation step the CA journal says is due
(prepare, activate, retire; see `CAJournal.next_root_step`), fetches the federated bundles
that are due, and forgets expired join tokens, expired partner certificates and agents
whose SVID expired long ago. Each step is one compare-and-swap in the
store, so a leader that loses its lease mid-step leaves nothing half-done, and a step
repeated by the next leader finds nothing left to do.

Deciding what is due costs the store nothing: the leader reads the federation
relationships and the expiry times once when it takes over (`LeaderState`), then keeps
them current from the store's change feed, so an idle trust domain sees no periodic reads
(only the leader's lease keep-alives).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from trustmesh.controlplane.config import MAX_JWT_TTL
from trustmesh.controlplane.federation import refresh_due
from trustmesh.controlplane.flow_store import FlowRollups
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import (
    AttestedNode,
    Change,
    FederationChanged,
    FederationRecord,
    NodeChanged,
    PartnerChanged,
    TokenChanged,
)
from trustmesh.errors import CAError, FailedPreconditionError, StoreError, TrustmeshError
from trustmesh.logs import log_event

log = logging.getLogger("trustmesh.duties")

INTERVAL_SECONDS = 2.0
PRUNE_SECONDS = 60.0
LEADER_ACTOR = "trustmesh-leader"


async def take_root_step(rt: ServerRuntime, step: str, *, actor: str, forced: bool = False) -> str:
    """Run one root-rotation step ('prepare', 'activate' or 'retire'); audited. Returns a
    short description of what changed. `forced`: an admin activated before partners could
    have fetched the root (the audit event says so)."""
    ca = rt.ca
    try:
        # The journal says precisely why a step is out of order; that is the caller's
        # precondition, not a fault of the server.
        if step == "prepare":
            ca.journal.check_can_prepare()
        elif step == "activate" and ca.journal.prepared_root() is None:
            ca.journal.activated(0.0)
    except CAError as err:
        raise FailedPreconditionError(str(err)) from err
    if step == "prepare":
        slot = await ca.prepare_root()
        detail = f"root {slot.id} prepared and published in the bundle"
        await rt.audit.record("ca.root_prepared", actor=actor, subject=slot.id, not_after=slot.not_after)
    elif step == "activate":
        slot = await ca.activate_root()
        detail = f"root {slot.id} active; signing CAs now chain to it"
        await rt.audit.record("ca.root_activated", actor=actor, subject=slot.id, forced=forced)
    elif step == "retire":
        roots, kids = await ca.retire_old(MAX_JWT_TTL)
        if not roots and not kids:
            old = [r.id for r in ca.journal.roots if r.status == "old"]
            if old:
                raise FailedPreconditionError(
                    f"old root {', '.join(old)} cannot be retired yet: a signing CA under it is still valid, so "
                    "SVIDs chaining to it may still be in use; retire after it expires (see `trustmesh ca show`)")
            raise FailedPreconditionError("there is nothing to retire: no old root or JWT key in the journal")
        detail = f"retired roots [{', '.join(roots)}] and JWT keys [{', '.join(kids)}]"
        await rt.audit.record("ca.authorities_retired", actor=actor, subject=",".join(roots),
                              roots=roots, jwt_keys=kids)
    else:
        raise FailedPreconditionError(f"unknown root rotation step {step!r}; use prepare, activate or retire")
    log_event(log, "root_rotation_step", step=step, actor=actor, detail=detail)
    return detail


class LeaderState:
    """The federation relationships and the earliest expiry of what pruning forgets (join
    tokens, agents, partner certificates), read once and then kept from the change feed."""

    def __init__(self, rt: ServerRuntime) -> None:
        self._rt = rt
        self.federations: dict[str, FederationRecord] = {}
        # (kind, key) -> when the record becomes prunable; banned agents never do.
        self._expiries: dict[tuple[str, str], float] = {}
        self.revision = 0

    async def load(self) -> None:
        store = self._rt.store
        revision = await store.current_revision()
        self.federations = {f.trust_domain.name: f for f in await store.list_federations()}
        self._expiries = {("token", t.token_hash): t.expires_at for t in await store.list_join_tokens()}
        self._expiries.update((("partner", c.serial), c.not_after) for c in await store.list_partner_certificates())
        for node in await store.list_attested_nodes():
            self._note_node(str(node.spiffe_id), node)
        self.revision = revision

    def _note_node(self, key: str, node: AttestedNode) -> None:
        if node.banned:
            self._expiries.pop(("node", key), None)
        else:
            self._expiries[("node", key)] = node.cert_not_after + self._rt.config.prune_agents_after.total_seconds()

    def apply(self, change: Change) -> None:
        match change:
            case FederationChanged(key, None):
                self.federations.pop(key, None)
            case FederationChanged(key, federation) if federation is not None:
                self.federations[key] = federation
            case TokenChanged(key, token):
                self._expire(("token", key), None if token is None else token.expires_at)
            case PartnerChanged(key, certificate):
                self._expire(("partner", key), None if certificate is None else certificate.not_after)
            case NodeChanged(key, node):
                if node is None:
                    self._expire(("node", key), None)
                else:
                    self._note_node(key, node)
        self.revision = max(self.revision, change.revision)

    def _expire(self, key: tuple[str, str], at: float | None) -> None:
        if at is None:
            self._expiries.pop(key, None)
        else:
            self._expiries[key] = at

    async def follow(self) -> None:
        """Apply the change feed until cancelled; raises when the feed fails (the caller
        reloads and follows again)."""
        async for batch in self._rt.store.watch(self.revision):
            for change in batch:
                self.apply(change)

    def next_expiry(self) -> float:
        return min(self._expiries.values(), default=float("inf"))


async def run_once(rt: ServerRuntime, *, prune: bool = True, state: LeaderState | None = None) -> None:
    """One round of duties; with `state`, the federations are taken from it (no store read)."""
    now = rt.clock()
    step = rt.ca.journal.next_root_step(now, MAX_JWT_TTL.total_seconds())
    if step is not None:
        await take_root_step(rt, step, actor=LEADER_ACTOR)
    await refresh_due(rt, LEADER_ACTOR, None if state is None else list(state.federations.values()))
    if not prune:
        return
    await rt.store.delete_expired_partner_certificates(now)
    tokens = await rt.store.delete_expired_join_tokens(now)
    if tokens:
        log_event(log, "join_tokens_pruned", count=tokens)
    nodes = await rt.store.delete_expired_nodes(now - rt.config.prune_agents_after.total_seconds())
    for node in nodes:
        await rt.audit.record("agent.pruned", actor=LEADER_ACTOR, subject=node,
                              reason=f"agent SVID expired more than {rt.config.prune_agents_after} ago")
    if nodes:
        log_event(log, "agents_pruned", count=len(nodes))


async def leader_duties(rt: ServerRuntime, interval: float = INTERVAL_SECONDS,
                        flows: FlowRollups | None = None) -> None:
    """Run until cancelled (when leadership ends). A failed round is logged and retried.

    The rotation step and federation refreshes are looked at every `interval`, from memory;
    pruning, which reads every node and token, runs when the leader takes over and then
    only once something has expired, at most every PRUNE_SECONDS.
    """
    failures = rt.metrics.counter("trustmesh_leader_duty_failures_total", "leader duty rounds that failed")
    state = LeaderState(rt)
    follower: asyncio.Task[None] | None = None
    last_prune = float("-inf")
    try:
        while True:
            try:
                if follower is None or follower.done():
                    if follower is not None and not follower.cancelled() and follower.exception() is not None:
                        log_event(log, "leader_change_feed_failed", level=logging.WARNING,
                                  error=str(follower.exception()))
                    follower = None
                    await state.load()
                    follower = asyncio.create_task(state.follow(), name="leader-change-feed")
                now = rt.clock()
                prune = now - last_prune >= PRUNE_SECONDS and (
                    last_prune == float("-inf") or state.next_expiry() <= now)
                await run_once(rt, prune=prune, state=state)
                if flows is not None:
                    await flows.maintain()  # once an hour: compaction and retention
                if prune:
                    last_prune = rt.clock()
            except (StoreError, TrustmeshError) as err:
                failures.inc()
                log_event(log, "leader_duty_failed", level=logging.WARNING, error=str(err))
            await asyncio.sleep(interval)
    finally:
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError, TrustmeshError):
                await follower


__all__ = ["LeaderState", "leader_duties", "run_once", "take_root_step"]
