"""`trustmesh server …`: run the control plane."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from trustmesh.cli.config import ConfigError, resolve, show_help
from trustmesh.duration import parse_duration
from trustmesh.errors import InvalidSpiffeIdError
from trustmesh.spiffeid import TrustDomain

DEFAULTS: dict[str, Any] = {
    "trust_domain": None,
    "data_dir": "./.trustmesh/server",
    "bind": "127.0.0.1:8081",
    "attest_bind": "127.0.0.1:8082",
    "admin_socket": None,
    "admin_bind": None,
    "store": "sqlite",
    "kek_file": None,
    "default_x509_ttl": "1h",
    "default_jwt_ttl": "5m",
    "ca_ttl": "24h",
    "root_ttl": "365d",
    "metrics": None,
    "agent_ttl": "1h",
    "x509pop_ca": None,
    "replica_id": None,
    "prune_agents_after": "24h",
    "bundle_endpoint": None,
    "bundle_endpoint_profile": "https_spiffe",
    "bundle_endpoint_cert": None,
    "bundle_endpoint_key": None,
    "bundle_refresh_hint": "5m",
    "signing_workers": None,
}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    )
    run.add_argument("--config", help="YAML file of options (keys are the flag names)")
    run.add_argument("--trust-domain", help="the trust domain, e.g. example.org (required)")
    run.add_argument("--data-dir", help="state directory (default ./.trustmesh/server)")
    run.add_argument("--bind", help="agent-facing gRPC address host:port (default 127.0.0.1:8081)")
    run.add_argument(
        "--attest-bind",
        help="address where new agents attest (TLS without a client certificate; serves only "
        "attestation), default 127.0.0.1:8082; every other agent call goes to --bind with mTLS",
    )
    run.add_argument(
        "--admin-bind",
        help="also serve the admin API on this host:port over mTLS, for remote administrators "
        "whose SVIDs are registration entries marked --admin (default off)",
    )
    run.add_argument("--admin-socket", help="admin API unix socket (default <data-dir>/admin.sock)")
    run.add_argument(
        "--store",
        help="'sqlite' (embedded, in the data dir), 'sqlite:///path/file.db' or "
        "'etcd://host:port[,host:port…]' (default sqlite)",
    )
    run.add_argument(
        "--kek-file",
        help="file holding the 32-byte key-encryption key (raw, hex or base64; mode 0600). "
        "Default: $TRUSTMESH_KEK, else <data-dir>/kek.bin generated on first start (sqlite only)",
    )
    run.add_argument("--default-x509-ttl", help="X.509-SVID lifetime when an entry sets none (default 1h)")
    run.add_argument("--default-jwt-ttl", help="JWT-SVID lifetime when an entry sets none (default 5m)")
    run.add_argument("--ca-ttl", help="lifetime of this replica's signing CA (default 24h)")
    run.add_argument("--root-ttl", help="lifetime of a new root CA (default 365d)")
    run.add_argument("--agent-ttl", help="lifetime of agent SVIDs; agents renew at half-life (default 1h)")
    run.add_argument(
        "--x509pop-ca",
        help="PEM file of CA certificates that node certificates chain to, enabling x509pop node attestation",
    )
    run.add_argument("--metrics", help="host:port to serve Prometheus metrics on (default off)")
    run.add_argument(
        "--replica-id",
        help="this replica's name in the CA journal, logs and leader election; unique per running "
        "process (default <hostname>-<pid>)",
    )
    run.add_argument(
        "--prune-agents-after",
        help="the leader replica forgets agents whose SVID expired this long ago (they must attest "
        "again anyway); banned agents are kept (default 24h)",
    )
    run.add_argument(
        "--signing-workers", metavar="N",
        help="processes that sign X.509-SVIDs, for issuance on every core; 0 signs in a thread of the "
        "server process (default: the number of CPUs)",
    )
    fed = run.add_argument_group("federation (serving this trust domain's bundle to partners)")
    fed.add_argument("--bundle-endpoint", metavar="HOST:PORT",
                     help="serve the SPIFFE bundle over HTTPS here, for federated partners (default off)")
    fed.add_argument("--bundle-endpoint-profile", choices=["https_spiffe", "https_web"],
                     help="https_spiffe (default): TLS with the server's SVID, spiffe://<td>/trustmesh/server; "
                          "https_web: TLS with the web-PKI certificate given below")
    fed.add_argument("--bundle-endpoint-cert", metavar="PEM", help="https_web: the certificate chain")
    fed.add_argument("--bundle-endpoint-key", metavar="PEM", help="https_web: its private key")
    fed.add_argument("--bundle-refresh-hint", metavar="DURATION",
                     help="how often partners should fetch the bundle (spiffe_refresh_hint, default 5m)")
    run.set_defaults(func=_run)
    server.set_defaults(func=show_help(server))


def _build_config(args: argparse.Namespace) -> Any:
    from trustmesh.controlplane.config import ServerConfig  # the composition root may import both sides

    values = resolve(args, DEFAULTS, args.config)
    if not values["trust_domain"]:
        raise ConfigError("--trust-domain is required (e.g. --trust-domain example.org)")
    try:
        trust_domain = TrustDomain.parse(str(values["trust_domain"]))
    except InvalidSpiffeIdError as err:
        raise ConfigError(f"--trust-domain: {err.reason}") from err
    durations: dict[str, Any] = {}
    for key in ("default_x509_ttl", "default_jwt_ttl", "ca_ttl", "root_ttl", "agent_ttl", "prune_agents_after",
                "bundle_refresh_hint"):
        try:
            durations[key] = parse_duration(values[key])
        except ValueError as err:
            raise ConfigError(f"--{key.replace('_', '-')}: {err}") from err
    data_dir = Path(values["data_dir"]).expanduser()
    profile = str(values["bundle_endpoint_profile"])
    web_files = (values["bundle_endpoint_cert"], values["bundle_endpoint_key"])
    if profile not in ("https_spiffe", "https_web"):
        raise ConfigError(f"--bundle-endpoint-profile {profile!r}: use https_spiffe or https_web")
    if profile == "https_web" and values["bundle_endpoint"] and not all(web_files):
        raise ConfigError("--bundle-endpoint-profile https_web needs --bundle-endpoint-cert and --bundle-endpoint-key")
    if profile == "https_spiffe" and any(web_files):
        raise ConfigError("--bundle-endpoint-cert/--bundle-endpoint-key go with --bundle-endpoint-profile https_web")
    config = ServerConfig(
        trust_domain=trust_domain,
        data_dir=data_dir,
        store_url=str(values["store"]),
        kek_file=Path(values["kek_file"]).expanduser() if values["kek_file"] else None,
        bind=str(values["bind"]),
        attest_bind=str(values["attest_bind"]),
        admin_bind=str(values["admin_bind"]) if values["admin_bind"] else None,
        admin_socket=Path(values["admin_socket"]).expanduser() if values["admin_socket"] else None,
        metrics=values["metrics"],
        x509pop_ca=Path(values["x509pop_ca"]).expanduser() if values["x509pop_ca"] else None,
        prune_nodes_after=durations.pop("prune_agents_after"),
        bundle_endpoint=values["bundle_endpoint"], bundle_endpoint_profile=profile,
        bundle_endpoint_cert=Path(web_files[0]).expanduser() if web_files[0] else None,
        bundle_endpoint_key=Path(web_files[1]).expanduser() if web_files[1] else None,
        **durations,
    )
    if values["signing_workers"] is not None:
        try:
            workers = int(values["signing_workers"])
        except (TypeError, ValueError):
            workers = -1
        if workers < 0:
            raise ConfigError(f"--signing-workers {values['signing_workers']!r}: give 0 or a positive number")
        config = dataclasses.replace(config, signing_workers=workers)
    if values["replica_id"]:
        config = dataclasses.replace(config, replica_id=str(values["replica_id"]))
    return config


def _run(args: argparse.Namespace) -> int:
    from trustmesh.controlplane.server import run_server

    config = _build_config(args)
    asyncio.run(run_server(config))
    return 0
