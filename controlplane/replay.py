"""Replays of older records, where they matter: a lifted ban, an undone revocation, a rolled-back
policy head.

A record MAC (store/sealing.py) proves the control plane wrote a value, not that it is the
*latest* value: someone who can write the store may put back a validly sealed older node
record (banned: false, or one that was evicted), partner certificate (not revoked) or policy
head. Those three facts
only ever move one way, and each move is an audit event; the audit chain cannot be forged
without the KEK, and cutting it is caught by its anchor outside the store. So the guard
learns the facts from the chain (all of it at start, then every event appended or watched)
and the store hands every record of those kinds through it: a record that contradicts the
chain is reported as an integrity failure and used as the chain says (banned, revoked, the
newer head).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

from trustmesh.controlplane.store.records import AttestedNode, AuditEvent, PartnerCertificate
from trustmesh.controlplane.store.sealing import IntegrityFailure

_PAGE = 1000
BAN = "agent.ban"
EVICT = "agent.evict"
PRUNED = "agent.pruned"
REVOKE = "partner.revoke"
POLICY = ("policy.apply", "policy.rollback")


class ReplayGuard:
    """One-way facts from the audit chain, and the check of records against them."""

    def __init__(self, on_failure: Callable[[IntegrityFailure], Coroutine[Any, Any, None]]) -> None:
        self.banned: set[str] = set()  # agent IDs
        self.evicted: set[tuple[str, str]] = set()  # (agent ID, SVID serial) of evicted attestations
        self.revoked: set[str] = set()  # partner certificate serials
        self.policy_revision = 0  # the newest policy revision applied
        self._on_failure = on_failure
        self._reports: set[asyncio.Task[None]] = set()

    async def load(self, events: Callable[[int, int], Awaitable[list[AuditEvent]]]) -> int:
        """Read the whole chain (`events(since_seq, limit)`); returns how many events were read."""
        since = total = 0
        while page := await events(since, _PAGE):
            for event in page:
                self.observe(event)
            since, total = page[-1].seq, total + len(page)
        return total

    def observe(self, event: AuditEvent) -> None:
        if event.outcome != "ok":
            return
        if event.kind == BAN:
            self.banned.add(event.subject)
        elif event.kind == EVICT and isinstance(event.details.get("cert_serial"), str):
            self.evicted.add((event.subject, event.details["cert_serial"]))
        elif event.kind == PRUNED:
            self.banned.discard(event.subject)
        elif event.kind == REVOKE and isinstance(event.details.get("serial"), str):
            self.revoked.add(event.details["serial"])
        elif event.kind in POLICY and isinstance(event.details.get("revision"), int):
            self.policy_revision = max(self.policy_revision, event.details["revision"])

    def _report(self, kind: str, key: str, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._on_failure(IntegrityFailure(kind, key, reason)))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    # -- the checks the store applies to every record it decodes ---------------------------

    def node(self, key: str, node: AttestedNode) -> AttestedNode:
        agent = str(node.spiffe_id)
        if (agent, node.cert_serial) in self.evicted:
            # An evicted attestation put back: no SVID of it may renew or call again (the
            # operator can evict the record, and the node attest anew).
            self._report("node", key, "an older record was put back: the audit log says this attestation was evicted")
            return replace(node, cert_serial="", superseded=())
        if node.banned or agent not in self.banned:
            return node
        self._report("node", key, "an older record was put back: the audit log says this agent is banned")
        return replace(node, banned=True)

    def partner(self, key: str, cert: PartnerCertificate) -> PartnerCertificate:
        if cert.revoked_at or cert.serial not in self.revoked:
            return cert
        self._report("partner-certificate", key,
                     "an older record was put back: the audit log says this certificate is revoked")
        return replace(cert, revoked_at=cert.issued_at or 1.0, reason=cert.reason or "revoked (per the audit log)")

    def policy_head(self, key: str, revision: int) -> int:
        if revision >= self.policy_revision:
            return revision
        self._report("policy-head", key, f"the head was rolled back to revision {revision}: the audit log says "
                                         f"revision {self.policy_revision} was applied")
        return self.policy_revision
