"""`trustmesh agent …`: run the node agent, and list, ban or evict attested agents."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from google.protobuf.json_format import MessageToDict

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call, print_json


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "-"


def _list(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.ListAgents(admin_pb2.ListAgentsRequest(), timeout=TIMEOUT))
    if args.json:
        print_json([MessageToDict(a, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                    for a in reply.agents])
        return 0
    if not reply.agents:
        print("no attested agents")
        return 0
    rows = [("AGENT", "NODE", "ATTESTATION", "SVID EXPIRES", "STATUS")]
    for a in reply.agents:
        rows.append((a.spiffe_id, a.node_name, a.attestation_type, _when(a.cert_not_after),
                     "banned" if a.banned else "active"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def _ban(args: argparse.Namespace) -> int:
    call(args, lambda s: s.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=args.agent), timeout=TIMEOUT))
    print(f"banned {args.agent}: its streams are closed and every further call is refused")
    return 0


def _evict(args: argparse.Namespace) -> int:
    call(args, lambda s: s.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=args.agent), timeout=TIMEOUT))
    print(f"evicted {args.agent}: it must attest again with a new join token")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    agent = commands.add_parser("agent", help="run the node agent; list, ban or evict attested agents",
                                description="The node agent, and the control plane's view of attested agents.")
    sub = agent.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", title="subcommands")
    try:
        from trustmesh.cli.agent_run_cmd import add_run_subcommand
    except ImportError:  # the agent run command lands with the node-agent issue
        pass
    else:
        add_run_subcommand(sub)

    p = sub.add_parser("list", help="list attested agents")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_socket_flag(p)
    p.set_defaults(func=_list)

    for name, func, text in (
        ("ban", _ban, "cut an agent off at once and for good: its streams close, every call is refused, "
                      "and its node name cannot join again"),
        ("evict", _evict, "forget an agent so the node can attest again with a new join token"),
    ):
        p = sub.add_parser(name, help=text.split(":")[0], description=text)
        p.add_argument("agent", help="the agent's SPIFFE ID (spiffe://<td>/agent/NODE) or just its node name")
        add_socket_flag(p)
        p.set_defaults(func=func)
    agent.set_defaults(func=lambda _a: agent.print_help() or 2)
