"""Just-in-time access with four-eyes approval, end to end: operators logged in over real mTLS
request, approve, deny, break glass and review through the CLI; an approved grant reaches an
agent's sync stream as a time-bound allow rule and leaves it when revoked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import grpc

from tests.integration.harness import ServerProcess
from tests.integration.node_client import NodeClient
from tests.integration.operators_kit import Operator, add_operator, audit, one_line
from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.policy import Policy
from trustmesh.policy.wire import policy_from_pb

TD = "spiffe://example.org"
DEBUG, LEDGER = f"{TD}/ns/ops/debug", f"{TD}/ledger"


async def _policy_until(call: grpc.aio.StreamStreamCall, ok: Callable[[Policy], bool]) -> Policy:
    """Read the sync stream until it delivers a policy `ok` accepts (a test failure after 10 s)."""
    async def read() -> Policy:
        while True:
            message = await call.read()
            body = message.delta if message.WhichOneof("body") == "delta" else message.snapshot
            if body.HasField("policy") and ok(policy := policy_from_pb(body.policy)):
                return policy
    return await asyncio.wait_for(read(), 10)


def _request(person: Operator, *extra: str, source: str = DEBUG) -> str:
    result = person.run("access", "request", "--from", source, "--to", LEDGER, "--port", "5432",
                        "--for", "30m", "--reason", "INC-4711: reconcile the ledger", *extra)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0]) == 12, result.stdout  # one line: the request ID
    return lines[0]


def _grants(person: Operator, *flags: str) -> dict[str, dict[str, object]]:
    listed = person.run("access", "list", "--json", *flags)
    assert listed.returncode == 0, listed.stderr
    return {g["id"]: g for g in json.loads(listed.stdout)}


async def test_request_approve_enforce_revoke_and_break_glass(admin_server: tuple[ServerProcess, str, str],
                                                              tmp_path: Path) -> None:
    server = admin_server[0]
    alice = add_operator(admin_server, tmp_path, "alice", "viewer")
    bob = add_operator(admin_server, tmp_path, "bob", "security-officer")
    carol = add_operator(admin_server, tmp_path, "carol", "admin")
    dave = add_operator(admin_server, tmp_path, "dave", "security-officer")
    for person in (alice, bob, carol, dave):
        assert person.login().returncode == 0

    agent = NodeClient(server)
    await agent.attest(server.cli("token", "create", "--node", "node-1", check=True).stdout.strip())
    server.cli("entry", "create", "--spiffe-id", LEDGER, "--node", "node-1", "--selector", "unix:uid:1000",
               check=True)
    async with agent.channel() as channel:
        call = node_pb2_grpc.NodeStub(channel).Sync(node_pb2.SyncRequest())
        await _policy_until(call, lambda p: p.allowlists == ())

        # Any operator may ask; a viewer may not approve, nor may the requester, even an admin,
        # nor the person the access is for.
        request = _request(alice)
        assert _grants(alice)[request]["state"] == "pending"
        one_line(alice.run("access", "approve", request, "--otp", "000000"), 1, "does not hold a role")
        own = _request(carol)
        one_line(carol.run("access", "approve", own, "--otp", carol.code()), 1, "someone else must approve",
                 "PERMISSION_DENIED")
        for_bob = _request(alice, source=f"{TD}/operator/bob")
        one_line(bob.run("access", "approve", for_bob, "--otp", bob.code()), 1, "would be yours")
        # Approval is a step-up call: the certificate alone is not enough.
        one_line(bob.run("access", "approve", request), 1, "--otp")

        approved = bob.run("access", "approve", request, "--otp", bob.code())
        assert approved.returncode == 0 and "is allowed until 20" in approved.stdout, approved.stderr
        granted = await _policy_until(call, lambda p: any(a.name == f"access/{request}" for a in p.allowlists))
        (allowlist,) = [a for a in granted.allowlists if a.name == f"access/{request}"]
        (rule,) = allowlist.allow
        expires = _grants(bob)[request]["expires_at"]
        assert str(rule.source) == DEBUG and allowlist.ports == (5432,) and rule.expires is not None
        assert rule.expires == datetime.fromtimestamp(int(str(expires)), timezone.utc)  # lapses by itself

        # A grant outlives its approver's role; the disabled approver can approve nothing more.
        assert dave.run("access", "approve", own, "--otp", dave.code()).returncode == 0
        server.cli("operator", "disable", "dave", check=True)
        one_line(dave.run("access", "approve", for_bob, "--otp", "000000"), 1, "no longer valid")
        assert _grants(carol, "--state", "active")[own]["approvals"] == [f"{TD}/operator/dave"]

        # Break-glass: at once, flagged until someone else reviews it.
        one_line(bob.run("access", "break-glass", "--from", DEBUG, "--to", LEDGER, "--port", "22", "--for", "5m",
                         "--reason", "x", "--otp", "000000"), 1, "does not hold a role")
        glass = carol.run("access", "break-glass", "--from", DEBUG, "--to", LEDGER, "--port", "22", "--for", "5m",
                          "--reason", "INC-4712: ledger down", "--otp", carol.code())
        assert glass.returncode == 0 and "another operator must review it" in glass.stdout, glass.stderr
        glass_id = next(iter(_grants(carol, "--state", "review")))
        await _policy_until(call, lambda p: any(a.name == f"access/{glass_id}" for a in p.allowlists))
        one_line(carol.run("access", "review", glass_id), 1, "someone else must review")
        assert bob.run("access", "review", glass_id, "--note", "used as stated").returncode == 0
        assert _grants(bob, "--state", "review") == {}

        # Revoked: the agent stops allowing it; the other grants stay.
        assert bob.run("access", "revoke", request, "--reason", "incident closed").returncode == 0
        after = await _policy_until(call, lambda p: all(a.name != f"access/{request}" for a in p.allowlists))
        assert sorted(a.name for a in after.allowlists) == sorted([f"access/{glass_id}", f"access/{own}"])
        one_line(bob.run("access", "deny", request, "--reason", "late"), 1, "revoked, not pending")
        call.cancel()

    # The trail names the requester, the approver, the role used and where each call came from.
    (approval,) = [e for e in audit(server, "--actor", "bob", "--kind", "access.approve")
                   if e["outcome"] == "ok" and isinstance(e["details"], dict)
                   and e["details"]["request"] == request]
    details = approval["details"]
    assert isinstance(details, dict)
    assert details["requester"] == f"{TD}/operator/alice" and details["approver"] == f"{TD}/operator/bob"
    assert details["role"] == "security-officer" and str(details["source"]).startswith("127.0.0.1:")
    refused = [e for e in audit(server, "--actor", "carol", "--kind", "access.approve") if e["outcome"] == "denied"]
    assert len(refused) == 1
    assert [e["kind"] for e in audit(server, "--kind", "access.review")] == ["access.review", "access.review"]


def test_refusals_are_one_line(admin_server: tuple[ServerProcess, str, str]) -> None:
    server = admin_server[0]
    flags = ["--to", LEDGER, "--port", "5432", "--reason", "r"]
    one_line(server.cli("access", "request", "--from", "nope", *flags, "--for", "1m"), 1, "--from", "SPIFFE")
    one_line(server.cli("access", "request", "--from", DEBUG, *flags, "--for", "9h"), 1, "--access-max-grant")
    one_line(server.cli("access", "request", "--from", DEBUG, *flags, "--for", "soon"), 1, "--for")
    one_line(server.cli("access", "request", "--from", DEBUG, "--to", LEDGER, "--for", "1m"), 2, "--port")
    one_line(server.cli("access", "approve", "feedfacecafe"), 1, "no access request", "access list")
    one_line(server.cli("access", "list", "--state", "approved"), 2, "invalid choice")
