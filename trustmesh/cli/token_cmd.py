"""`trustmesh token …`: one-time join tokens that let a new node's agent attest."""

from __future__ import annotations

import argparse

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call
from trustmesh.duration import parse_duration
from trustmesh.errors import TrustmeshError


class TokenArgsError(TrustmeshError):
    pass


def _create(args: argparse.Namespace) -> int:
    try:
        ttl = int(parse_duration(args.ttl).total_seconds())
    except ValueError as err:
        raise TokenArgsError(f"--ttl: {err}") from err
    req = admin_pb2.CreateJoinTokenRequest(node_name=args.node, ttl_seconds=ttl)
    reply = call(args, lambda s: s.CreateJoinToken(req, timeout=TIMEOUT))
    print(reply.token)  # only the token on stdout, so scripts can capture it
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    token = commands.add_parser("token", help="create join tokens for new nodes",
                                description="Join tokens are single-use, expire, and are stored only hashed.")
    sub = token.add_subparsers(dest="token_command", metavar="SUBCOMMAND", title="subcommands")
    p = sub.add_parser(
        "create", help="create a join token for a node; prints only the token",
        epilog="example:\n  TOKEN=$(trustmesh token create --node node-1 --ttl 15m)\n"
               "  trustmesh agent run --join-token \"$TOKEN\" --trust-bundle bundle.pem --server cp:8081",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--node", required=True, help="the node name; its agent becomes spiffe://<td>/agent/NODE")
    p.add_argument("--ttl", default="10m", help="how long the token stays valid, 1m to 7d (default 10m)")
    add_socket_flag(p)
    p.set_defaults(func=_create)
    token.set_defaults(func=lambda _a: token.print_help() or 2)
