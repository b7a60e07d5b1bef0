"""The SPIFFE bundle endpoint: this trust domain's bundle over HTTPS for federated partners.

It answers `GET <path>` with the bundle as a SPIFFE bundle document (JWKS with
`spiffe_sequence` and `spiffe_refresh_hint`) and nothing else. Two profiles, as the
standard defines them:
- `https_spiffe`: TLS with the server's own X509-SVID (spiffe://<td>/trustmesh/server), the
  one it serves agents with, rotated in place (each handshake takes the newest);
- `https_web`: TLS with a web-PKI certificate and key the operator configures.
The TLS contexts for both come from trustmesh/tls.py (the web console uses the same ones).

Requests are hostile input: one small GET per connection, bounded in size and time.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from datetime import timedelta

from aiohttp import web

from trustmesh.bundle import Bundle
from trustmesh.errors import TrustmeshError
from trustmesh.hostport import split_host_port
from trustmesh.httpserver import HttpServer, Limits, reply, serve_http
from trustmesh.logs import log_event
from trustmesh.metrics import Registry

log = logging.getLogger("trustmesh.bundle_endpoint")

REQUEST_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 8 * 1024
LIMITS = Limits(request_timeout=REQUEST_TIMEOUT, max_line_bytes=MAX_REQUEST_BYTES, max_header_bytes=MAX_REQUEST_BYTES)
NO_STORE = {"Cache-Control": "no-store"}


class BundleEndpoint:
    def __init__(self, bundle: Callable[[], Bundle], refresh_hint: timedelta, metrics: Registry, *,
                 path: str = "/") -> None:
        self._bundle = bundle
        self._hint = refresh_hint
        self._path = path
        self._requests = metrics.counter("trustmesh_bundle_endpoint_requests_total",
                                         "requests to the SPIFFE bundle endpoint by status", ["status"])

    def document(self) -> bytes:
        return self._bundle().with_refresh_hint(self._hint).to_jwks()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # Method first, then the path as sent (query ignored): a POST anywhere is a 405.
        if request.method != "GET":
            return reply(405, b"only GET\n", "text/plain", NO_STORE)
        if request.raw_path.split("?", 1)[0] != self._path:
            return reply(404, b"not found\n", "text/plain", NO_STORE)
        return reply(200, self.document(), "application/json", NO_STORE)

    def count(self, status: int) -> None:
        self._requests.inc(status=str(status))


async def serve_bundle_endpoint(endpoint: BundleEndpoint, address: str, ctx: ssl.SSLContext, *,
                                limits: Limits = LIMITS) -> HttpServer:
    host, port = split_host_port(address, listening=True)
    try:
        server = await serve_http(endpoint.handle, host, port, ssl_context=ctx, limits=limits, on_status=endpoint.count)
    except OSError as err:
        raise TrustmeshError(f"cannot serve the bundle endpoint on {address}: {err.strerror}; "
                             "pick another --bundle-endpoint") from err
    log_event(log, "bundle_endpoint_listening", address=server.address)
    return server


__all__ = ["BundleEndpoint", "serve_bundle_endpoint"]
