"""Just-in-time access with four-eyes approval.

Anyone who may use the admin API can ask for access: one source identity, one destination,
one port, for a bounded time, with a reason. People other than the requester approve
(`--access-approvers`, default 1) — the requester never can, whatever its roles. An approved
request becomes an allow rule that expires at the end of the grant: the registry view adds
it to the policy every agent receives (`grant_allowlists`), and the agents let it lapse by
itself, as they do any rule with `expires`. A request not approved within
`--access-approval-window` expires. Break-glass grants (admins only) are active at once and
stay flagged in `access list` until someone other than their requester records a review.
Every step is audited with the requester and the approver.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from trustmesh.clip import COMMENT, clip
from trustmesh.controlplane.registration import spiffe_id_arg
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import AccessGrant as AccessGrant  # re-exported: the API's value
from trustmesh.controlplane.store.records import AccessState as AccessState
from trustmesh.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, PermissionDeniedError
from trustmesh.policy.model import GRANT_ALLOWLIST_PREFIX, Allowlist, AllowRule, IdPattern
from trustmesh.spiffeid import SpiffeId

MIN_GRANT = timedelta(seconds=5)  # shorter than any real need; a demo shows a grant lapse
MAX_REASON = COMMENT
_ID = re.compile(r"[0-9a-f]{12}")  # secrets.token_hex(6)
REVIEW = "review"  # the `access list --state` of break-glass grants awaiting their review
STATES = tuple(s.value for s in AccessState) + (REVIEW,)


def grant_allowlists(grants: list[AccessGrant], now: float) -> tuple[Allowlist, ...]:
    """The allow rules of the grants in force at `now` (pure): one allowlist each, covering just
    its destination and port, whose one rule expires when the grant does."""
    return tuple(
        Allowlist(name=f"{GRANT_ALLOWLIST_PREFIX}{g.id}", destination=IdPattern.parse(str(g.destination)),
                  allow=(AllowRule(IdPattern.parse(str(g.source)),
                                   datetime.fromtimestamp(g.expires_at, timezone.utc)),),
                  ports=(g.port,), mode="enforce", owner="access")
        for g in sorted(grants, key=lambda g: g.id) if g.state_at(now) is AccessState.ACTIVE)


class AccessRequests:
    """Request, approve, deny, revoke, break glass, review; `actor` names who asked."""

    def __init__(self, rt: ServerRuntime) -> None:
        self._rt = rt

    def _checked(self, source: str, destination: str, port: int, seconds: int, reason: str) -> tuple[
            SpiffeId, SpiffeId, float]:
        src, dst = spiffe_id_arg(source, "--from"), spiffe_id_arg(destination, "--to")
        td = self._rt.config.trust_domain
        if dst.trust_domain != td or dst.is_trust_domain_id:
            raise InvalidArgumentError(f"--to {dst}: name a workload of this trust domain (spiffe://{td}/…); "
                                       "only its agents enforce grants")
        if src.is_trust_domain_id:
            raise InvalidArgumentError(f"--from {src} has no path: name one workload or operator")
        if not 0 < port < 65536:
            raise InvalidArgumentError(f"--port {port}: give a port from 1 to 65535")
        longest = self._rt.config.access_max_grant
        if not MIN_GRANT.total_seconds() <= seconds <= longest.total_seconds():
            raise InvalidArgumentError(f"--for must be between 5s and {_text(longest)} (the server's "
                                       "--access-max-grant)")
        if not reason.strip() or len(reason) > MAX_REASON:
            raise InvalidArgumentError(f"--reason is required (at most {MAX_REASON} characters): say why, for "
                                       "the approver and the auditors")
        return src, dst, float(seconds)

    async def request(self, source: str, destination: str, port: int, seconds: int, reason: str,
                      actor: str) -> AccessGrant:
        src, dst, duration = self._checked(source, destination, port, seconds, reason)
        now = self._rt.clock()
        grant = AccessGrant(
            id=secrets.token_hex(6), source=src, destination=dst, port=port, duration=duration, reason=reason,
            requester=actor, created_at=now, approve_by=now + self._rt.config.access_approval_window.total_seconds(),
            required_approvals=self._rt.config.access_approvers)
        grant = await self._rt.store.create_access_grant(grant)
        await self._rt.audit.record("access.request", actor=actor, subject=_subject(grant), request=grant.id,
                                    reason=clip(reason, MAX_REASON), duration=int(duration),
                                    approve_by=int(grant.approve_by))
        return grant

    def state_of(self, grant: AccessGrant) -> AccessState:
        return grant.state_at(self._rt.clock())

    async def get(self, grant_id: str) -> AccessGrant:
        gone = NotFoundError(f"no access request {grant_id[:40]!r}; `trustmesh access list` shows them")
        if not _ID.fullmatch(grant_id.strip()):
            raise gone  # never a store key built from arbitrary text
        try:
            return await self._rt.store.get_access_grant(grant_id.strip())
        except NotFoundError:
            raise gone from None

    async def approve(self, grant_id: str, actor: str) -> AccessGrant:
        grant = await self.get(grant_id)
        now = self._rt.clock()
        problem = ""
        if actor == grant.requester:
            problem = "you requested it: someone else must approve (four eyes), whatever your roles"
        elif actor == str(grant.source):
            problem = "the access would be yours: someone it does not benefit must approve (four eyes)"
        elif grant.state_at(now) is not AccessState.PENDING:
            problem = f"it is {grant.state_at(now)}, not pending"
        elif actor in grant.approvals:
            problem = "you approved it already; another person must"
        if problem:
            await self._rt.audit.record("access.approve", actor=actor, subject=_subject(grant), outcome="denied",
                                        request=grant.id, requester=grant.requester, reason=problem)
            raise (PermissionDeniedError if actor in (grant.requester, str(grant.source)) else FailedPreconditionError)(
                f"cannot approve access request {grant.id}: {problem}")
        approvals = (*grant.approvals, actor)
        done = len(approvals) >= grant.required_approvals
        grant = await self._rt.store.replace_access_grant(replace(
            grant, approvals=approvals, state=AccessState.ACTIVE if done else AccessState.PENDING,
            starts_at=now if done else 0.0, expires_at=now + grant.duration if done else 0.0))
        await self._rt.audit.record("access.approve", actor=actor, subject=_subject(grant), request=grant.id,
                                    requester=grant.requester, approver=actor, approvals=len(approvals),
                                    required=grant.required_approvals, state=grant.state.value,
                                    expires_at=int(grant.expires_at))
        return grant

    async def deny(self, grant_id: str, reason: str, actor: str) -> AccessGrant:
        return await self._end(grant_id, AccessState.DENIED, (AccessState.PENDING,), reason, actor,
                               "not pending; `access revoke` ends an active grant")

    async def revoke(self, grant_id: str, reason: str, actor: str) -> AccessGrant:
        return await self._end(grant_id, AccessState.REVOKED, (AccessState.ACTIVE, AccessState.PENDING), reason,
                               actor, "nothing to revoke")

    async def _end(self, grant_id: str, state: AccessState, from_states: tuple[AccessState, ...], reason: str,
                   actor: str, otherwise: str) -> AccessGrant:
        """Deny or revoke: record who ended the request and why, and audit it."""
        if len(reason) > MAX_REASON:
            raise InvalidArgumentError(f"--reason is longer than {MAX_REASON} characters")
        grant = await self.get(grant_id)
        now = self.state_of(grant)
        if now not in from_states:
            raise FailedPreconditionError(f"access request {grant.id} is {now}, {otherwise}")
        grant = await self._rt.store.replace_access_grant(replace(grant, state=state, decided_by=actor,
                                                                 decision_reason=reason))
        kind = "access.deny" if state is AccessState.DENIED else "access.revoke"
        await self._rt.audit.record(kind, actor=actor, subject=_subject(grant), request=grant.id,
                                    requester=grant.requester, reason=clip(reason, MAX_REASON))
        return grant

    async def break_glass(self, source: str, destination: str, port: int, seconds: int, reason: str,
                          actor: str) -> AccessGrant:
        src, dst, duration = self._checked(source, destination, port, seconds, reason)
        now = self._rt.clock()
        grant = await self._rt.store.create_access_grant(AccessGrant(
            id=secrets.token_hex(6), source=src, destination=dst, port=port, duration=duration, reason=reason,
            requester=actor, created_at=now, approve_by=now, state=AccessState.ACTIVE, starts_at=now,
            expires_at=now + duration, break_glass=True))
        await self._rt.audit.record("access.break_glass", actor=actor, subject=_subject(grant), request=grant.id,
                                    reason=clip(reason, MAX_REASON), expires_at=int(grant.expires_at),
                                    review="required")
        return grant

    async def review(self, grant_id: str, note: str, actor: str) -> AccessGrant:
        grant = await self.get(grant_id)
        if not grant.break_glass:
            raise FailedPreconditionError(f"access request {grant.id} is not a break-glass grant; nothing to review")
        if grant.reviewed_by:
            raise FailedPreconditionError(f"break-glass grant {grant.id} was reviewed already by {grant.reviewed_by}")
        if actor == grant.requester:
            await self._rt.audit.record("access.review", actor=actor, subject=_subject(grant), outcome="denied",
                                        request=grant.id, reason="the requester may not review its own break-glass")
            raise PermissionDeniedError(f"cannot review break-glass grant {grant.id}: you used it; someone else "
                                        "must review it")
        grant = await self._rt.store.replace_access_grant(replace(
            grant, reviewed_by=actor, reviewed_at=self._rt.clock(), decision_reason=note or grant.decision_reason))
        await self._rt.audit.record("access.review", actor=actor, subject=_subject(grant), request=grant.id,
                                    requester=grant.requester, note=clip(note, MAX_REASON))
        return grant

    async def list(self, state: str = "") -> list[AccessGrant]:
        if state and state not in STATES:
            raise InvalidArgumentError(f"--state {state[:40]!r}: one of {', '.join(STATES)}")
        now = self._rt.clock()
        grants = sorted(await self._rt.store.list_access_grants(), key=lambda g: (g.created_at, g.id))
        if state == REVIEW:
            return [g for g in grants if g.break_glass and not g.reviewed_by]
        return [g for g in grants if not state or g.state_at(now).value == state]


def _subject(grant: AccessGrant) -> str:
    return f"{grant.source} -> {grant.destination}:{grant.port}"


def _text(span: timedelta) -> str:
    hours, rest = divmod(int(span.total_seconds()), 3600)
    return f"{hours}h" + (f"{rest // 60}m" if rest >= 60 else "")


__all__ = ["STATES", "AccessGrant", "AccessRequests", "AccessState", "grant_allowlists"]
