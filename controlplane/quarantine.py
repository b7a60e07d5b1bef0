"""Quarantine (continuous verification): an identity or a whole node that nothing may reach.

A quarantined SPIFFE ID travels to every agent in the compiled policy, like a revocation: each
agent refuses new connections from and to it and cuts the open ones (policy/model.py `decide`),
and the CA issues it no SVID (issuance.py). A node's quarantine is its agent's ID: that agent's
listeners refuse everything and no workload SVID is issued on it, while the agent itself keeps
renewing its own SVID, so that it learns of the release.

Quarantines are put there by a response rule (the detectors, detection.py: idempotent, an
existing quarantine stays as it is) or by a person (`trustmesh quarantine add`), and only a
person releases one (a security officer, with step-up). Both are audited with the evidence.
At most MAX_QUARANTINES are in force, and their IDs take at most MAX_QUARANTINE_BYTES: every
agent receives all of them in every policy it is sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from trustmesh.bundle import Bundle
from trustmesh.clip import CLAIMED, COMMENT, clip
from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.audit_window import AuditWindow
from trustmesh.controlplane.operators import OPERATOR_PATH
from trustmesh.controlplane.registration import check_node_name, spiffe_id_arg
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import QUARANTINE_KINDS, AttestedNode
from trustmesh.controlplane.store.records import Quarantine as Quarantine  # re-exported: the API's value
from trustmesh.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from trustmesh.logs import log_event
from trustmesh.naming import agent_id, is_reserved, node_name_of
from trustmesh.spiffeid import SpiffeId, TrustDomain

log = logging.getLogger("trustmesh.quarantine")

IDENTITY, NODE = QUARANTINE_KINDS
MAX_QUARANTINES = 10_000
MAX_QUARANTINE_BYTES = 1024 * 1024  # of target IDs: all of them go to every agent, within gRPC's 4 MiB
MAX_REASON = COMMENT
MAX_EVIDENCE = 20  # explanations kept per quarantine, each clipped to CLAIMED characters
RELEASE_HINT = "a security officer releases it with `trustmesh quarantine release {target} --reason …`"


class QuarantineView(Protocol):
    """What the quarantine service reads from the registry view."""

    @property
    def trust_domain(self) -> TrustDomain: ...

    @property
    def federated_bundles(self) -> Mapping[str, Bundle]: ...

    def quarantines(self) -> list[Quarantine]: ...

    def attested_nodes(self) -> list[AttestedNode]: ...


def refusal(spiffe_id: str, *, node: str = "") -> str:
    """The one-line reason an SVID is refused: `spiffe_id` is in quarantine, or `node` (its
    agent's ID in quarantine) is."""
    if node:
        return (f"node {node} is in quarantine: no workload SVID is issued on it; "
                + RELEASE_HINT.format(target=node))
    return f"{spiffe_id} is in quarantine: no SVID is issued for it; " + RELEASE_HINT.format(target=spiffe_id)


class QuarantineService:
    """Add, release and list quarantines; `actor` names who asked, as the audit log does."""

    def __init__(self, rt: ServerRuntime, view: QuarantineView) -> None:
        self._rt = rt
        self._view = view

    def _target(self, target: str, kind: str) -> tuple[str, str]:
        """(the SPIFFE ID to quarantine, the node name for a node) or INVALID_ARGUMENT/NOT_FOUND."""
        td = self._view.trust_domain
        if kind == NODE:
            name = check_node_name(target.strip())
            agent = str(agent_id(td, name))
            if not any(str(n.spiffe_id) == agent for n in self._view.attested_nodes()):
                raise NotFoundError(f"no attested node named {name!r}; `trustmesh agent list` shows them")
            return agent, name
        if kind != IDENTITY:
            raise InvalidArgumentError(f"kind {clip(kind, 40)!r}: one of {', '.join(QUARANTINE_KINDS)}")
        sid = spiffe_id_arg(target.strip(), "ID")
        if sid.is_trust_domain_id:
            raise InvalidArgumentError(f"{sid} has no path: name one workload")
        if sid.trust_domain == td:
            _check_not_reserved(sid)
        elif sid.trust_domain.name not in self._view.federated_bundles:
            raise InvalidArgumentError(f"{sid} is of trust domain {sid.trust_domain.name}, which this server does "
                                       f"not federate with; name a workload of {td.name} or of a federated one")
        return str(sid), ""

    async def add(self, target: str, kind: str, reason: str, actor: str, *, node: str = "",
                  evidence: Sequence[str] = (), detector: str = "", score: float = 0.0) -> Quarantine:
        """Put `target` (a SPIFFE ID, or a node name with kind "node") in quarantine.

        An automatic add (one naming its `detector`) of a target already in quarantine returns
        that quarantine unchanged; a person is told it is there already (ALREADY_EXISTS)."""
        spiffe_id, name = self._target(target, kind)
        if not reason.strip() or len(reason) > MAX_REASON:
            raise InvalidArgumentError(f"--reason is required (at most {MAX_REASON} characters): say why, for the "
                                       "security officer who releases it and for the auditors")
        if not math.isfinite(score):
            raise InvalidArgumentError(f"score {score!r} is not a finite number")
        automatic = bool(detector)
        existing = await self._existing(spiffe_id)
        if existing is not None:
            if automatic:
                return existing
            raise _already(existing)
        in_force = self._view.quarantines()
        if len(in_force) >= MAX_QUARANTINES or \
                sum(len(q.target) for q in in_force) + len(spiffe_id) > MAX_QUARANTINE_BYTES:
            raise ResourceExhaustedError(f"{len(in_force)} quarantines are in force, the most a fleet is sent "
                                         f"({MAX_QUARANTINES}, {MAX_QUARANTINE_BYTES} bytes of IDs); release "
                                         "some with `trustmesh quarantine release` first")
        quarantine = Quarantine(
            target=spiffe_id, kind=kind, reason=reason, created_by=actor, created_at=self._rt.clock(),
            node=name or clip(node, 128), evidence=tuple(clip(e, CLAIMED) for e in evidence[:MAX_EVIDENCE]),
            detector=clip(detector, 64), score=float(score))
        try:
            quarantine = await self._rt.store.create_quarantine(quarantine)
        except AlreadyExistsError:
            # Another replica (or detector) got there first: the same answer as when it was there before.
            existing = await self._existing(spiffe_id)
            if existing is None:
                raise
            if automatic:
                return existing
            raise _already(existing) from None
        await self._rt.audit.record("quarantine.add", actor=actor, subject=spiffe_id, **_details(quarantine))
        log_event(log, "quarantine_added", level=logging.WARNING, target=spiffe_id, kind=kind, actor=actor,
                  detector=quarantine.detector or "-", node=quarantine.node or "-")
        return quarantine

    async def release(self, target: str, reason: str, actor: str) -> Quarantine:
        """End the quarantine of `target`: a SPIFFE ID, or the name of a quarantined node."""
        if not reason.strip() or len(reason) > MAX_REASON:
            raise InvalidArgumentError(f"--reason is required (at most {MAX_REASON} characters): say why it is "
                                       "safe again, for the auditors")
        text = target.strip()
        if text.startswith("spiffe://"):
            spiffe_id = str(spiffe_id_arg(text, "ID"))
        else:  # a node's name stands for its agent's ID
            spiffe_id = str(agent_id(self._view.trust_domain, check_node_name(text)))
        quarantine = await self._existing(spiffe_id)
        if quarantine is None:
            raise NotFoundError(f"{clip(text, 96)} is not in quarantine; `trustmesh quarantine list` shows what is")
        try:
            await self._rt.store.delete_quarantine(spiffe_id)
        except NotFoundError:
            raise NotFoundError(f"{clip(text, 96)} was released meanwhile by someone else") from None
        await self._rt.audit.record("quarantine.release", actor=actor, subject=spiffe_id,
                                    release_reason=clip(reason, MAX_REASON), added_by=quarantine.created_by,
                                    added_at=int(quarantine.created_at), **_details(quarantine))
        log_event(log, "quarantine_released", target=spiffe_id, kind=quarantine.kind, actor=actor)
        return quarantine

    async def list(self) -> list[Quarantine]:
        """Every quarantine in force, oldest first (read from the store: what was just added shows)."""
        return sorted(await self._rt.store.list_quarantines(), key=lambda q: (q.created_at, q.target))

    async def _existing(self, spiffe_id: str) -> Quarantine | None:
        try:
            return await self._rt.store.get_quarantine(spiffe_id)
        except NotFoundError:
            return None


def _check_not_reserved(sid: SpiffeId) -> None:
    if not is_reserved(sid):
        return
    name = node_name_of(sid)
    if name is not None:
        raise InvalidArgumentError(f"{sid} is an agent: quarantine its node with `trustmesh quarantine add {name} "
                                   "--node --reason …`")
    if sid.path.startswith(OPERATOR_PATH) or sid.path == OPERATOR_PATH.rstrip("/"):
        raise InvalidArgumentError(f"{sid} is an operator, not a workload: disable the person with "
                                   "`trustmesh operator disable NAME`")
    raise InvalidArgumentError(f"{sid} is reserved for trustmesh itself (its server and agents) and names no "
                               "workload; quarantine a node with `trustmesh quarantine add NODE --node`")


def _already(existing: Quarantine) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"{existing.target} is in quarantine already (by {existing.created_by}); `trustmesh quarantine list` "
        "shows why; release it first to quarantine it again")


def _details(q: Quarantine) -> dict[str, Any]:
    return {"target_kind": q.kind, "node": q.node, "reason": clip(q.reason, MAX_REASON), "detector": q.detector,
            "score": q.score, "evidence": list(q.evidence)}


# --- the SVIDs refused because of a quarantine, in the audit log -----------------------------


class _Refused:
    """What one agent was refused since its last event: counts and the identities concerned."""

    MAX_IDS = 100

    def __init__(self) -> None:
        self.x509 = 0
        self.jwt = 0
        self.ids: dict[str, int] = {}  # SPIFFE ID -> refusals
        self.node = ""  # set when the agent's node is in quarantine
        self.unlisted = 0

    @property
    def worth_auditing(self) -> bool:
        return bool(self.x509 or self.jwt)

    def add(self, what: str, ids: Iterable[str], node: str) -> None:
        for sid in ids:
            if what == "jwt":
                self.jwt += 1
            else:
                self.x509 += 1
            if sid in self.ids:
                self.ids[sid] += 1
            elif len(self.ids) < self.MAX_IDS:
                self.ids[sid] = 1
            else:
                self.unlisted += 1
        self.node = node or self.node

    def merge(self, other: _Refused) -> None:
        self.x509 += other.x509
        self.jwt += other.jwt
        self.unlisted += other.unlisted
        for sid, n in other.ids.items():
            if sid in self.ids or len(self.ids) < self.MAX_IDS:
                self.ids[sid] = self.ids.get(sid, 0) + n
            else:
                self.unlisted += n
        self.node = self.node or other.node


class QuarantineRefusals:
    """SVIDs refused because of a quarantine, audited per agent: the first at once, then at
    most one event per `interval` summing the rest. A quarantined workload keeps asking (its
    agent retries, its JWT fetches come as they come); the audit log must not grow with that."""

    KIND = "svid.issue"

    def __init__(self, audit: AuditLog, interval: float) -> None:
        self._audit = audit
        self._window: AuditWindow[_Refused] = AuditWindow(interval, _Refused, self._write)

    async def refused(self, agent: str, what: str, ids: Iterable[str], *, node: str = "") -> None:
        """`what` (x509 or jwt) SVIDs for `ids` were refused to `agent`; `node`: its node is in quarantine."""
        self._window.pending(agent).add(what, ids, node)
        await self._window.offer(agent)

    async def _write(self, agent: str, refused: _Refused) -> None:
        ranked = sorted(refused.ids.items(), key=lambda kv: -kv[1])
        await self._audit.record(self.KIND, actor=agent, subject=agent, outcome="denied", reason="in quarantine",
                                 x509=refused.x509, jwt=refused.jwt, node_quarantined=refused.node,
                                 spiffe_ids=[sid for sid, _ in ranked], unlisted=refused.unlisted)

    async def run(self, stop: asyncio.Event) -> None:
        await self._window.run(stop)


__all__ = ["IDENTITY", "MAX_QUARANTINES", "NODE", "Quarantine", "QuarantineRefusals", "QuarantineService",
           "refusal"]
