"""The console's JSON API: Admin API replies translated to the documents of CONTRACT.md.

This is the one place where the console reads protobuf. Each view makes its Admin calls as
the session's operator (admin.py) and shapes the answers; the meaning stays where it lives:
the service graph in trustmesh/flowgraph.py, revision diffs in policy_store.diff_text,
simulation in trustmesh/policy/suggest.py, flows as trustmesh.flows.Flow. Times are ISO 8601
UTC text, or null for "never". A part of a page the operator's roles cannot read is null
(the call is not even made: every refused Admin call is an audit event).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Mapping
from datetime import datetime, timezone
from typing import Any

from cryptography import x509

from trustmesh._proto.trustmesh.v1 import admin_pb2, types_pb2
from trustmesh.clock import format_utc, parse_utc
from trustmesh.controlplane.console.admin import AdminClient, ApiError
from trustmesh.controlplane.console.sessions import Session
from trustmesh.controlplane.policy_store import diff_text
from trustmesh.duration import parse_duration
from trustmesh.flowgraph import build, node_of_source
from trustmesh.flows import Flow
from trustmesh.naming import node_name_of
from trustmesh.policy import Policy, load_text
from trustmesh.policy.loader import REVISION
from trustmesh.policy.model import IdPattern, PolicyError
from trustmesh.policy.ownership import Ownership, ownership_of
from trustmesh.policy.suggest import simulate
from trustmesh.spiffeid import SpiffeId

Json = dict[str, Any]

MAX_SINCE_SECONDS = 400 * 86400  # longer than any flow retention or audit question here
DENIALS_WINDOW = 3600  # denials per minute: over the flow rollups of the last hour (hour-aligned)
ANOMALIES_WINDOW = 15 * 60  # anomalies per minute: over the last 15 minutes
AUDIT_PAGE = 5000  # the server's largest page
AUDIT_SCAN_PAGES = 20  # a console query reads at most this many pages of the log
MAX_AUDIT_ROWS = 1000
RECENT_ANOMALIES = 100
MAX_ENTRY_PAGES = 100
UNVERIFIED_PREFIX = "unverified:"


# --- small translations -----------------------------------------------------------------------

def when(seconds: float) -> str | None:
    """Unix seconds as ISO 8601 UTC text; None for 0, which the wire uses for "never"."""
    return format_utc(seconds) if seconds else None


def since_seconds(text: str | None, default: str, name: str = "since", now: float = 0.0) -> int:
    """`text` (a duration back from `now`, e.g. 1h, 7d, or an ISO time) as unix seconds."""
    value = (text or default).strip()
    try:
        back = parse_duration(value).total_seconds()
    except ValueError:
        try:
            return int(parse_utc(value).timestamp())
        except ValueError:
            raise ApiError(400, "invalid_argument", f"{name}={value[:40]!r}: give a duration such as 15m, 1h, "
                                                    "24h or 7d, or an ISO time") from None
    if back > MAX_SINCE_SECONDS:
        raise ApiError(400, "invalid_argument", f"{name}={value[:40]!r} is too far back")
    return int(now - back)


def _int_param(params: Mapping[str, str], name: str, default: int | None = None, low: int = 0,
               high: int = 2**62) -> int:
    text = params.get(name, "")
    if not text and default is not None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, "invalid_argument", f"{name}: give a whole number") from None
    if not low <= value <= high:
        raise ApiError(400, "invalid_argument", f"{name}: give a number from {low} to {high}")
    return value


def _text(body: Mapping[str, Any], name: str, limit: int = 4096, required: bool = False) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or len(value) > limit:
        raise ApiError(400, "invalid_argument", f"{name}: give text of at most {limit} characters")
    if required and not value.strip():
        raise ApiError(400, "invalid_argument", f"{name} is required")
    return value


async def _part(call: Awaitable[Any]) -> Any | None:
    """One part of a page: None when the server refuses the operator (the page still shows)."""
    try:
        return await call
    except ApiError as err:
        if err.status == 403:
            return None
        raise


def flow_from_pb(edge: admin_pb2.FlowEdge) -> Flow:
    return Flow(edge.source, edge.destination, edge.port, edge.decision, edge.rule, edge.connections, edge.bytes_in,
                edge.bytes_out, float(edge.first_seen), float(edge.last_seen), edge.source_address, edge.route)


def _node_id(name: str) -> str:
    """A graph node's ID in the console: a SPIFFE ID, or an unverified caller's bare address."""
    return name.removeprefix(UNVERIFIED_PREFIX)


def _rule(flow: Flow) -> str:
    return flow.rule or ("default deny" if flow.decision == "deny" else "")


def flow_json(flow: Flow) -> Json:
    return {"source": _node_id(node_of_source(flow)), "destination": flow.destination, "port": flow.port,
            "decision": flow.decision, "rule": _rule(flow), "route": flow.route, "connections": flow.connections,
            "bytes_in": flow.bytes_in, "bytes_out": flow.bytes_out, "first_seen": when(flow.first_seen),
            "last_seen": when(flow.last_seen)}


def selector_text(selector: types_pb2.Selector) -> str:
    return f"{selector.type}:{selector.value}"


def _node_of(parent_id: str) -> str | None:
    try:
        return node_name_of(SpiffeId.parse(parent_id))
    except ValueError:
        return None


def entry_json(entry: types_pb2.Entry) -> Json:
    return {"id": entry.id, "spiffe_id": entry.spiffe_id, "parent_id": entry.parent_id,
            "node": _node_of(entry.parent_id), "selectors": [selector_text(s) for s in entry.selectors],
            "x509_ttl": entry.x509_ttl_seconds, "jwt_ttl": entry.jwt_ttl_seconds, "dns_names": list(entry.dns_names),
            "federates_with": list(entry.federates_with), "admin": entry.admin, "hint": entry.hint,
            "revision": entry.revision, "created_at": when(entry.created_at), "updated_at": when(entry.updated_at)}


def agent_state(agent: types_pb2.AttestedNode) -> str:
    """banned; else connected (a sync stream open to the server that answered) or unreachable."""
    if agent.banned:
        return "banned"
    return "connected" if agent.connected else "unreachable"


def agent_json(agent: types_pb2.AttestedNode, now: float) -> Json:
    clone = agent.status == types_pb2.AGENT_STATUS_SUSPECTED_CLONE
    return {"spiffe_id": agent.spiffe_id, "node": agent.node_name, "address": agent.renewed_from or None,
            "state": agent_state(agent), "status": "suspected-clone" if clone else "active",
            "status_reason": agent.status_reason,
            # Connected: seen now; otherwise the last write of its record (attestation, renewal).
            "last_seen": when(now if agent.connected else agent.updated_at),
            "svid_expires_at": when(agent.cert_not_after),
            "policy_revision": agent.policy_revision if agent.connected else None,
            "permissive_listeners": list(agent.permissive_listeners),
            "attestation_type": agent.attestation_type}


def access_json(grant: admin_pb2.AccessGrant) -> Json:
    return {"id": grant.id, "state": grant.state, "requester": grant.requester, "source": grant.source,
            "destination": grant.destination, "port": grant.port, "reason": grant.reason,
            "duration": grant.duration_seconds, "created_at": when(grant.created_at),
            "approve_by": when(grant.approve_by), "starts_at": when(grant.starts_at),
            "expires_at": when(grant.expires_at),
            "approver": ", ".join(grant.approvals) or grant.decided_by or None,
            "approvals": list(grant.approvals), "required_approvals": grant.required_approvals,
            "decided_by": grant.decided_by or None, "decision_reason": grant.decision_reason,
            "break_glass": grant.break_glass, "reviewed_by": grant.reviewed_by or None}


def quarantine_json(q: admin_pb2.Quarantine) -> Json:
    return {"target": q.target, "kind": q.kind, "detector": q.detector or None, "score": q.score,
            "reason": q.reason, "evidence": list(q.evidence), "since": when(q.created_at), "by": q.created_by,
            "node": q.node or None}


def _details(event: types_pb2.AuditEvent) -> Json:
    try:
        details = json.loads(event.details_json) if event.details_json else {}
    except ValueError:
        return {"unparsed": event.details_json}
    return details if isinstance(details, dict) else {"value": details}


def audit_json(event: types_pb2.AuditEvent) -> Json:
    return {"seq": event.seq, "time": when(event.time), "kind": event.kind, "actor": event.actor,
            "outcome": event.outcome, "subject": event.subject, "details": _details(event)}


def anomaly_json(event: types_pb2.AuditEvent) -> Json:
    details = _details(event)
    action = str(details.get("action", ""))
    return {"seq": event.seq, "time": when(event.time), "identity": event.subject,
            "detector": details.get("detector"), "score": details.get("score"),
            "explanation": details.get("reason", ""),
            "action": f"dry-run {action}" if details.get("dry_run") else action,
            "node": details.get("node"), "quarantined": details.get("quarantined")}


def _ownership(reply: admin_pb2.GetPolicyOwnersResponse | None) -> Ownership:
    if reply is None:
        return Ownership()
    try:
        return ownership_of((IdPattern.parse(d), t.team) for t in reply.teams for d in t.destinations)
    except PolicyError:
        return Ownership()  # the server checked the file; a pattern it kept but we cannot read names no team


def _team_of(ownership: Ownership, node: str) -> str | None:
    try:
        return ownership.team_of(IdPattern.parse(node))
    except PolicyError:
        return None  # an address, or an ID no pattern can name


# --- views ------------------------------------------------------------------------------------

def session_view(session: Session) -> Json:
    return {"operator": session.operator, "spiffe_id": session.spiffe_id, "roles": list(session.roles),
            "expires_at": when(session.expires_at), "csrf": session.csrf}


async def _anomalies_per_minute(client: AdminClient, session: Session, now: float) -> float | None:
    """detect.anomaly events of the last 15 minutes, per minute, reading only the audit events
    appended since the session's previous refresh."""
    if not client.may("ListAuditEvents"):
        return None
    cursor = session.audit
    async with cursor.lock:
        request = admin_pb2.ListAuditEventsRequest(since_seq=cursor.seq, limit=AUDIT_PAGE,
                                                   since_time=0 if cursor.seq else int(now - ANOMALIES_WINDOW))
        for _ in range(AUDIT_SCAN_PAGES):
            reply = await client.call("ListAuditEvents", request)
            for event in reply.events:
                cursor.seq = max(cursor.seq, event.seq)
                if event.kind == "detect.anomaly":
                    cursor.anomaly_times.append(float(event.time))
            if not reply.next_seq:
                break
            request = admin_pb2.ListAuditEventsRequest(since_seq=reply.next_seq, limit=AUDIT_PAGE)
        while cursor.anomaly_times and cursor.anomaly_times[0] < now - ANOMALIES_WINDOW:
            cursor.anomaly_times.popleft()
        return round(len(cursor.anomaly_times) / (ANOMALIES_WINDOW / 60), 2)


def _root_expiry(bundle: types_pb2.Bundle) -> str | None:
    ends = [x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp() for der in bundle.x509_authorities]
    return when(max(ends)) if ends else None


async def overview_view(session: Session, now: float) -> Json:
    client = session.client
    agents, bundle, revisions, denials, quarantines, pending, anomalies = await asyncio.gather(
        _part(client.call_if_allowed("ListAgents", admin_pb2.ListAgentsRequest())),
        _part(client.call_if_allowed("GetBundle", admin_pb2.GetBundleRequest())),
        _part(client.call_if_allowed("ListPolicyRevisions", admin_pb2.ListPolicyRevisionsRequest())),
        _part(client.call_if_allowed("ListFlows", admin_pb2.ListFlowsRequest(since=int(now - DENIALS_WINDOW),
                                                                             decision="deny"))),
        _part(client.call_if_allowed("ListQuarantines", admin_pb2.ListQuarantinesRequest())),
        _part(client.call_if_allowed("ListAccess", admin_pb2.ListAccessRequest(state="pending"))),
        _part(_anomalies_per_minute(client, session, now)))
    head = revisions.revisions[-1].revision if revisions is not None and revisions.revisions else 0
    agents_part = policy_part = None
    if agents is not None:
        live = [a for a in agents.agents if not a.banned]
        agents_part = {"connected": sum(1 for a in live if a.connected),
                       "unreachable": sum(1 for a in live if not a.connected),
                       "banned": sum(1 for a in agents.agents if a.banned), "total": len(agents.agents)}
    if revisions is not None:
        at_head = (sum(1 for a in agents.agents if not a.banned and a.connected and a.policy_revision == head)
                   if agents is not None else None)
        policy_part = {"revision": head or None, "agents_at_revision": at_head}
    denials_per_minute = None
    if denials is not None:
        minutes = max(1.0, (denials.until - denials.since) / 60)
        denials_per_minute = round(sum(e.connections for e in denials.edges if e.decision == "deny") / minutes, 2)
    return {
        "agents": agents_part,
        "ca": ({"root_expires_at": _root_expiry(bundle.bundle), "trust_domain": bundle.bundle.trust_domain}
               if bundle is not None else None),
        "policy": policy_part,
        "denials_per_minute": denials_per_minute,
        "anomalies_per_minute": anomalies,
        "quarantined": len(quarantines.quarantines) if quarantines is not None else None,
        "pending_access": len(pending.grants) if pending is not None else None,
        "generated_at": when(now),
    }


async def graph_view(session: Session, params: Mapping[str, str], now: float) -> Json:
    client = session.client
    since = since_seconds(params.get("since"), "1h", now=now)
    team = params.get("team", "")
    window, owners = await asyncio.gather(
        client.call("ListFlows", admin_pb2.ListFlowsRequest(since=since)),
        _part(client.call_if_allowed("GetPolicyOwners", admin_pb2.GetPolicyOwnersRequest())))
    ownership = _ownership(owners)
    flows = [flow_from_pb(e) for e in window.edges]
    if team:
        flows = [f for f in flows if team in (_team_of(ownership, f.source), _team_of(ownership, f.destination))]
    graph = build(flows)
    nodes = [{"id": _node_id(name), "kind": "address" if kind == "unverified" else "identity",
              "team": None if kind == "unverified" else _team_of(ownership, name)} for name, kind in graph.nodes]
    edges = sorted((flow_json(f) for f in flows),
                   key=lambda e: (e["source"], e["destination"], e["port"], e["decision"], e["route"], e["rule"]))
    return {"since": when(window.since), "until": when(window.until), "team": team or None,
            "teams": sorted(ownership.teams), "nodes": nodes, "edges": edges}


async def agents_view(session: Session, now: float) -> Json:
    reply = await session.client.call("ListAgents", admin_pb2.ListAgentsRequest())
    return {"agents": [agent_json(a, now) for a in reply.agents]}


async def _entries(client: AdminClient, spiffe_id: str = "") -> list[types_pb2.Entry]:
    entries: list[types_pb2.Entry] = []
    token = ""
    for _ in range(MAX_ENTRY_PAGES):
        reply = await client.call("ListEntries", admin_pb2.ListEntriesRequest(spiffe_id=spiffe_id, page_token=token))
        entries.extend(reply.entries)
        token = reply.next_page_token
        if not token:
            break
    return entries


async def identities_view(session: Session) -> Json:
    entries = await _entries(session.client)
    return {"entries": [entry_json(e) for e in sorted(entries, key=lambda e: (e.spiffe_id, e.id))]}


async def identity_view(session: Session, params: Mapping[str, str], now: float) -> Json:
    text = params.get("id", "")
    try:
        spiffe_id = str(SpiffeId.parse(text))
    except ValueError:
        raise ApiError(400, "invalid_argument", "id: give a SPIFFE ID, e.g. spiffe://example.org/payments") from None
    client = session.client
    entries, agents, quarantines = await asyncio.gather(
        _entries(client, spiffe_id), _part(client.call_if_allowed("ListAgents", admin_pb2.ListAgentsRequest())),
        _part(client.call_if_allowed("ListQuarantines", admin_pb2.ListQuarantinesRequest())))
    parents = {e.parent_id for e in entries}
    found = [a for a in agents.agents if a.spiffe_id in parents] if agents is not None else []
    quarantine = next((q for q in quarantines.quarantines if q.target == spiffe_id), None) if quarantines else None
    return {"id": spiffe_id, "entries": [entry_json(e) for e in entries],
            "agents": [agent_json(a, now) for a in found],
            # Parents that are no agent: node aliases (entries whose members are matched by selectors).
            "aliases": sorted(parents - {a.spiffe_id for a in found}),
            "quarantine": quarantine_json(quarantine) if quarantine is not None else None}


async def policies_view(session: Session) -> Json:
    reply = await session.client.call("ListPolicyRevisions", admin_pb2.ListPolicyRevisionsRequest())
    revisions = list(reply.revisions)
    return {"head": revisions[-1].revision if revisions else None,
            # Newest first, as a history is read.
            "revisions": [{"revision": r.revision, "author": r.author, "comment": r.comment,
                           "created_at": when(r.created_at), "sha256": r.sha256} for r in reversed(revisions)]}


async def _revision_policy(client: AdminClient, revision: int) -> Policy:
    if revision == 0:
        return Policy()  # before the first revision: nothing allowed
    reply = await client.call("GetPolicy", admin_pb2.GetPolicyRequest(revision=revision))
    loaded = await asyncio.to_thread(load_text, reply.policy.documents, f"revision {revision}",
                                     reject_expired=False, limits=REVISION)
    return loaded.policy


async def policy_diff_view(session: Session, params: Mapping[str, str]) -> Json:
    old, new = _int_param(params, "from"), _int_param(params, "to", low=1)
    client = session.client
    before, after = await asyncio.gather(_revision_policy(client, old), _revision_policy(client, new))
    return {"from": old, "to": new, "diff": diff_text(before, after, f"revision {old}", f"revision {new}")}


async def policy_revision_view(session: Session, params: Mapping[str, str]) -> Json:
    revision = _int_param(params, "revision", low=1)
    reply = await session.client.call("GetPolicy", admin_pb2.GetPolicyRequest(revision=revision))
    r = reply.policy
    return {"revision": r.revision, "documents": r.documents, "author": r.author, "comment": r.comment,
            "created_at": when(r.created_at), "sha256": r.sha256}


def _flow_item(flow: Flow) -> Json:
    return {"source": _node_id(node_of_source(flow)), "destination": flow.destination, "port": flow.port,
            "route": flow.route, "decision": flow.decision, "connections": flow.connections,
            "last_seen": when(flow.last_seen)}


async def simulate_view(session: Session, body: Mapping[str, Any], now: float) -> Json:
    documents = _text(body, "documents", limit=REVISION.max_bytes, required=True)
    since = since_seconds(_text(body, "since", limit=40) or None, "7d", now=now)
    at = datetime.fromtimestamp(now, timezone.utc)
    loaded = await asyncio.to_thread(load_text, documents, "candidate", at, reject_expired=False, limits=REVISION)
    empty: Json = {"judged": 0, "would_deny": [], "newly_allowed": [], "unused_rules": [], "unverified": [],
                   "granted": []}
    if loaded.problems:
        return {**empty, "problems": [str(p) for p in loaded.problems]}
    window = await session.client.call("ListFlows", admin_pb2.ListFlowsRequest(since=since))
    flows = [flow_from_pb(e) for e in window.edges]
    result = await asyncio.to_thread(simulate, loaded.policy, flows, at)
    return {"judged": result.judged,
            "would_deny": [{**_flow_item(r.flow), "rule": r.rule, "reason": r.reason} for r in result.would_deny],
            "newly_allowed": [{**_flow_item(f), "rule": _rule(f)} for f in result.newly_allowed],
            "unused_rules": [{"rule": rule, "from": source} for rule, source in result.unused_rules],
            "unverified": [_flow_item(f) for f in result.unverified],
            "granted": [{**_flow_item(f), "rule": f.rule} for f in result.granted],
            "problems": [], "since": when(window.since)}


ACCESS_STATES = {"pending": "pending", "active": "active", "expired": "expired", "denied": "denied",
                 "revoked": "revoked", "review": "review", "all": ""}


async def access_view(session: Session, params: Mapping[str, str]) -> Json:
    state = params.get("state", "all") or "all"
    if state not in ACCESS_STATES:
        raise ApiError(400, "invalid_argument", f"state: one of {', '.join(ACCESS_STATES)}")
    reply = await session.client.call("ListAccess",
                                                      admin_pb2.ListAccessRequest(state=ACCESS_STATES[state]))
    grants = sorted(reply.grants, key=lambda g: (-g.created_at, g.id))
    return {"requests": [access_json(g) for g in grants]}


def _grant_id(grant_id: str) -> str:
    if not grant_id or len(grant_id) > 64 or not grant_id.isalnum():
        raise ApiError(404, "not_found", "no such access request")
    return grant_id


async def approve_view(session: Session, grant_id: str, body: Mapping[str, Any]) -> Json:
    otp = _text(body, "otp", limit=16)
    reply = await session.client.call("ApproveAccess", admin_pb2.ApproveAccessRequest(
        id=_grant_id(grant_id)), otp=otp)
    return {"request": access_json(reply.grant)}


async def deny_view(session: Session, grant_id: str, body: Mapping[str, Any]) -> Json:
    reason = _text(body, "reason", limit=1024)
    reply = await session.client.call("DenyAccess", admin_pb2.DenyAccessRequest(
        id=_grant_id(grant_id), reason=reason))
    return {"request": access_json(reply.grant)}


async def _recent_anomalies(client: AdminClient, now: float) -> list[Json]:
    found: list[types_pb2.AuditEvent] = []
    request = admin_pb2.ListAuditEventsRequest(kind="detect.anomaly", since_time=int(now - 86400), limit=AUDIT_PAGE)
    for _ in range(AUDIT_SCAN_PAGES):
        reply = await client.call("ListAuditEvents", request)
        found = (found + list(reply.events))[-RECENT_ANOMALIES:]
        if not reply.next_seq:
            break
        request = admin_pb2.ListAuditEventsRequest(kind="detect.anomaly", since_seq=reply.next_seq, limit=AUDIT_PAGE)
    return [anomaly_json(e) for e in reversed(found)]


async def anomalies_view(session: Session, now: float) -> Json:
    client = session.client
    quarantines, anomalies = await asyncio.gather(
        client.call("ListQuarantines", admin_pb2.ListQuarantinesRequest()),
        _part(_recent_anomalies(client, now)) if client.may("ListAuditEvents") else _none())
    return {"quarantines": [quarantine_json(q) for q in quarantines.quarantines], "anomalies": anomalies}


async def _none() -> None:
    return None


async def release_view(session: Session, body: Mapping[str, Any]) -> Json:
    target = _text(body, "target", limit=2048, required=True)
    reason = _text(body, "reason", limit=1024, required=True)
    otp = _text(body, "otp", limit=16)
    reply = await session.client.call("ReleaseQuarantine", admin_pb2.ReleaseQuarantineRequest(
        target=target, reason=reason), otp=otp)
    return {"quarantine": quarantine_json(reply.quarantine)}


async def audit_view(session: Session, params: Mapping[str, str], now: float) -> Json:
    """The newest `limit` events that match, newest first; `subject` matches any part of it."""
    limit = _int_param(params, "limit", default=200, low=1, high=MAX_AUDIT_ROWS)
    since = since_seconds(params.get("since"), "24h", now=now)
    actor, kind, subject = (params.get(name, "").strip()[:512] for name in ("actor", "kind", "subject"))
    client = session.client
    request = admin_pb2.ListAuditEventsRequest(since_time=since, kind=kind, actor=actor, limit=AUDIT_PAGE)
    found: list[types_pb2.AuditEvent] = []
    truncated = False
    for page in range(AUDIT_SCAN_PAGES):
        reply = await client.call("ListAuditEvents", request)
        found = (found + [e for e in reply.events if subject in e.subject])[-limit:]
        if not reply.next_seq:
            break
        truncated = page == AUDIT_SCAN_PAGES - 1
        request = admin_pb2.ListAuditEventsRequest(since_seq=reply.next_seq, kind=kind, actor=actor, limit=AUDIT_PAGE)
    return {"events": [audit_json(e) for e in reversed(found)], "truncated": truncated}


async def verify_view(session: Session) -> Json:
    r = await session.client.call("VerifyAudit", admin_pb2.VerifyAuditRequest())
    anchored = f"; anchored up to event {r.anchored_seq}" if r.anchored_seq else ""
    if r.ok:
        message = (f"the audit chain is intact: {r.checked} event(s) and {r.records_checked} record(s) "
                   f"checked{anchored}")
    else:
        broken = f"broken at event {r.first_broken_seq}: " if r.first_broken_seq else ""
        failures = f"; {len(r.record_failures)} record(s) fail their MAC" if r.record_failures else ""
        message = f"the audit chain does NOT verify: {broken}{r.reason}{failures}"
    return {"ok": r.ok, "message": message, "checked": r.checked, "first_broken_seq": r.first_broken_seq or None,
            "records_checked": r.records_checked, "record_failures": list(r.record_failures),
            "anchored_seq": r.anchored_seq or None}
