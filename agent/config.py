"""The agent's configuration, as one frozen value built by the CLI.

Each field of ``AgentConfig`` that an operator sets is declared here once, with its flag,
config-file key, default, parser and help (see ``trustmesh.options``); ``trustmesh agent run``
derives its flags and its config-file loader from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmesh.hostport import join_host_port, split_host_port
from trustmesh.options import HOST_PORT, LISTEN_ADDRESS, PATH, TEXT, TRUST_DOMAIN, ConfigError, Parser, internal, option
from trustmesh.spiffeid import SpiffeId, TrustDomain

if TYPE_CHECKING:  # the proxy is imported when a config is read, not whenever the CLI builds its parser
    from trustmesh.agent.proxy.listeners import ServiceConfig

TOKEN_ENV = "TRUSTMESH_JOIN_TOKEN"


@dataclass(frozen=True)
class RotationConfig:
    """When to renew and how to retry; the defaults suit production, tests shorten them."""

    # Renew each SVID (the agent's own and every workload's) at a random point in this
    # fraction of its lifetime: around half-life, spread so a fleet does not renew in step.
    renew_low: float = 0.45
    renew_high: float = 0.55
    # Reconnects and failed requests: capped exponential backoff with full jitter.
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    # A banned or evicted agent asks again this rarely: an operator must act first, and a
    # fleet of refused agents must not hammer the server.
    refused_retry: float = 60.0
    # An item the server refused (e.g. an entry deleted meanwhile) is asked for again after this.
    item_retry: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.renew_low <= self.renew_high < 1:
            raise ValueError("renew_low and renew_high must satisfy 0 < low <= high < 1")
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ValueError("backoff_base must be positive and at most backoff_cap")


# The production timing, the default of every component that takes a RotationConfig.
DEFAULT_ROTATION = RotationConfig()


def _services(raw: Any) -> tuple[ServiceConfig, ...]:
    """The `services:` list of the config file, validated with messages that name the field."""
    from trustmesh.agent.proxy.http import DEFAULT_MAX_BODY
    from trustmesh.agent.proxy.listeners import (
        MTLS_MODES,
        InboundConfig,
        OutboundConfig,
        ServiceConfig,
        check_listen,
    )

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
                split_host_port(str(inb["listen"]), listening=True)
                split_host_port(str(inb["forward"]))
                extra = set(inb) - {"listen", "forward", "mtls", "protocol", "max_body_bytes"}
                if extra:
                    raise ConfigError(f"{where}.inbound: unknown key(s) {', '.join(sorted(map(str, extra)))}; "
                                      "use listen, forward, mtls, protocol and max_body_bytes")
                mtls = inb.get("mtls", "strict")
                if mtls not in MTLS_MODES:
                    raise ConfigError(f"{where}.inbound.mtls: {str(mtls)[:20]!r} is not strict or permissive "
                                      "(permissive also forwards plaintext clients, without an identity)")
                protocol = _protocol(inb.get("protocol"), f"{where}.inbound")
                max_body = inb.get("max_body_bytes", DEFAULT_MAX_BODY)
                if isinstance(max_body, bool) or not isinstance(max_body, int) or not 0 <= max_body <= 2**40:
                    raise ConfigError(f"{where}.inbound.max_body_bytes: {str(max_body)[:20]!r} is not a number of "
                                      "bytes (e.g. 10485760 for 10 MiB)")
                if protocol != "http" and "max_body_bytes" in inb:
                    raise ConfigError(f"{where}.inbound.max_body_bytes: only an http listener reads bodies; "
                                      "add protocol: http")
                inbound = InboundConfig(str(inb["listen"]), str(inb["forward"]), mtls, protocol, max_body)
            routes = []
            for j, route in enumerate(item.get("outbound") or []):
                extra = set(route) - {"listen", "connect", "expect", "mode", "protocol"}
                if extra:
                    raise ConfigError(f"{where}.outbound[{j}]: unknown key(s) {', '.join(sorted(map(str, extra)))}; "
                                      "use listen, connect, expect, mode and protocol")
                check_listen(str(route["listen"]), unix=True)  # host:port, or unix:/path (SO_PEERCRED)
                split_host_port(str(route["connect"]))
                routes.append(OutboundConfig(str(route["listen"]), str(route["connect"]),
                                             SpiffeId.parse(str(route["expect"])), _socket_mode(route.get("mode")),
                                             _protocol(route.get("protocol"), f"{where}.outbound[{j}]")))
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{where}: missing or malformed field {err}") from err
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
        out.append(ServiceConfig(name=str(item["name"]), spiffe_id=sid, inbound=inbound, outbound=tuple(routes),
                                 allow_tls12=bool(item.get("allow_tls12", False))))
    return tuple(out)


def _protocol(raw: Any, where: str) -> str:
    """A listener's protocol: tcp (the default) or http."""
    from trustmesh.agent.proxy.listeners import PROTOCOLS

    if raw is None:
        return "tcp"
    if raw not in PROTOCOLS:
        raise ConfigError(f"{where}.protocol: {str(raw)[:20]!r} is not tcp or http (http decides each request "
                          "with the allowlists' methods and paths; tcp each connection)")
    return str(raw)


def _socket_mode(raw: Any) -> int | None:
    """An outbound unix socket's file mode: octal text ("0660") or a YAML number."""
    if raw is None:
        return None
    try:
        mode = int(raw, 8) if isinstance(raw, str) else int(raw)
    except ValueError as err:
        raise ValueError(f"mode {raw!r} is not an octal file mode such as \"0660\"") from err
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode {raw!r} is not a file mode (0000 to 0777)")
    return mode


SERVICES = Parser("LIST", _services)


@dataclass(frozen=True)
class AgentConfig:
    server: tuple[str, ...] = option(
        "the control plane's Node API (its --bind); repeat for several replicas, tried in turn", HOST_PORT,
        repeat=True, required="--server HOST:PORT is required (the control plane's --bind address)")
    trust_bundle: Path = option(
        "PEM file of the trust domain's roots (the server's bundle.pem)", PATH,
        required="--trust-bundle FILE is required (the bundle.pem the control plane wrote)")
    data_dir: Path = option("state directory", PATH, default=Path(".trustmesh/agent"))
    join_token: str | None = option(f"one-time join token, needed on the first start only; on the command line "
                                    f"every local user can read it: prefer --join-token-file or ${TOKEN_ENV}",
                                    TEXT, default=None, metavar="TOKEN")
    join_token_file: Path | None = option(
        "read the join token from this file instead (e.g. a mounted Kubernetes Secret); "
        "a missing file is fine once the node has attested", PATH, default=None)
    attest_server: tuple[str, ...] = option(
        "the control plane's attestation address (its --attest-bind); "
        "default: each --server's host with its port + 1", HOST_PORT, repeat=True, default=())
    socket: Path | None = option("Workload API socket path (default <data-dir>/workload.sock)", PATH, default=None)
    metrics: str | None = option("host:port to serve Prometheus metrics on (default off)", LISTEN_ADDRESS, default=None)
    x509pop_cert: Path | None = option("node certificate chain (PEM) for x509pop attestation", PATH, default=None)
    x509pop_key: Path | None = option("the node certificate's private key (PEM) for x509pop", PATH, default=None)
    trust_domain: TrustDomain | None = option(
        "expected trust domain, e.g. example.org (default: read from the bundle's root; when given, a bundle "
        "of another domain is refused)", TRUST_DOMAIN, default=None)
    services: tuple[ServiceConfig, ...] = option(
        "the services on this node and their listeners: a list of {name, spiffe_id, inbound, outbound}",
        SERVICES, flag=False, default=())
    rotation: RotationConfig = internal("renewal and retry timing; production uses the defaults, tests shorten them",
                                        default_factory=RotationConfig)

    def __post_init__(self) -> None:
        if bool(self.x509pop_cert) != bool(self.x509pop_key):
            raise ConfigError("--x509pop-cert and --x509pop-key go together")

    @property
    def socket_path(self) -> Path:
        return self.socket or self.data_dir / "workload.sock"

    @property
    def attest_addresses(self) -> tuple[str, ...]:
        if self.attest_server:
            return self.attest_server
        out = []
        for server in self.server:
            host, port = split_host_port(server)
            out.append(join_host_port(host, port + 1))
        return tuple(out)
