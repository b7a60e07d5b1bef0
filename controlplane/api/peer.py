"""The agent calling the Node API, as its TLS client certificate and its connection show it
(read by `callers.agents`, then checked against the attested-node record and the agent's
other live connections)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote

from trustmesh.hostport import split_host_port
from trustmesh.spiffeid import SpiffeId


@dataclass(frozen=True)
class PeerAgent:
    spiffe_id: SpiffeId
    serial: str
    not_after: float  # the client certificate's expiry (unix time): a stream must not outlive it
    host: str = ""  # the address the call came from, without its port ("" when gRPC gave none)

    @property
    def id(self) -> str:
        return str(self.spiffe_id)


def peer_host(peer: str | None) -> str:
    """The host of a gRPC peer string, without the port: the same for every connection one
    machine opens. "ipv4:10.0.0.5:43210" -> "10.0.0.5"; "ipv6:%5B::1%5D:4321" -> "::1"; an
    IPv4 client of a dual-stack listener ("ipv6:[::ffff:10.0.0.5]:…") -> "10.0.0.5"."""
    if not peer:
        return ""
    scheme, _, rest = unquote(peer).partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return scheme  # e.g. "unix": one local machine
    try:
        host, _ = split_host_port(rest)
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return rest
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def peer_address(peer: str | None) -> str:
    """A gRPC peer string as the audit log shows where a call came from: host and port
    ("ipv4:10.0.0.5:43210" -> "10.0.0.5:43210", "ipv6:%5B::1%5D:4321" -> "[::1]:4321")."""
    if not peer:
        return ""
    scheme, _, rest = unquote(peer).partition(":")
    return rest if scheme in ("ipv4", "ipv6") else unquote(peer)
