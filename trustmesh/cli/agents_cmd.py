"""`trustmesh agent …`: run the node agent, and list, ban or evict attested agents.

`agent run` (the node agent itself) lives in agent_run_cmd.py and is added here as one more
subcommand; the rest are admin calls over the server's admin socket.
"""

from __future__ import annotations

import argparse

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call, message_dict, print_json
from trustmesh.cli.agent_run_cmd import add_run_subcommand
from trustmesh.cli.config import show_help
from trustmesh.clock import format_utc

EXAMPLES = """\
examples:
  trustmesh agent list
  trustmesh agent ban node-7                               (same as spiffe://<td>/agent/node-7)
  trustmesh agent evict spiffe://example.org/agent/node-3  (the host was replaced; it may join again)
"""


def _list(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.ListAgents(admin_pb2.ListAgentsRequest(), timeout=TIMEOUT))
    if args.json:
        print_json([message_dict(a) for a in reply.agents])
        return 0
    if not reply.agents:
        print("no attested agents")
        return 0
    rows = [("AGENT", "NODE", "ATTESTATION", "SVID EXPIRES", "STATUS")]
    for a in reply.agents:
        rows.append((a.spiffe_id, a.node_name, a.attestation_type, format_utc(a.cert_not_after),
                     "banned" if a.banned else "active"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _ban(args: argparse.Namespace) -> int:
    call(args, lambda s: s.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=args.agent), timeout=TIMEOUT))
    print(f"banned {args.agent}: its streams are closed, every further call is refused, and it cannot join again")
    return 0


def _evict(args: argparse.Namespace) -> int:
    call(args, lambda s: s.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=args.agent), timeout=TIMEOUT))
    print(f"evicted {args.agent}: its SVID no longer works; the node can join again with a new join token")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = commands.add_parser(
        "agent", help="run the node agent; list, ban or evict attested agents",
        description="The node agent (`agent run`), and the control plane's view of attested agents.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = agent.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", title="subcommands")
    add_run_subcommand(sub)

    p = sub.add_parser("list", help="list attested agents (a table, or --json)",
                       description="List the agents that have attested, with their status.",
                       epilog="example:\n  trustmesh agent list --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    add_socket_flag(p)
    p.set_defaults(func=_list)

    for name, func, summary, text in (
        ("ban", _ban, "cut an agent off at once and for good",
         "Ban an agent: its open streams close at once, every later call is refused, and its node name "
         "can never attest again (join tokens for it are refused). The record stays, so a ban cannot be "
         "undone by evicting."),
        ("evict", _evict, "forget an agent so its node can join again",
         "Evict an agent: its SVID stops working at once and the node may attest again with a new join "
         "token (e.g. after the host was rebuilt). A banned agent cannot be evicted."),
    ):
        p = sub.add_parser(name, help=summary, description=text,
                           epilog=f"examples:\n  trustmesh agent {name} node-7\n"
                                  f"  trustmesh agent {name} spiffe://example.org/agent/node-7",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("agent", metavar="AGENT_ID",
                       help="the agent's SPIFFE ID (spiffe://<td>/agent/NODE) or just its node name")
        add_socket_flag(p)
        p.set_defaults(func=func)
    agent.set_defaults(func=show_help(agent))
