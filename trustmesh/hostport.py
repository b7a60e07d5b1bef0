"""`host:port` addresses, read one way everywhere (flags, config files, store URLs, listeners)."""

from __future__ import annotations

ANY_HOST = "0.0.0.0"
MAX_PORT = 65535


def split_host_port(address: str, *, listening: bool = False) -> tuple[str, int]:
    """`address` as (host, port), with the brackets around an IPv6 host removed.

    An empty host means every interface, which only an address to listen on may say
    (`listening`); an address to connect to must name its host. Port 0 (any free port) is
    valid here; callers that need a real port check it. ValueError says what to write.
    """
    host, sep, port = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isdigit() or int(port) > MAX_PORT or not (host or listening):
        raise ValueError(f"invalid address {address!r}: use host:port, e.g. 127.0.0.1:8081")
    return host or ANY_HOST, int(port)


def join_host_port(host: str, port: int) -> str:
    """The `host:port` text of (host, port), bracketing an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
