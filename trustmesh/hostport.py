"""`host:port` addresses, read one way everywhere (flags, config files, store URLs, listeners)."""

from __future__ import annotations

import errno

from trustmesh.errors import ListenError

ANY_HOST = "0.0.0.0"
MAX_PORT = 65535
EXAMPLE = "use host:port, e.g. 127.0.0.1:8081"


def split_host_port(address: str, *, listening: bool = False) -> tuple[str, int]:
    """`address` as (host, port), with the brackets around an IPv6 host removed.

    An empty host means every interface and port 0 any free port, which only an address to
    listen on may say (`listening`); an address to connect to names both. ValueError says
    what is wrong and what to write, without the flag (the caller knows it).
    """
    text = address.strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    bad = f"invalid address {address!r}"
    if not sep or not port:
        raise ValueError(f"{bad}: no port; {EXAMPLE}")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"{bad}: port {port!r} is not a number; {EXAMPLE}")
    number = int(port)
    if number > MAX_PORT:
        raise ValueError(f"{bad}: port {number} is out of range; ports are 1 to {MAX_PORT}")
    if number == 0 and not listening:
        raise ValueError(f"{bad}: port 0 is no port to connect to; give the real port (1 to {MAX_PORT})")
    if not (host or listening):
        raise ValueError(f"{bad}: no host; {EXAMPLE}")
    return host or ANY_HOST, number


def join_host_port(host: str, port: int) -> str:
    """The `host:port` text of (host, port), bracketing an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def cannot_listen(address: str, flag: str, err: OSError | None = None) -> ListenError:
    """The one-line error for a listener that could not bind `address`, given by `flag`.
    gRPC only says that it failed (no `err`); an OSError from asyncio says why."""
    code = err.errno if err is not None else None
    if code == errno.EACCES:
        why = "ports below 1024 need root or CAP_NET_BIND_SERVICE"
    elif code == errno.EADDRNOTAVAIL:
        why = "it is not an address of this host"
    elif code == errno.EADDRINUSE:
        why = "it is already in use; stop what holds it"
    elif err is not None and err.strerror:
        why = err.strerror.lower()
    else:
        why = "it is already in use or not an address of this host; stop what holds it"
    return ListenError(f"cannot listen on {address} ({flag}): {why}, or pick another {flag}")
