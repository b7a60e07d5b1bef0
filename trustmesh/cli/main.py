"""`trustmesh`: one command for the control plane, the node agent and the platform teams.

Each subcommand lives in its own module and registers itself on the parser; this module
only wires them, sets up logging and turns trustmesh errors into a message and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trustmesh import __version__
from trustmesh.cli import (
    agents_cmd,
    audit_cmd,
    ca_cmd,
    entry_cmd,
    federation_cmd,
    partner_cmd,
    policy_cmd,
    server_cmd,
    token_cmd,
)
from trustmesh.errors import TrustmeshError
from trustmesh.logs import setup_logging

DESCRIPTION = """\
trustmesh issues short-lived SPIFFE identities (X.509 and JWT SVIDs) to workloads through
node agents, and enforces service-to-service allowlists declared as code.
"""

EPILOG = """\
examples:
  trustmesh server run --trust-domain example.org
      start a control plane on the embedded SQLite store in ./.trustmesh/server
  trustmesh token create --node node-1
      a one-time join token for the agent on node-1
  trustmesh entry create --spiffe-id spiffe://example.org/ledger --node node-1 --selector unix:uid:1001
      let processes of uid 1001 on node-1 obtain spiffe://example.org/ledger
  trustmesh agent list
      the attested agents; `trustmesh agent ban node-7` cuts one off for good
  trustmesh policy test policies/ --from spiffe://example.org/payments --to spiffe://example.org/ledger
      would payments reach the ledger under these allowlists? (exit 0 allow, 1 deny)
  trustmesh audit show --since 1h
      every attestation, issuance, admin change and refusal of the last hour
  trustmesh audit verify
      check that no audit event was edited, removed or reordered
  trustmesh ca show
      the root, signing CAs and JWT keys with their rotation states

run `trustmesh COMMAND --help` for the options of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trustmesh",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trustmesh {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log to stderr (default: info)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    server_cmd.register(commands)
    token_cmd.register(commands)
    entry_cmd.register(commands)
    agents_cmd.register(commands)
    policy_cmd.register(commands)
    audit_cmd.register(commands)
    ca_cmd.register(commands)
    federation_cmd.register(commands)
    partner_cmd.register(commands)
    version = commands.add_parser("version", help="print the trustmesh version")
    version.set_defaults(func=lambda _args: print(f"trustmesh {__version__}") or 0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except TrustmeshError as err:
        print(f"trustmesh: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
