"""Reading the audit log: filtered, paged listing and chain verification (transport-free).

The writer is `audit.AuditLog`; this is what security and compliance ask of the log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from trustmesh.controlplane.audit import VerifyResult
from trustmesh.controlplane.audit_anchor import AnchorCheck
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import AuditEvent
from trustmesh.controlplane.store.sealing import IntegrityFailure
from trustmesh.errors import InvalidArgumentError

MAX_AUDIT_PAGE = 5000


class AuditReader(Protocol):
    """The part of the Store that listing needs."""

    async def list_audit_events(self, since_seq: int = 0, limit: int | None = None) -> list[AuditEvent]: ...


@dataclass(frozen=True)
class AuditQuery:
    """Events with seq > since_seq and time >= since_time, of `kind` ("" = all), at most `limit`
    (0 = the server's page size, which also caps it)."""

    since_seq: int = 0
    since_time: float = 0
    limit: int = 0
    kind: str = ""
    actor: str = ""  # exact actor, or an operator's name (its SPIFFE ID's last segment)

    def matches(self, event: AuditEvent) -> bool:
        return (event.time >= self.since_time and (not self.kind or event.kind == self.kind)
                and (not self.actor or event.actor == self.actor
                     or ("/" not in self.actor and event.actor.endswith(f"/operator/{self.actor}"))))


@dataclass(frozen=True)
class AuditPage:
    events: tuple[AuditEvent, ...]  # oldest first
    next_seq: int  # pass as since_seq for the next page; 0 when there are no more events


async def list_events(store: AuditReader, query: AuditQuery) -> AuditPage:
    if query.limit < 0 or query.since_seq < 0:
        raise InvalidArgumentError("limit and since_seq must not be negative")
    limit = min(query.limit or MAX_AUDIT_PAGE, MAX_AUDIT_PAGE)
    out: list[AuditEvent] = []
    cursor = query.since_seq
    # Filters apply after reading; read pages until the limit is met or the log ends.
    while len(out) < limit:
        page = await store.list_audit_events(since_seq=cursor, limit=limit)
        if not page:
            break
        cursor = page[-1].seq
        out.extend(e for e in page if query.matches(e))
    out = out[:limit]
    next_seq = out[-1].seq if len(out) == limit else 0
    return AuditPage(tuple(out), next_seq)


class AuditQueries:
    def __init__(self, rt: ServerRuntime) -> None:
        self._rt = rt

    async def events(self, query: AuditQuery) -> AuditPage:
        return await list_events(self._rt.store, query)

    async def verify(self) -> AuditVerification:
        """Walk the whole chain, check it against the anchor outside the store, and check every
        registry record's MAC; the time it takes is the histogram trustmesh_audit_verify_seconds."""
        started = time.monotonic()
        chain = await self._rt.audit.verify()
        anchor = self._rt.audit.anchor
        if anchor is None:
            check = AnchorCheck(True, None)
        elif anchor.broken:
            check = AnchorCheck(False, anchor.last, anchor.broken)
        else:
            check = await anchor.check(self._rt.store)
        checked, failures = await self._rt.store.check_records()
        self._rt.metrics.histogram("trustmesh_audit_verify_seconds", "time to verify the audit chain").observe(
            time.monotonic() - started)
        return AuditVerification(chain, check, anchor.target if anchor else "off", checked, tuple(failures))


@dataclass(frozen=True)
class AuditVerification:
    """`audit verify`: the chain, the chain against its anchor, and the registry records' MACs."""

    chain: VerifyResult
    anchor: AnchorCheck
    anchor_target: str
    records_checked: int
    record_failures: tuple[IntegrityFailure, ...]

    @property
    def ok(self) -> bool:
        return self.chain.ok and self.anchor.ok and not self.record_failures

    @property
    def reason(self) -> str:
        """The first problem found, as one sentence; empty when ok."""
        if not self.chain.ok:
            return self.chain.reason
        if not self.anchor.ok:
            return self.anchor.reason
        if self.record_failures:
            f = self.record_failures[0]
            more = f" (and {len(self.record_failures) - 1} more)" if len(self.record_failures) > 1 else ""
            return f"stored {f.kind} record {f.key!r} fails its MAC: {f.reason}{more}"
        return ""


__all__ = ["MAX_AUDIT_PAGE", "AuditEvent", "AuditVerification", "AuditPage",
           "AuditQueries", "AuditQuery", "VerifyResult", "list_events"]
