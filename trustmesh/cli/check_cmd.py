"""`trustmesh check`: what a platform team must not forget, in one place: listeners that let
plaintext through, allowlists that do not enforce, agents that look copied, break-glass access
nobody reviewed. Read-only; exit 0 when there is nothing to report, 1 when there is."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import grpc

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call, print_json
from trustmesh.cli.config import invalid_as
from trustmesh.cli.policy_cmd import revision_policy

CLEAN, FINDINGS, INVALID = 0, 1, 2
UNVERIFIED_WINDOW = 24 * 3600


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str
    detail: str
    fix: str


def _policy_or_none(stub: admin_pb2_grpc.AdminStub) -> admin_pb2.PolicyRevision | None:
    """The policy in force; None before any was applied (default deny: nothing to report)."""
    try:
        reply: admin_pb2.GetPolicyResponse = stub.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=TIMEOUT)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return reply.policy


def _findings(args: argparse.Namespace) -> list[Finding]:
    found: list[Finding] = []
    agents = call(args, lambda s: s.ListAgents(admin_pb2.ListAgentsRequest(), timeout=TIMEOUT)).agents
    unverified = call(args, lambda s: s.ListFlows(admin_pb2.ListFlowsRequest(
        since=int(time.time()) - UNVERIFIED_WINDOW, decision="unverified"), timeout=TIMEOUT)).edges
    for agent in agents:
        for listener in agent.permissive_listeners:
            found.append(Finding(
                "permissive_listener", f"{agent.node_name}: {listener}",
                "forwards plaintext clients without an identity",
                "find them (`trustmesh flows --decision unverified`), give them identities, then set mtls: strict"))
        if agent.status == types_pb2.AGENT_STATUS_SUSPECTED_CLONE:
            found.append(Finding("suspected_clone", agent.spiffe_id, agent.status_reason,
                                 f"ban it (`trustmesh agent ban {agent.node_name}`) or, once checked, "
                                 f"`trustmesh agent clear {agent.node_name}`"))
    callers: dict[str, set[str]] = {}
    for edge in unverified:
        callers.setdefault(edge.destination, set()).add(edge.source_address)
    for destination, addresses in sorted(callers.items()):
        found.append(Finding("unverified_callers", destination,
                             f"{len(addresses)} plaintext caller address(es) in the last 24 h: "
                             f"{', '.join(sorted(addresses)[:5])}{' …' if len(addresses) > 5 else ''}",
                             "give these callers identities before the listener goes strict"))
    revision = call(args, _policy_or_none)
    for allowlist in revision_policy(revision).allowlists if revision is not None else ():
        if allowlist.mode == "audit":
            found.append(Finding("audit_mode", allowlist.name,
                                 f"covers {allowlist.destination} but denies nothing",
                                 "watch `trustmesh flows --decision audit`, then set mode: enforce "
                                 "(check first with `trustmesh policy simulate`)"))
    grants = call(args, lambda s: s.ListAccess(admin_pb2.ListAccessRequest(state="review"), timeout=TIMEOUT)).grants
    for grant in grants:
        found.append(Finding("break_glass_unreviewed", grant.id, f"break-glass access by {grant.requester}",
                             f"review it: `trustmesh access review {grant.id} --otp CODE` (not by its requester)"))
    return found


def _check(args: argparse.Namespace) -> int:
    found = _findings(args)
    if args.json:
        print_json([{"kind": f.kind, "subject": f.subject, "detail": f.detail, "fix": f.fix} for f in found])
    elif not found:
        print("nothing to report: no permissive listener, no audit-mode allowlist, no suspected clone, "
              "no break-glass access awaiting review")
    else:
        for f in found:
            print(f"{f.kind:<24} {f.subject}: {f.detail}\n{'':<24} fix: {f.fix}")
        print(f"{len(found)} finding(s)")
    return FINDINGS if found else CLEAN


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "check", help="what must not be forgotten: permissive listeners, audit-mode allowlists, suspected "
                      "clones, unreviewed break-glass access",
        description="Read-only posture check of the control plane: inbound listeners that forward plaintext "
                    "(mtls: permissive) and the unverified callers seen in the last 24 h, allowlists in audit "
                    "mode (they deny nothing), agents marked suspected-clone, break-glass grants nobody has "
                    "reviewed. Each finding says how to resolve it. Exit 0 when there is nothing to report, 1 "
                    "when there is, 2 when the check could not run.",
        epilog="examples:\n  trustmesh check\n  trustmesh check --json    # in a CI job or a cron alert",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the findings as a JSON array")
    add_socket_flag(p)
    p.set_defaults(func=invalid_as(INVALID, _check))  # 1 means findings: never an error
