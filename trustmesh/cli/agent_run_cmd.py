"""`trustmesh agent run`: the node agent."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from trustmesh.cli.config import ConfigError, resolve

TOKEN_ENV = "TRUSTMESH_JOIN_TOKEN"
DEFAULTS: dict[str, Any] = {
    "server": None,
    "attest_server": None,
    "trust_bundle": None,
    "trust_domain": None,
    "join_token": None,
    "join_token_file": None,
    "x509pop_cert": None,
    "x509pop_key": None,
    "data_dir": "./.trustmesh/agent",
    "socket": None,
    "metrics": None,
    "services": None,  # config file only: the services on this node and their listeners
}

EXAMPLES = """\
examples:
  # first start on a new node: attest with a one-time token
  trustmesh agent run --server cp.internal:8081 --trust-bundle bundle.pem \\
      --join-token "$(trustmesh token create --node node-1)"
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
    run = sub.add_parser(
        "run", help="run the node agent beside the services of this host",
        description=("Attest this node (once), keep the agent identity in --data-dir, serve the SPIFFE "
                     "Workload API on a unix socket, rotate every SVID before it expires, and enforce the "
                     "allowlists for the services declared under `services:` in the config file. Every option "
                     "can also be set in a YAML file given with --config; flags win over the file."),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", help="YAML file of options (keys are the flag names)")
    run.add_argument("--server", action="append", metavar="HOST:PORT",
                     help="the control plane's Node API (its --bind); repeat for several replicas, tried in turn")
    run.add_argument("--attest-server", action="append", metavar="HOST:PORT",
                     help="the control plane's attestation address (its --attest-bind); "
                          "default: each --server's host with its port + 1")
    run.add_argument("--trust-bundle", help="PEM file of the trust domain's roots (the server's bundle.pem)")
    run.add_argument("--trust-domain", help="expected trust domain, e.g. example.org (default: read from the "
                                            "bundle's root; when given, a bundle of another domain is refused)")
    run.add_argument("--join-token", help=f"one-time join token, needed on the first start only (or ${TOKEN_ENV})")
    run.add_argument("--join-token-file", metavar="PATH",
                     help="read the join token from this file instead (e.g. a mounted Kubernetes Secret); "
                          "a missing file is fine once the node has attested")
    run.add_argument("--x509pop-cert", help="node certificate chain (PEM) for x509pop attestation")
    run.add_argument("--x509pop-key", help="the node certificate's private key (PEM) for x509pop")
    run.add_argument("--data-dir", help="state directory (default ./.trustmesh/agent)")
    run.add_argument("--socket", help="Workload API socket path (default <data-dir>/workload.sock)")
    run.add_argument("--metrics", help="host:port to serve Prometheus metrics on (default off)")
    run.set_defaults(func=_run)


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _services(raw: Any) -> tuple[Any, ...]:
    """The `services:` list of the config file, validated with messages that name the field."""
    from trustmesh.agent.proxy.listeners import InboundConfig, OutboundConfig, ServiceConfig
    from trustmesh.metrics import split_host_port
    from trustmesh.spiffeid import SpiffeId

    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("services: must be a list of {name, spiffe_id, inbound, outbound}")
    out = []
    for i, item in enumerate(raw):
        where = f"services[{i}]"
        if not isinstance(item, dict) or not item.get("name") or not item.get("spiffe_id"):
            raise ConfigError(f"{where}: needs name and spiffe_id")
        unknown = set(item) - {"name", "spiffe_id", "inbound", "outbound", "allow_tls12"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        try:
            sid = SpiffeId.parse(str(item["spiffe_id"]))
            inbound = None
            if item.get("inbound") is not None:
                inb = item["inbound"]
                split_host_port(str(inb["listen"]))
                split_host_port(str(inb["forward"]))
                inbound = InboundConfig(str(inb["listen"]), str(inb["forward"]))
            routes = []
            for j, route in enumerate(item.get("outbound") or []):
                split_host_port(str(route["listen"]))
                split_host_port(str(route["connect"]))
                routes.append(OutboundConfig(str(route["listen"]), str(route["connect"]),
                                             SpiffeId.parse(str(route["expect"]))))
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{where}: missing or malformed field {err}") from err
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
        out.append(ServiceConfig(name=str(item["name"]), spiffe_id=sid, inbound=inbound, outbound=tuple(routes),
                                 allow_tls12=bool(item.get("allow_tls12", False))))
    return tuple(out)


def _join_token(values: dict[str, Any]) -> str | None:
    """The token from --join-token, else --join-token-file, else $TRUSTMESH_JOIN_TOKEN.

    A token file that does not exist is not an error: on a node that attested before, the
    agent starts from the identity in its data directory and needs no token; on a node
    that did not, attestation fails with a message that says to create one.
    """
    if values["join_token"]:
        return str(values["join_token"]).strip()
    if values["join_token_file"]:
        path = Path(values["join_token_file"]).expanduser()
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ConfigError(f"--join-token-file {path}: {err.strerror}") from err
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _build_config(args: argparse.Namespace) -> Any:
    from trustmesh.agent.config import AgentConfig  # the composition root may import both sides

    values = resolve(args, DEFAULTS, args.config)
    servers = _as_tuple(values["server"])
    if not servers:
        raise ConfigError("--server HOST:PORT is required (the control plane's --bind address)")
    for server in servers + _as_tuple(values["attest_server"]):
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--server {server!r}: use HOST:PORT, e.g. 127.0.0.1:8081")
    if not values["trust_bundle"]:
        raise ConfigError("--trust-bundle FILE is required (the bundle.pem the control plane wrote)")
    if bool(values["x509pop_cert"]) != bool(values["x509pop_key"]):
        raise ConfigError("--x509pop-cert and --x509pop-key go together")
    trust_domain = None
    if values["trust_domain"]:
        from trustmesh.errors import InvalidSpiffeIdError
        from trustmesh.spiffeid import TrustDomain

        try:
            trust_domain = TrustDomain(str(values["trust_domain"]))
        except InvalidSpiffeIdError as err:
            raise ConfigError(f"--trust-domain: {err}") from err
    data_dir = Path(values["data_dir"]).expanduser()
    return AgentConfig(
        servers=servers, attest_servers=_as_tuple(values["attest_server"]),
        trust_bundle=Path(values["trust_bundle"]).expanduser(), data_dir=data_dir,
        join_token=_join_token(values), socket=Path(values["socket"]).expanduser() if values["socket"] else None,
        metrics=values["metrics"], trust_domain=trust_domain,
        x509pop_cert=Path(values["x509pop_cert"]) if values["x509pop_cert"] else None,
        x509pop_key=Path(values["x509pop_key"]) if values["x509pop_key"] else None,
        services=_services(values["services"]),
    )


def _run(args: argparse.Namespace) -> int:
    from trustmesh.agent.agent import run_agent

    asyncio.run(run_agent(_build_config(args)))
    return 0
