"""`trustmesh agent run`: the node agent."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trustmesh.agent.config import TOKEN_ENV
from trustmesh.cli.config import ConfigError, HelpFormatter, add_options, build, resolve

__all__ = ["TOKEN_ENV", "add_run_subcommand"]

EXAMPLES = """\
examples:
  # first start on a new node: attest with a one-time token, kept off the command line
  trustmesh token create --node node-1 > /etc/trustmesh/join-token   # on the control plane; copy it over
  trustmesh agent run --server cp.internal:8081 --trust-bundle bundle.pem \\
      --join-token-file /etc/trustmesh/join-token
  # every later start re-attaches with the identity kept in --data-dir
  trustmesh agent run --server cp.internal:8081 --trust-bundle bundle.pem
  # two control-plane replicas, tried in turn; options from a file (flags win over it)
  trustmesh agent run --config /etc/trustmesh/agent.yaml --server cp1:8081 --server cp2:8081
  # attest with a node certificate instead of a token (x509pop)
  trustmesh agent run --server cp.internal:8081 --trust-bundle bundle.pem \\
      --x509pop-cert /etc/ssl/node.pem --x509pop-key /etc/ssl/node.key
  # workloads find the Workload API through
  export SPIFFE_ENDPOINT_SOCKET=unix://$PWD/.trustmesh/agent/workload.sock
"""


def add_run_subcommand(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from trustmesh.agent.config import AgentConfig

    run = sub.add_parser(
        "run", help="run the node agent beside the services of this host",
        description=("Attest this node (once), keep the agent identity in --data-dir, serve the SPIFFE "
                     "Workload API on a unix socket, rotate every SVID before it expires, and enforce the "
                     "allowlists for the services declared under `services:` in the config file. Every option "
                     "can also be set in a YAML file given with --config; flags win over the file."),
        epilog=EXAMPLES, formatter_class=HelpFormatter,
    )
    add_options(run, AgentConfig)
    run.set_defaults(func=_run)


def _join_token(values: Mapping[str, Any]) -> str | None:
    """The token from --join-token, else --join-token-file, else $TRUSTMESH_JOIN_TOKEN.

    A token file that does not exist is not an error: on a node that attested before, the
    agent starts from the identity in its data directory and needs no token; on a node
    that did not, attestation fails with a message that says to create one.
    """
    if values.get("join_token"):
        return str(values["join_token"]).strip()
    if values.get("join_token_file"):
        path = Path(values["join_token_file"]).expanduser()
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ConfigError(f"--join-token-file {path}: {err.strerror}") from err
    return os.environ.get(TOKEN_ENV, "").strip() or None


ARGV_TOKEN_WARNING = (
    "warning: --join-token puts the token on the command line, where every local user can read it "
    f"(/proc/PID/cmdline) until it is used; pass it with --join-token-file FILE or ${TOKEN_ENV}")


def _build_config(args: argparse.Namespace) -> Any:
    from trustmesh.agent.config import AgentConfig

    if getattr(args, "join_token", None):
        print(ARGV_TOKEN_WARNING, file=sys.stderr)
    values = resolve(AgentConfig, args, args.config)
    values["join_token"] = _join_token(values)
    return build(AgentConfig, values)


def _run(args: argparse.Namespace) -> int:
    from trustmesh.agent.agent import run_agent

    asyncio.run(run_agent(_build_config(args)))
    return 0
