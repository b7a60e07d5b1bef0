"""The SPIFFE bundle endpoint: this trust domain's bundle over HTTPS for federated partners.

It answers `GET <path>` with the bundle as a SPIFFE bundle document (JWKS with
`spiffe_sequence` and `spiffe_refresh_hint`) and nothing else. Two profiles, as the
standard defines them:
- `https_spiffe`: TLS with the server's own X509-SVID (spiffe://<td>/trustmesh/server), the
  one it serves agents with, rotated in place (each handshake takes the newest);
- `https_web`: TLS with a web-PKI certificate and key the operator configures.

Requests are hostile input: one small GET per connection, bounded in size and time.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from aiohttp import web

from trustmesh.bundle import Bundle
from trustmesh.errors import TrustmeshError
from trustmesh.hostport import split_host_port
from trustmesh.httpserver import HttpServer, Limits, reply, serve_http
from trustmesh.logs import log_event
from trustmesh.metrics import Registry
from trustmesh.tls import load_key_and_chain

log = logging.getLogger("trustmesh.bundle_endpoint")

REQUEST_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 8 * 1024
LIMITS = Limits(request_timeout=REQUEST_TIMEOUT, max_line_bytes=MAX_REQUEST_BYTES, max_header_bytes=MAX_REQUEST_BYTES)
NO_STORE = {"Cache-Control": "no-store"}


class SvidSource(Protocol):
    """What the https_spiffe profile needs: the current serving chain and key (PEM), and a
    number that changes whenever they do."""

    version: int
    chain_pem: bytes
    key_pem: bytes


def _context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_key_and_chain(ctx, chain_pem, key_pem)
    return ctx


class BundleEndpoint:
    def __init__(self, bundle: Callable[[], Bundle], refresh_hint: timedelta, metrics: Registry, *,
                 path: str = "/") -> None:
        self._bundle = bundle
        self._hint = refresh_hint
        self._path = path
        self._requests = metrics.counter("trustmesh_bundle_endpoint_requests_total",
                                         "requests to the SPIFFE bundle endpoint by status", ["status"])
        self._svid: SvidSource | None = None
        self._svid_version = -1
        self._svid_ctx: ssl.SSLContext | None = None

    # --- TLS ----------------------------------------------------------------------------------

    def spiffe_context(self, svid: SvidSource) -> ssl.SSLContext:
        """A context that serves the newest SVID: the SNI callback swaps in a fresh context
        per handshake when the SVID has rotated."""
        self._svid = svid
        base = self._current_svid_context()

        def pick(ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            ssl_object.context = self._current_svid_context()

        base.sni_callback = pick
        return base

    def _current_svid_context(self) -> ssl.SSLContext:
        assert self._svid is not None
        if self._svid_ctx is None or self._svid.version != self._svid_version:
            self._svid_ctx = _context(self._svid.chain_pem, self._svid.key_pem)
            self._svid_version = self._svid.version
        return self._svid_ctx

    @staticmethod
    def web_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file))
        except (OSError, ssl.SSLError) as err:
            raise TrustmeshError(f"cannot load the bundle endpoint's web certificate {cert_file} and key "
                                 f"{key_file}: {err}; check --bundle-endpoint-cert/--bundle-endpoint-key") from err
        return ctx

    # --- HTTP ---------------------------------------------------------------------------------

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


__all__ = ["BundleEndpoint", "SvidSource", "serve_bundle_endpoint"]
