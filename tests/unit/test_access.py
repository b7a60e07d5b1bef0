"""Just-in-time access against a real SQLite store and audit log, with a clock the test moves:
four eyes, approval windows, grants lapsing, break-glass reviews, and the allow rules a grant
becomes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.unit.server_runtime import Clock, audit_events, server_runtime
from trustmesh.controlplane.access import AccessRequests, AccessState, grant_allowlists
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, PermissionDeniedError
from trustmesh.policy import Policy
from trustmesh.spiffeid import SpiffeId

ALICE = "spiffe://example.org/operator/alice"
BOB = "spiffe://example.org/operator/bob"
CAROL = "spiffe://example.org/operator/carol"
DEBUG = "spiffe://example.org/ns/ops/debug"
LEDGER = "spiffe://example.org/ledger"


@pytest.fixture
def clock() -> Clock:
    return Clock(1_000_000.0)


@pytest.fixture
async def runtime(tmp_path: Path, clock: Clock) -> AsyncIterator[ServerRuntime]:
    async with server_runtime(tmp_path, clock) as rt:
        yield rt


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


async def test_request_then_approval_by_another_person(runtime: ServerRuntime, clock: Clock) -> None:
    access = AccessRequests(runtime)
    grant = await access.request(DEBUG, LEDGER, 5432, 1800, "INC-1: reconcile", ALICE)
    assert access.state_of(grant) is AccessState.PENDING and grant.approve_by == clock.now + 3600
    assert grant_allowlists([grant], clock.now) == ()  # pending: allows nothing

    with pytest.raises(PermissionDeniedError, match="someone else must approve"):
        await access.approve(grant.id, ALICE)
    refused = await audit_events(runtime, "access.approve")
    assert refused[-1].outcome == "denied" and refused[-1].actor == ALICE

    clock.now += 60
    approved = await access.approve(grant.id, BOB)
    assert approved.state is AccessState.ACTIVE and approved.expires_at == clock.now + 1800
    event = (await audit_events(runtime, "access.approve"))[-1]
    assert event.outcome == "ok" and event.details["requester"] == ALICE and event.details["approver"] == BOB

    (allowlist,) = grant_allowlists([approved], clock.now)
    assert allowlist.name == f"access/{grant.id}" and allowlist.ports == (5432,)
    policy = Policy(allowlists=(allowlist,))
    assert policy.decide(SpiffeId.parse(DEBUG), SpiffeId.parse(LEDGER), 5432, at(clock.now)).allowed
    assert not policy.decide(SpiffeId.parse(DEBUG), SpiffeId.parse(LEDGER), 22, at(clock.now)).allowed
    assert not policy.decide(SpiffeId.parse(CAROL), SpiffeId.parse(LEDGER), 5432, at(clock.now)).allowed
    # The rule lapses by itself at the grant's end, at the agents as in the view.
    lapsed = policy.decide(SpiffeId.parse(DEBUG), SpiffeId.parse(LEDGER), 5432, at(approved.expires_at))
    assert not lapsed.allowed and "expired" in lapsed.reason

    clock.now = approved.expires_at
    assert access.state_of(await access.get(grant.id)) is AccessState.EXPIRED
    assert grant_allowlists([approved], clock.now) == ()
    assert [g.id for g in await access.list("expired")] == [grant.id]


async def test_four_eyes_hold_for_admins_beneficiaries_and_double_approvals(runtime: ServerRuntime) -> None:
    runtime = replace(runtime, config=replace(runtime.config, access_approvers=2))
    access = AccessRequests(runtime)
    mine = await access.request(ALICE, LEDGER, 5432, 600, "look at a row", CAROL)
    with pytest.raises(PermissionDeniedError, match="would be yours"):
        await access.approve(mine.id, ALICE)  # the grant is for alice: she may not approve it
    grant = await access.request(DEBUG, LEDGER, 5432, 600, "two approvers", ALICE)
    once = await access.approve(grant.id, BOB)
    assert once.state is AccessState.PENDING and once.approvals == (BOB,)
    with pytest.raises(FailedPreconditionError, match="approved it already"):
        await access.approve(grant.id, BOB)
    twice = await access.approve(grant.id, CAROL)
    assert twice.state is AccessState.ACTIVE and twice.approvals == (BOB, CAROL)
    with pytest.raises(FailedPreconditionError, match="not pending"):
        await access.approve(grant.id, "local-root (uid 0)")


async def test_an_unapproved_request_expires(runtime: ServerRuntime, clock: Clock) -> None:
    access = AccessRequests(runtime)
    grant = await access.request(DEBUG, LEDGER, 5432, 600, "later", ALICE)
    clock.now = grant.approve_by
    with pytest.raises(FailedPreconditionError, match="expired, not pending"):
        await access.approve(grant.id, BOB)
    assert [g.id for g in await access.list("expired")] == [grant.id]
    assert await access.list("pending") == []


async def test_deny_and_revoke(runtime: ServerRuntime, clock: Clock) -> None:
    access = AccessRequests(runtime)
    denied = await access.deny((await access.request(DEBUG, LEDGER, 1, 60, "x", ALICE)).id, "no", BOB)
    assert denied.state is AccessState.DENIED and denied.decided_by == BOB
    with pytest.raises(FailedPreconditionError, match="denied, not pending"):
        await access.approve(denied.id, BOB)
    active = await access.approve((await access.request(DEBUG, LEDGER, 1, 60, "y", ALICE)).id, BOB)
    revoked = await access.revoke(active.id, "done", BOB)
    assert revoked.state is AccessState.REVOKED and grant_allowlists([revoked], clock.now) == ()
    with pytest.raises(FailedPreconditionError, match="nothing to revoke"):
        await access.revoke(active.id, "again", BOB)
    assert (await audit_events(runtime, "access.revoke"))[-1].details["requester"] == ALICE


async def test_break_glass_is_active_at_once_and_awaits_a_review_by_someone_else(runtime: ServerRuntime,
                                                                                  clock: Clock) -> None:
    access = AccessRequests(runtime)
    grant = await access.break_glass(DEBUG, LEDGER, 5432, 900, "INC-2: ledger down", ALICE)
    assert access.state_of(grant) is AccessState.ACTIVE and grant.expires_at == clock.now + 900
    assert len(grant_allowlists([grant], clock.now)) == 1
    assert [g.id for g in await access.list("review")] == [grant.id]
    with pytest.raises(PermissionDeniedError, match="someone else must review"):
        await access.review(grant.id, "fine", ALICE)
    reviewed = await access.review(grant.id, "used as stated", BOB)
    assert reviewed.reviewed_by == BOB and await access.list("review") == []
    with pytest.raises(FailedPreconditionError, match="reviewed already"):
        await access.review(grant.id, "again", CAROL)
    normal = await access.request(DEBUG, LEDGER, 5432, 60, "x", ALICE)
    with pytest.raises(FailedPreconditionError, match="not a break-glass"):
        await access.review(normal.id, "", BOB)
    assert (await audit_events(runtime, "access.break_glass"))[0].details["review"] == "required"


@pytest.mark.parametrize(("source", "destination", "port", "seconds", "reason", "words"), [
    ("not-an-id", LEDGER, 1, 60, "r", "--from"),
    (DEBUG, "spiffe://other.org/ledger", 1, 60, "r", "--to"),
    (DEBUG, "spiffe://example.org", 1, 60, "r", "--to"),
    ("spiffe://example.org", LEDGER, 1, 60, "r", "--from"),
    (DEBUG, LEDGER, 0, 60, "r", "--port"),
    (DEBUG, LEDGER, 65536, 60, "r", "--port"),
    (DEBUG, LEDGER, 1, 4, "r", "--for"),
    (DEBUG, LEDGER, 1, int(timedelta(hours=8, seconds=1).total_seconds()), "r", "--access-max-grant"),
    (DEBUG, LEDGER, 1, 60, "  ", "--reason"),
    (DEBUG, LEDGER, 1, 60, "x" * 10_000, "--reason"),
])
async def test_bad_requests_are_refused_before_anything_is_stored(runtime: ServerRuntime, source: str,
                                                                  destination: str, port: int, seconds: int,
                                                                  reason: str, words: str) -> None:
    access = AccessRequests(runtime)
    with pytest.raises(InvalidArgumentError, match=words):
        await access.request(source, destination, port, seconds, reason, ALICE)
    with pytest.raises(InvalidArgumentError, match=words):
        await access.break_glass(source, destination, port, seconds, reason, ALICE)
    assert await access.list() == []


async def test_unknown_ids_and_states(runtime: ServerRuntime) -> None:
    access = AccessRequests(runtime)
    with pytest.raises(NotFoundError, match="access list"):
        await access.approve("0123456789ab", BOB)
    for hostile in ("../operators/alice", "", "0123456789AB", "0123456789ab/x"):
        with pytest.raises(NotFoundError):
            await access.revoke(hostile, "", BOB)
    with pytest.raises(InvalidArgumentError, match="--state"):
        await access.list("approved")
