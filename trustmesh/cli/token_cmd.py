"""`trustmesh token …`: one-time join tokens that let a new node's agent attest."""

from __future__ import annotations

import argparse

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.cli.admin_client import TIMEOUT, add_socket_flag, call
from trustmesh.cli.config import show_help
from trustmesh.duration import parse_duration
from trustmesh.errors import TrustmeshError


class TokenArgsError(TrustmeshError):
    """The command line itself is malformed."""


EXAMPLES = """\
examples:
  trustmesh token create --node node-1 --ttl 15m > join-token   # copy the file to node-1 (mode 0600)
  trustmesh agent run --join-token-file join-token --trust-bundle bundle.pem --server cp.internal:8081
"""


def _create(args: argparse.Namespace) -> int:
    try:
        ttl = int(parse_duration(args.ttl).total_seconds())
    except (ValueError, OverflowError) as err:  # the kernel's parser overflows on huge numbers
        raise TokenArgsError(f"--ttl {args.ttl!r}: {err}") from err
    if ttl <= 0:  # on the wire 0 means "the default", which is not what `--ttl 0` asks for
        raise TokenArgsError(f"--ttl {args.ttl!r}: a join token must live at least 1m")
    req = admin_pb2.CreateJoinTokenRequest(node_name=args.node, ttl_seconds=ttl)
    reply = call(args, lambda s: s.CreateJoinToken(req, timeout=TIMEOUT))
    print(reply.token)  # only the token on stdout, so scripts can capture it
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser(
        "token", help="create join tokens for new nodes",
        description="Join tokens let a new node's agent attest once. They are random (256 bits), single-use, "
                    "expire, and the server keeps only their SHA-256 hash.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = token.add_subparsers(dest="token_command", metavar="SUBCOMMAND", title="subcommands")
    p = sub.add_parser(
        "create", help="create a join token for a node; prints only the token",
        description="Create a join token for one node and print only the token. The node's agent becomes "
                    "spiffe://<td>/agent/NODE. A node that is attested already, or banned, gets no token "
                    "(evict a replaced host first with `trustmesh agent evict NODE`).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--node", required=True, metavar="NAME",
                   help="the node name: 1 to 128 letters, digits, '.', '_' or '-' (e.g. node-1)")
    p.add_argument("--ttl", default="10m", metavar="DURATION",
                   help="how long the token stays valid, 1m to 7d (default 10m)")
    add_socket_flag(p)
    p.set_defaults(func=_create)
    token.set_defaults(func=show_help(token))
