"""`trustmesh agent …`: run the node agent, and list, ban, evict or clear attested agents.

`agent run` (the node agent itself) lives in agent_run_cmd.py and is added here as one more
subcommand; the rest are admin calls over the server's admin socket.
"""

from __future__ import annotations

import argparse

from trustmesh._proto.trustmesh.v1 import admin_pb2, types_pb2
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call, message_dict, print_json
from trustmesh.cli.agent_run_cmd import add_run_subcommand
from trustmesh.cli.config import show_help
from trustmesh.clock import format_utc
from trustmesh.labels import LabelError, format_labels, parse_assignments

EXAMPLES = """\
examples:
  trustmesh agent list
  trustmesh agent ban node-7                               (same as spiffe://<td>/agent/node-7)
  trustmesh agent evict spiffe://example.org/agent/node-3  (the host was replaced; it may join again)
  trustmesh agent clear node-4                             (its suspected-clone mark was checked: a false alarm)
  trustmesh agent label node-7 zone=cde                    (entries with --node-selector zone=cde reach it)
  trustmesh agent unlabel node-7 zone                      (they are withdrawn from it)
"""

# The status column and the JSON "status" field: a ban first, then what the server concluded.
STATUSES = {
    types_pb2.AGENT_STATUS_UNSPECIFIED: "active",  # a server from before statuses existed
    types_pb2.AGENT_STATUS_ACTIVE: "active",
    types_pb2.AGENT_STATUS_SUSPECTED_CLONE: "suspected-clone",
}


def status_of(agent: types_pb2.AttestedNode) -> str:
    return "banned" if agent.banned else STATUSES.get(agent.status, "unknown")


def _agent_dict(agent: types_pb2.AttestedNode) -> dict[str, object]:
    data = message_dict(agent)
    data["status"] = status_of(agent)
    return data


def _list(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.ListAgents(admin_pb2.ListAgentsRequest(), timeout=TIMEOUT))
    if args.json:
        print_json([_agent_dict(a) for a in reply.agents])
        return 0
    if not reply.agents:
        print("no attested agents")
        return 0
    rows = [("AGENT", "NODE", "ATTESTATION", "SVID EXPIRES", "STATUS", "PERMISSIVE", "LABELS")]
    for a in reply.agents:
        rows.append((a.spiffe_id, a.node_name, a.attestation_type, format_utc(a.cert_not_after), status_of(a),
                     str(len(a.permissive_listeners)) if a.permissive_listeners else "-", _labels_text(a)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for a in reply.agents:
        if a.permissive_listeners:
            print(f"\n{a.node_name}: permissive inbound listeners (plaintext callers are forwarded without an "
                  f"identity; see `trustmesh flows --decision unverified`): {', '.join(a.permissive_listeners)}")
    for a in reply.agents:
        if a.status == types_pb2.AGENT_STATUS_SUSPECTED_CLONE:
            name = a.node_name
            print(f"\n{name}: suspected clone since {format_utc(a.status_changed_at)}: {a.status_reason}; "
                  f"ban it (`trustmesh agent ban {name}`) or, once checked, `trustmesh agent clear {name}`")
    return 0


def _labels_text(agent: types_pb2.AttestedNode) -> str:
    # attestation=<type> is in the ATTESTATION column already.
    shown = {k: v for k, v in agent.labels.items() if k != "attestation"}
    return format_labels(shown) if shown else "-"


def _label(args: argparse.Namespace) -> int:
    try:
        wanted = parse_assignments(args.labels)
    except LabelError as err:
        raise SystemExit(f"trustmesh agent label: {err}") from err
    return _relabel(args, admin_pb2.LabelAgentRequest(spiffe_id=args.agent, set=wanted))


def _unlabel(args: argparse.Namespace) -> int:
    return _relabel(args, admin_pb2.LabelAgentRequest(spiffe_id=args.agent, remove=args.keys))


def _relabel(args: argparse.Namespace, request: admin_pb2.LabelAgentRequest) -> int:
    reply = call(args, lambda s: s.LabelAgent(request, timeout=TIMEOUT))
    labels = format_labels(dict(reply.agent.labels))
    if reply.changed:
        print(f"{reply.agent.spiffe_id} labels: {labels}")
    else:
        print(f"{reply.agent.spiffe_id} labels unchanged: {labels}")
    return 0


def _ban(args: argparse.Namespace) -> int:
    call(args, lambda s: s.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=args.agent), timeout=TIMEOUT))
    print(f"banned {args.agent}: its streams are closed, every further call is refused, and it cannot join again")
    return 0


def _evict(args: argparse.Namespace) -> int:
    call(args, lambda s: s.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=args.agent), timeout=TIMEOUT))
    print(f"evicted {args.agent}: its SVID no longer works; the node can join again with a new join token")
    return 0


def _clear(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.ClearAgent(admin_pb2.ClearAgentRequest(spiffe_id=args.agent), timeout=TIMEOUT))
    agent, status = reply.agent.spiffe_id, status_of(reply.agent)
    if reply.cleared:
        print(f"cleared the suspected-clone mark of {agent}: status {status}")
    else:
        print(f"{agent} has no suspected-clone mark (status {status}): nothing to clear")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = commands.add_parser(
        "agent", help="run the node agent; list, ban, evict or clear attested agents",
        description="The node agent (`agent run`), and the control plane's view of attested agents.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = agent.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", title="subcommands")
    add_run_subcommand(sub)

    p = sub.add_parser("list", help="list attested agents (a table, or --json)",
                       description="List the agents that have attested, with their status: active, banned, or "
                                   "suspected-clone (one agent identity was seen from two addresses at once, so "
                                   "its key was probably copied; ban the agent or clear the mark).",
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
        ("clear", _clear, "clear an agent's suspected-clone mark",
         "Clear the suspected-clone mark the server set when it saw this agent's identity from two addresses "
         "at once (two connections, or a superseded SVID still in use elsewhere). Do it once the node is "
         "checked and the alarm was false (e.g. the host moved to a new address); the clear is audited. The "
         "second user was refused when it was seen; if the key was stolen, ban the agent instead. A ban is "
         "not cleared by this."),
    ):
        p = sub.add_parser(name, help=summary, description=text,
                           epilog=f"examples:\n  trustmesh agent {name} node-7\n"
                                  f"  trustmesh agent {name} spiffe://example.org/agent/node-7",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("agent", metavar="AGENT_ID",
                       help="the agent's SPIFFE ID (spiffe://<td>/agent/NODE) or just its node name")
        add_socket_flag(p)
        p.set_defaults(func=func)

    described = ("Labels say where a node is (zone=cde); entries created with --node-selector are issued only "
                 "to agents on nodes carrying all their labels, and withdrawn from a node that loses one. Only "
                 "the control plane sets labels (never the agent's configuration); each change is audited. The "
                 "key 'attestation' is the server's (attestation=join_token|x509pop).")
    p = sub.add_parser("label", help="set labels on an attested node", description=described,
                       epilog="examples:\n  trustmesh agent label node-7 zone=cde\n"
                              "  trustmesh agent label node-7 zone=cde bank.example/rack=r12",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("agent", metavar="AGENT_ID", help="the agent's SPIFFE ID or just its node name")
    p.add_argument("labels", metavar="KEY=VALUE", nargs="+", help="labels to set (a key already set is replaced)")
    add_socket_flag(p)
    p.set_defaults(func=_label)
    p = sub.add_parser("unlabel", help="remove labels from an attested node", description=described,
                       epilog="example:\n  trustmesh agent unlabel node-7 zone",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("agent", metavar="AGENT_ID", help="the agent's SPIFFE ID or just its node name")
    p.add_argument("keys", metavar="KEY", nargs="+", help="label keys to remove")
    add_socket_flag(p)
    p.set_defaults(func=_unlabel)
    agent.set_defaults(func=show_help(agent))
