"""`trustmesh server …`: run the control plane.

The options of `server run` are the fields of ``ServerConfig`` (controlplane/config.py), declared
there once; this module only adds them to the parser and loads them back.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from trustmesh.cli.config import HelpFormatter, add_options, load_config, show_help

EXAMPLES = """\
examples:
  # a single control plane on the embedded SQLite store in ./.trustmesh/server
  trustmesh server run --trust-domain example.org
  # options from a file (flags win over it)
  trustmesh server run --config /etc/trustmesh/server.yaml
  # one of several replicas sharing an etcd cluster (over TLS, with a client certificate)
  # and one key-encryption key
  trustmesh server run --trust-domain example.org --store etcd+https://10.0.0.11:2379,10.0.0.12:2379/trustmesh \\
      --etcd-ca /etc/trustmesh/etcd/ca.pem --etcd-cert /etc/trustmesh/etcd/trustmesh.pem \\
      --etcd-key /etc/trustmesh/etcd/trustmesh-key.pem \\
      --kek-file /etc/trustmesh/kek.bin --bind 0.0.0.0:8081 --attest-bind 0.0.0.0:8082
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from trustmesh.controlplane.config import ServerConfig  # the composition root may import both sides

    server = commands.add_parser(
        "server",
        help="run the control plane (certificate authority and registry)",
        description="Run and inspect the trustmesh control plane.",
    )
    sub = server.add_subparsers(dest="server_command", metavar="SUBCOMMAND", title="subcommands")
    run = sub.add_parser(
        "run",
        help="start the control plane and serve until SIGTERM",
        description=(
            "Start the control plane: load or create the CA (keys encrypted at rest under the "
            "key-encryption key), write <data-dir>/bundle.pem for agents to bootstrap from, "
            "log `ready`, and serve until SIGTERM or Ctrl-C. Every option can also be set in "
            "a YAML file given with --config; flags win over the file."
        ),
        epilog=EXAMPLES, formatter_class=HelpFormatter,
    )
    add_options(run, ServerConfig)
    run.set_defaults(func=_run)
    server.set_defaults(func=show_help(server))


def _build_config(args: argparse.Namespace) -> Any:
    from trustmesh.controlplane.config import ServerConfig

    return load_config(ServerConfig, args)


def _run(args: argparse.Namespace) -> int:
    from trustmesh.controlplane.server import run_server

    config = _build_config(args)
    asyncio.run(run_server(config))
    return 0
