"""Small HTTP servers (the metrics endpoint, the SPIFFE bundle endpoint, the web console) on
aiohttp's server.

Both answer a handful of fixed paths to clients that may be hostile, so each connection is
bounded: the TLS handshake and the request head must arrive within `Limits.request_timeout`,
request lines and header fields are capped, one request per connection, and no request body
is ever read. Parse errors are answered by aiohttp (400) and counted, not logged with a
traceback: anyone can send garbage to a listening port.

`HttpServer` looks like the `asyncio.Server` these endpoints returned before (`sockets`,
`close()`, `wait_closed()`), so callers keep their shape.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Limits:
    request_timeout: float = 5.0
    max_line_bytes: int = 8 * 1024
    max_header_bytes: int = 8 * 1024
    max_headers: int = 32


class _DropParseErrors(logging.Filter):
    """aiohttp logs every malformed request at ERROR with a traceback; those are the client's
    fault (and counted by status), so only errors of our own handlers reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


_protocol_log = logging.getLogger("trustmesh.http")
_protocol_log.addFilter(_DropParseErrors())


def _status_observer(observe: Callable[[int], None]) -> type[AbstractAccessLogger]:
    class StatusObserver(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            observe(response.status)

    return StatusObserver


class HttpServer:
    """A listening aiohttp server: where it listens, and how to stop it."""

    def __init__(self, runner: web.BaseRunner, web_server: web.Server, server: asyncio.Server) -> None:
        self._runner = runner
        self._web_server = web_server
        self._server = server

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets)

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        """Stop listening and drop open connections (each holds one short request at most)."""
        self._server.close()
        for connection in self._web_server.connections:
            connection.force_close()

    async def wait_closed(self) -> None:
        self.close()
        await self._server.wait_closed()
        await self._runner.cleanup()


async def serve_http(handler: Handler, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                     limits: Limits = Limits(), on_status: Callable[[int], None] | None = None) -> HttpServer:
    """Serve `handler` on host:port; raises OSError when the address cannot be bound."""
    # The access-log hook sees every response, aiohttp's own 400s included: it is how
    # statuses are counted; no access log is written.
    access_log = _protocol_log if on_status is not None else None
    observer = _status_observer(on_status if on_status is not None else lambda _status: None)
    server = web.Server(handler, logger=_protocol_log, access_log=access_log, access_log_class=observer,
                        # aiohttp arms this timer when a connection opens and closes it if no
                        # whole request head has arrived by then: the slow-client bound.
                        keepalive_timeout=limits.request_timeout, lingering_time=0,
                        max_line_size=limits.max_line_bytes, max_field_size=limits.max_header_bytes,
                        max_headers=limits.max_headers)
    return await _listen(web.ServerRunner(server, shutdown_timeout=1.0), host, port, ssl_context, limits)


async def serve_app(app: web.Application, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                    limits: Limits = Limits()) -> HttpServer:
    """Serve an aiohttp application (routes, middlewares, signals) on host:port, with the same
    bounds on the handshake and the request head; keep-alive connections are allowed, idle for
    at most `limits.request_timeout`. Raises OSError when the address cannot be bound."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0,
                           keepalive_timeout=limits.request_timeout, lingering_time=0,
                           max_line_size=limits.max_line_bytes, max_field_size=limits.max_header_bytes,
                           max_headers=limits.max_headers, logger=_protocol_log)
    return await _listen(runner, host, port, ssl_context, limits)


async def _listen(runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext | None,
                  limits: Limits) -> HttpServer:
    await runner.setup()
    server = runner.server
    assert server is not None  # set up just now
    try:
        # aiohttp's TCPSite has no TLS handshake timeout, so the listener is made here; the
        # runner's protocol factory is what a site would pass to create_server.
        listener = await asyncio.get_running_loop().create_server(
            server, host, port, ssl=ssl_context,
            ssl_handshake_timeout=limits.request_timeout if ssl_context is not None else None)
    except BaseException:
        await runner.cleanup()
        raise
    return HttpServer(runner, server, listener)


def reply(status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """One response, then the connection closes: these endpoints take one request each."""
    # The type goes in as a header: aiohttp's content_type argument refuses a charset parameter;
    # our own Server header, so aiohttp's (with its version) is not added.
    response = web.Response(status=status, body=body,
                            headers={"Server": "trustmesh", **(headers or {}), "Content-Type": content_type})
    response.force_close()
    return response


__all__ = ["HttpServer", "Limits", "reply", "serve_app", "serve_http"]
