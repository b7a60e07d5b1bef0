"""`trustmesh`: one command for the control plane, the node agent and the platform teams.

Each subcommand lives in its own module and registers itself on the parser; this module
only wires them, sets up logging and turns trustmesh errors into a message and exit 1.

The command modules are imported when the parser is built, not with this module: gRPC core
reads its logging settings when grpc is first imported, and `main` sets them first.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from trustmesh import __version__
from trustmesh.errors import TrustmeshError
from trustmesh.logs import setup_logging

LOG_LEVELS = ["debug", "info", "warning", "error"]
DEBUG_ENV = "TRUSTMESH_DEBUG"
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): a bug in trustmesh, not in what it was asked
EXIT_PIPE = 141  # what a shell reports for a command ended by SIGPIPE, as `cat` is under `| head`

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
  trustmesh flows --since 7d; trustmesh graph --format dot | dot -Tsvg > mesh.svg
      who talks to whom, from what the agents saw (before you write an allowlist)
  trustmesh policy suggest --since 7d proposed/
      allowlists (audit mode) that allow exactly the observed traffic
  trustmesh audit show --since 1h
      every attestation, issuance, admin change and refusal of the last hour
  trustmesh audit verify
      check that no audit event was edited, removed or reordered
  trustmesh ca show
      the root, signing CAs and JWT keys with their rotation states

run `trustmesh COMMAND --help` for the options of each command.
"""


def quiet_grpc_core(argv: Sequence[str]) -> None:
    """Keep gRPC core's own stderr lines (handshake failures, "All log messages before
    absl::InitializeLog() ...") out of our structured log, unless `--log-level debug`: each
    failure they describe is reported once, as an event that says what to do. Must run
    before grpc is imported."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--log-level", default="info")
    known, _ = early.parse_known_args(argv)
    if known.log_level == "debug":
        return
    os.environ["GRPC_VERBOSITY"] = "NONE"
    os.environ["GRPC_TRACE"] = ""


class CommandParser(argparse.ArgumentParser):
    """argparse with usage errors on one line, like every other error (the usage text is one
    `--help` away). Subcommand parsers are made of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from trustmesh.cli import (
        access_cmd,
        agents_cmd,
        audit_cmd,
        ca_cmd,
        check_cmd,
        detect_cmd,
        entry_cmd,
        federation_cmd,
        flows_cmd,
        operator_cmd,
        partner_cmd,
        policy_cmd,
        quarantine_cmd,
        server_cmd,
        token_cmd,
    )

    parser: argparse.ArgumentParser = CommandParser(
        prog="trustmesh",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trustmesh {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="how much to log to stderr (default: info; debug also lets gRPC core log)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    server_cmd.register(commands)
    token_cmd.register(commands)
    entry_cmd.register(commands)
    agents_cmd.register(commands)
    policy_cmd.register(commands)
    flows_cmd.register(commands)
    check_cmd.register(commands)
    detect_cmd.register(commands)
    audit_cmd.register(commands)
    ca_cmd.register(commands)
    federation_cmd.register(commands)
    partner_cmd.register(commands)
    operator_cmd.register(commands)
    access_cmd.register(commands)
    quarantine_cmd.register(commands)
    version = commands.add_parser("version", help="print the trustmesh version")
    version.set_defaults(func=lambda _args: print(f"trustmesh {__version__}") or 0)
    return parser


def one_line(message: object) -> str:
    """Any message as one line: errors quote files, servers and libraries whose text may span lines."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _stdout_gone() -> int:
    """The reader of our output went away (`trustmesh audit show | head -1`): stop quietly, as
    `cat` does. Whatever is still buffered has nowhere to go; stdout is pointed at /dev/null so
    the interpreter's final flush cannot report the broken pipe ("Exception ignored ...")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        quiet_grpc_core(sys.argv[1:] if argv is None else argv)
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        setup_logging(args.log_level)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is seen below
        return code
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        # argparse ends --help, --version and usage errors so; their output may meet a closed pipe too.
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_gone()
        raise
    except Exception as err:  # noqa: BLE001 - each error is reported by kind below, unexpected ones last
        return _report(err)


def _report(err: Exception) -> int:
    """One line on stderr for `err`, and the exit status."""
    leaf: BaseException = err
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]  # a task group's one failure
    if isinstance(leaf, TrustmeshError):
        print(f"trustmesh: error: {one_line(leaf)}", file=sys.stderr)
        return 1
    if isinstance(leaf, BrokenPipeError):
        return _stdout_gone()
    # The last resort: every error a person can cause has its own message above; this is a bug.
    if os.environ.get(DEBUG_ENV):
        raise err
    print(f"trustmesh: internal error: {type(leaf).__name__}: {one_line(leaf)} "
          f"(run with {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
