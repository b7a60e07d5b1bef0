"""What an attested agent asks of the control plane (transport-free): workload X509-SVIDs in
batches, JWT-SVIDs, its own renewal, and reports of the connections its listeners decided.

Every request is checked against the registry view (an agent gets SVIDs only for the
entries it is authorized for, and learns nothing about other nodes' entries by probing ids;
none for an identity in quarantine, nor any workload SVID for a node in quarantine), signed by
the CA, counted in the metrics and written to the audit log. Results are typed
values; the Node servicer turns them into protobuf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal, Protocol

from trustmesh.bundle import Bundle
from trustmesh.clip import ENTRY_ID, clip, shown
from trustmesh.controlplane.clones import next_superseded
from trustmesh.controlplane.detection import DetectionService
from trustmesh.controlplane.flow_audit import FlowAudit, FlowCounter, RefusalCounter
from trustmesh.controlplane.flow_store import FlowRollups, decision_of
from trustmesh.controlplane.quarantine import QuarantineRefusals, refusal
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import AttestedNode, RegistrationEntry
from trustmesh.errors import (
    InvalidArgumentError,
    InvalidSpiffeIdError,
    PermissionDeniedError,
    SvidError,
    TrustmeshError,
)
from trustmesh.naming import node_name_of
from trustmesh.spiffeid import SpiffeId
from trustmesh.x509svid import X509Svid

MAX_BATCH = 1000
MAX_AUDIENCES = 16
MAX_FLOW_COUNTERS = 10_000  # flow and refusal counters in one report
REFUSAL_KINDS = frozenset({"handshake", "outbound_caller", "workload_api"})  # metric labels; anything else is "other"


class AuthorizedEntries(Protocol):
    """What issuance needs of the registry view."""

    def authorized_entry(self, agent: str, entry_id: str) -> RegistrationEntry | None: ...

    def is_quarantined(self, spiffe_id: str) -> bool: ...

    async def node_written(self, node: AttestedNode) -> None: ...


# --- typed requests and results -----------------------------------------------------------


@dataclass(frozen=True)
class X509Request:
    entry_id: str
    csr: bytes


@dataclass(frozen=True)
class X509Issued:
    entry_id: str
    spiffe_id: SpiffeId
    svid: X509Svid


@dataclass(frozen=True)
class X509Refused:
    """An item that got no SVID: `denied` (not authorized for this agent, or unknown) or
    `invalid` (the CSR or the entry could not be signed; `cause` says why)."""

    entry_id: str
    outcome: Literal["denied", "invalid"]
    message: str
    cause: TrustmeshError | None = None


X509Outcome = X509Issued | X509Refused


@dataclass(frozen=True)
class JwtIssued:
    token: str
    expires_at: datetime


# --- the service --------------------------------------------------------------------------


class IssuanceService:
    def __init__(self, rt: ServerRuntime, view: AuthorizedEntries, flows: FlowAudit | None = None,
                 rollups: FlowRollups | None = None) -> None:
        self._rt = rt
        self._view = view
        self.flows = flows or FlowAudit(rt.audit, rt.config.flow_audit_interval.total_seconds())
        self.rollups = rollups
        # Refusals because of a quarantine, audited per agent at most once an interval: a
        # quarantined workload keeps asking, and must not fill the audit log by doing so.
        self.quarantine_refusals = QuarantineRefusals(rt.audit, rt.config.flow_audit_interval.total_seconds())
        # Continuous verification (detection.py): set by the server once it is built, since
        # it needs the quarantine service, which needs the registry view.
        self.detection: DetectionService | None = None
        metrics = rt.metrics
        self._x509 = metrics.counter("trustmesh_x509_svids_total", "X509-SVID requests by outcome", ["outcome"])
        self._jwt = metrics.counter("trustmesh_jwt_svids_total", "JWT-SVID requests by outcome", ["outcome"])
        self._renewals = metrics.counter("trustmesh_agent_renewals_total", "agent SVID renewals")
        self._flows = metrics.counter("trustmesh_flow_decisions_total", "connection decisions reported by agents",
                                      ["decision"])
        self._refusals = metrics.counter("trustmesh_reported_refusals_total",
                                         "connections agents report they refused before any decision", ["kind"])

    def trust_bundle(self) -> Bundle:
        """Our trust domain's bundle, as handed to a newly attested agent."""
        return self._rt.ca.bundle()

    async def sign_x509_batch(self, agent: str, items: Sequence[X509Request]) -> list[X509Outcome]:
        """One outcome per item, in order; a bad item fails alone."""
        if not items:
            raise InvalidArgumentError(f"the batch is empty; send 1 to {MAX_BATCH} (entry id, CSR) items")
        if len(items) > MAX_BATCH:
            raise InvalidArgumentError(f"at most {MAX_BATCH} items per batch, got {len(items)}; split the batch")
        results: list[X509Outcome | None] = [None] * len(items)
        work: list[tuple[int, RegistrationEntry]] = []
        denied: list[str] = []
        quarantined: list[str] = []
        node = self._quarantined_node(agent)
        for i, item in enumerate(items):
            entry = self._view.authorized_entry(agent, item.entry_id)
            if entry is None:
                # Unknown and foreign entries get the same answer: an agent learns
                # nothing about other nodes' entries by probing ids.
                denied.append(clip(item.entry_id, ENTRY_ID))
                results[i] = X509Refused(item.entry_id, "denied",
                                         f"entry {shown(item.entry_id, ENTRY_ID)} is not authorized for agent {agent}")
            elif node or self._view.is_quarantined(str(entry.spiffe_id)):
                quarantined.append(str(entry.spiffe_id))
                results[i] = X509Refused(entry.id, "denied", refusal(str(entry.spiffe_id), node=node))
            else:
                work.append((i, entry))
        default_ttl = self._rt.config.default_x509_ttl
        # One call for the whole batch: the CA signs it off the event loop.
        signed = await self._rt.ca.sign_x509_svids([
            # An admin entry's SVID names the entry: admin rights follow it, not the ID (callers.py).
            (items[i].csr, e.spiffe_id,
             timedelta(seconds=e.x509_ttl) if e.x509_ttl else default_ttl, e.dns_names, e.id if e.admin else "")
            for i, e in work
        ]) if work else []
        issued: list[str] = []
        invalid: list[str] = []
        for (i, entry), outcome in zip(work, signed, strict=True):
            if isinstance(outcome, TrustmeshError):
                invalid.append(entry.id)
                results[i] = X509Refused(entry.id, "invalid", f"entry {entry.id}: {outcome}", outcome)
                continue
            issued.append(entry.id)
            results[i] = X509Issued(entry.id, entry.spiffe_id, outcome)
        self._x509.inc(len(issued), outcome="issued")
        self._x509.inc(len(denied), outcome="denied")
        self._x509.inc(len(invalid), outcome="invalid")
        self._x509.inc(len(quarantined), outcome="quarantined")
        if quarantined:
            await self.quarantine_refusals.refused(agent, "x509", quarantined, node=node)
        audit = self._rt.audit
        if issued or invalid:
            await audit.record("svid.issue", actor=agent, subject=agent, outcome="ok" if not invalid else "partial",
                               issued=len(issued), invalid=len(invalid), entry_ids=issued[:100],
                               invalid_entry_ids=invalid[:100])
        if denied:
            await audit.record("svid.issue", actor=agent, subject=agent, outcome="denied",
                               reason="entries not authorized for this agent", denied=len(denied),
                               entry_ids=denied[:100])
        return [r for r in results if r is not None]

    async def sign_jwt(self, agent: str, entry_id: str, audiences: Sequence[str]) -> JwtIssued:
        if not audiences or len(audiences) > MAX_AUDIENCES or any(not a or len(a) > 256 for a in audiences):
            raise InvalidArgumentError(f"give 1 to {MAX_AUDIENCES} audiences of 1 to 256 characters each")
        entry = self._view.authorized_entry(agent, entry_id)
        if entry is None:
            await self._rt.audit.record("jwt.issue", actor=agent, subject=clip(entry_id, ENTRY_ID), outcome="denied",
                                        reason="entry not authorized for this agent")
            self._jwt.inc(outcome="denied")
            raise PermissionDeniedError(f"entry {shown(entry_id, ENTRY_ID)} is not authorized for agent {agent}")
        node = self._quarantined_node(agent)
        if node or self._view.is_quarantined(str(entry.spiffe_id)):
            self._jwt.inc(outcome="quarantined")
            await self.quarantine_refusals.refused(agent, "jwt", [str(entry.spiffe_id)], node=node)
            raise PermissionDeniedError(refusal(str(entry.spiffe_id), node=node))
        ttl = timedelta(seconds=entry.jwt_ttl) if entry.jwt_ttl else self._rt.config.default_jwt_ttl
        token, expires = await self._rt.ca.issue_jwt_svid(entry.spiffe_id, audiences, ttl)
        await self._rt.audit.record("jwt.issue", actor=agent, subject=str(entry.spiffe_id), entry_id=entry.id,
                                    audiences=list(audiences))
        self._jwt.inc(outcome="issued")
        return JwtIssued(token, expires)

    def _quarantined_node(self, agent: str) -> str:
        """The name of the agent's node when that node is in quarantine, else "". The agent's
        own renewal is not refused: it must keep its stream to learn of the release."""
        if not self._view.is_quarantined(agent):
            return ""
        try:
            return node_name_of(SpiffeId.parse(agent)) or agent
        except InvalidSpiffeIdError:
            return agent

    async def renew_agent(self, agent: SpiffeId, node: AttestedNode, csr: bytes, address: str = "") -> X509Svid:
        """A new agent SVID for an authenticated agent, recorded on its node record with the
        address it was renewed from and the SVID it replaces (clones.py reads both)."""
        now = self._rt.clock()
        superseded = next_superseded(node, now)  # refuses an agent that renews far too often
        try:
            svid = await self._rt.ca.sign_x509_svid(csr, agent, self._rt.config.agent_ttl)
        except SvidError as err:
            raise InvalidArgumentError(f"agent CSR refused: {err}") from err
        # Compare-and-swap on the revision we hold: a ban written meanwhile makes this
        # fail (ABORTED) instead of being overwritten with banned=False.
        updated = await self._rt.store.update_attested_node(
            replace(node, cert_serial=format(svid.leaf.serial_number, "x"),
                    cert_not_after=svid.expires_at.timestamp(), updated_at=now, renewed_from=address,
                    renewed_at=now, superseded=superseded),
            expected_revision=node.revision or None)
        await self._view.node_written(updated)
        await self._rt.audit.record("agent.renew", actor=str(agent), subject=str(agent),
                                    serial=updated.cert_serial, previous_serial=node.cert_serial, address=address)
        self._renewals.inc()
        return svid

    async def report_flows(self, agent: str, counters: Sequence[FlowCounter],
                           refusals: Sequence[RefusalCounter] = ()) -> None:
        """Count every reported decision and refusal; denials, what audit mode would have
        denied, and refusals reach the audit log as the agent's claim, aggregated (FlowAudit)."""
        if len(counters) + len(refusals) > MAX_FLOW_COUNTERS:
            raise InvalidArgumentError(f"at most {MAX_FLOW_COUNTERS} counters per report; report more often")
        for c in counters:  # validate all before counting any
            if c.count < 0 or c.port > 65535 or len(c.source_id) > 2048 or len(c.destination_id) > 2048 \
                    or len(c.rule) > 512 or c.bytes_in < 0 or c.bytes_out < 0 or len(c.source_address) > 256:
                raise InvalidArgumentError("a flow counter is out of range (count and bytes >= 0, port <= 65535, "
                                           "IDs of at most 2048, rule names of at most 512 and addresses of at most "
                                           "256 characters)")
        for r in refusals:
            if r.count < 0 or len(r.kind) > 64 or len(r.subject) > 2048 or len(r.peer) > 512 or len(r.reason) > 512:
                raise InvalidArgumentError("a refusal counter is out of range (count >= 0, a kind of at most 64, "
                                           "a subject of at most 2048, a peer and a reason of at most 512 characters)")
        decided: dict[str, int] = {}
        for c in counters:  # summed first: a labelled increment per counter costs more than the rest
            decision = decision_of(c)
            decided[decision] = decided.get(decision, 0) + c.count
        for decision, count in decided.items():
            self._flows.inc(count, decision=decision)
        for r in refusals:
            self._refusals.inc(r.count, kind=r.kind if r.kind in REFUSAL_KINDS else "other")
        if self.rollups is not None:
            kept = self.rollups.add(agent, counters)
            if self.detection is not None:
                await self.detection.observe(agent, kept)
        await self.flows.add(agent, counters, refusals)
