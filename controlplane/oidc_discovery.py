"""OpenID Connect discovery for JWT-SVIDs: what cloud IAM, Vault and any OIDC relying party
fetch to accept a JWT-SVID without knowing SPIFFE.

With `--oidc-issuer https://host[/path]` every JWT-SVID carries that URL as `iss`, and this
endpoint (`--oidc-discovery-bind`) serves, under the issuer's path:
- `<path>/.well-known/openid-configuration` (OpenID Connect Discovery 1.0, section 4): the
  issuer exactly as configured (relying parties compare it to `iss` byte for byte) and the
  `jwks_uri` beside it;
- `<path>/keys`: the JWK Set of this trust domain's JWT authorities only (no X.509 roots),
  each key with `kid` (the JWT-SVID header's), `alg`, `use: sig` and its curve or modulus.
  Prepared keys are in it too: a relying party learns a new key before anything signs with
  it, as agents do from the bundle. Read per request from the CA, which the registry view
  reloads at every journal change, so the keys follow root rotation.

Everything else is 404 (no listings), every method but GET and HEAD is 405. The documents
are built from the CA's bundle: the JWKs by trustmesh/jose.py, the one JWK encoder, the
transport by trustmesh/httpserver.py with the bounds the bundle endpoint uses. TLS is the
server's own SVID (rotated in place) unless `--oidc-discovery-cert/--oidc-discovery-key`
give a certificate relying parties trust; cloud providers need a publicly trusted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web

from trustmesh import jose
from trustmesh.bundle import Bundle, JwtAuthority
from trustmesh.controlplane.bundle_endpoint import LIMITS  # the same bounds: one small GET per connection
from trustmesh.hostport import cannot_listen, split_host_port
from trustmesh.httpserver import HttpServer, Limits, reply, serve_http
from trustmesh.logs import log_event
from trustmesh.metrics import Registry

log = logging.getLogger("trustmesh.oidc_discovery")

DISCOVERY_SUFFIX: Final = "/.well-known/openid-configuration"
JWKS_SUFFIX: Final = "/keys"
# OpenID Connect Discovery makes `authorization_endpoint` REQUIRED and RFC 8414 wants it https,
# but there is no interactive login here: JWT-SVIDs come from the Workload API. The document
# names this path so strict validators accept it; asking it answers 404 with that explanation.
AUTHORIZE_SUFFIX: Final = "/authorize"
# Discovery section 3 requires RS256 in the list. Listing it costs nothing: a token verifies
# only against a key of the JWKS under its `kid`, and an RS256 token needs an RSA key there.
REQUIRED_ALGORITHM: Final = "RS256"
# Short: a new key is published when a root is prepared, long before it signs (prepare ->
# activate), so relying parties that honour this see it in time; a minute keeps load low.
MAX_AGE_SECONDS: Final = 60
# Every answer: JSON is never sniffed into anything else, and nothing in it may load content.
SECURITY_HEADERS: Final = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'"}
NO_STORE: Final = {"Cache-Control": "no-store", **SECURITY_HEADERS}
# Statuses the handler itself gives; any other was answered by the HTTP layer (a request that
# could not be parsed, or a timeout) before a path was read.
HANDLER_STATUSES: Final = frozenset({200, 304, 404, 405})


@dataclass(frozen=True)
class OidcPaths:
    """Where the documents live, from the issuer URL alone (pure)."""

    issuer: str
    discovery: str  # request paths, as sent (not percent-decoded)
    jwks: str
    authorize: str

    @property
    def discovery_url(self) -> str:
        return self.issuer + DISCOVERY_SUFFIX

    @property
    def jwks_uri(self) -> str:
        return self.issuer + JWKS_SUFFIX

    @property
    def authorization_endpoint(self) -> str:
        return self.issuer + AUTHORIZE_SUFFIX


def oidc_paths(issuer: str) -> OidcPaths:
    """The paths for `issuer` (already checked by config.oidc_issuer_problem): discovery is the
    issuer with /.well-known/openid-configuration appended (Discovery section 4), so an issuer
    https://h/mesh serves /mesh/.well-known/openid-configuration and /mesh/keys."""
    base = urlsplit(issuer).path.rstrip("/")
    return OidcPaths(issuer=issuer, discovery=base + DISCOVERY_SUFFIX, jwks=base + JWKS_SUFFIX,
                     authorize=base + AUTHORIZE_SUFFIX)


def key_algorithm(authority: JwtAuthority) -> str:
    """The `alg` JWT-SVIDs under this key carry (the CA signs with jose.algorithm_for_key too)."""
    return jose.algorithm_for_key(authority.public_key)


def jwks_document(authorities: Sequence[JwtAuthority]) -> dict[str, Any]:
    """The relying parties' JWK Set: SPIFFE's `use: jwt-svid` means nothing to them, so each
    key says `sig` and names its algorithm."""
    keys = []
    for authority in authorities:
        jwk = jose.public_key_to_jwk(authority.public_key, kid=authority.key_id, use="sig")
        jwk["alg"] = key_algorithm(authority)
        keys.append(jwk)
    return {"keys": keys}


def discovery_document(paths: OidcPaths, authorities: Sequence[JwtAuthority]) -> dict[str, Any]:
    """The OpenID Provider metadata (Discovery section 3) of an issuer that only issues
    JWT-SVIDs: no token, userinfo or registration endpoints."""
    algorithms = sorted({key_algorithm(a) for a in authorities} | {REQUIRED_ALGORITHM})
    return {
        "issuer": paths.issuer,
        "jwks_uri": paths.jwks_uri,
        "authorization_endpoint": paths.authorization_endpoint,
        "response_types_supported": ["id_token"],
        # ID tokens only, as the implicit flow hands them out: so no token endpoint is due
        # (Discovery section 3, RFC 8414 section 2), and a validator does not ask for one.
        "grant_types_supported": ["implicit"],
        # `sub` is the workload's SPIFFE ID, the same for every relying party.
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms,
        "claims_supported": ["aud", "exp", "iat", "iss", "sub"],
    }


def encode(document: dict[str, Any]) -> bytes:
    """Deterministic JSON, so one content has one ETag."""
    return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


def entity_tag(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:32]


class OidcDiscovery:
    """Answers the discovery document and the JWKS for one issuer, from the current bundle."""

    def __init__(self, issuer: str, bundle: Callable[[], Bundle], metrics: Registry) -> None:
        self.paths = oidc_paths(issuer)
        self._bundle = bundle
        self._requests = metrics.counter(
            "trustmesh_oidc_discovery_requests_total",
            "requests to the OIDC discovery endpoint by path (discovery, jwks, other, or '-' when the "
            "request could not be read) and status", ["path", "status"])

    def documents(self) -> tuple[bytes, bytes]:
        """(discovery document, JWKS) as served now."""
        authorities = self._bundle().jwt_authorities
        return encode(discovery_document(self.paths, authorities)), encode(jwks_document(authorities))

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]  # the query is ignored, as the bundle endpoint does
        kind = {self.paths.discovery: "discovery", self.paths.jwks: "jwks"}.get(path, "other")
        response = self._answer(request, path, kind)
        self._requests.inc(path=kind, status=str(response.status))
        return response

    def _answer(self, request: web.BaseRequest, path: str, kind: str) -> web.Response:
        # Method first, then the path: a POST anywhere is a 405.
        if request.method not in ("GET", "HEAD"):
            return reply(405, b"only GET and HEAD\n", "text/plain", {**NO_STORE, "Allow": "GET, HEAD"})
        if path == self.paths.authorize:
            return reply(404, b"no interactive authorization here: workloads get JWT-SVIDs from the SPIFFE "
                              b"Workload API\n", "text/plain", NO_STORE)
        if kind == "other":
            return reply(404, b"not found\n", "text/plain", NO_STORE)
        discovery, jwks = self.documents()
        body = discovery if kind == "discovery" else jwks
        tag = entity_tag(body)
        headers = {"Cache-Control": f"public, max-age={MAX_AGE_SECONDS}", "ETag": f'"{tag}"', **SECURITY_HEADERS}
        # If-None-Match compares weakly (RFC 9110 section 13.1.2): W/"x" matches "x"; "*" matches any.
        if any(candidate.value in (tag, "*") for candidate in request.if_none_match or ()):
            return reply(304, b"", "application/json", headers)
        return reply(200, body, "application/json", headers)

    def count_unread(self, status: int) -> None:
        """The HTTP layer's own answers (malformed or slow requests): the handler counts the rest."""
        if status not in HANDLER_STATUSES:
            self._requests.inc(path="-", status=str(status))


async def serve_oidc_discovery(endpoint: OidcDiscovery, address: str, ctx: ssl.SSLContext, *,
                               limits: Limits = LIMITS) -> HttpServer:
    """Listen on `address` (--oidc-discovery-bind); a port that cannot be bound is a one-line error."""
    host, port = split_host_port(address, listening=True)
    try:
        server = await serve_http(endpoint.handle, host, port, ssl_context=ctx, limits=limits,
                                  on_status=endpoint.count_unread)
    except OSError as err:
        raise cannot_listen(address, "--oidc-discovery-bind", err) from err
    log_event(log, "oidc_discovery_listening", address=server.address, issuer=endpoint.paths.issuer,
              discovery=endpoint.paths.discovery_url)
    return server


__all__ = ["OidcDiscovery", "OidcPaths", "discovery_document", "jwks_document", "oidc_paths",
           "serve_oidc_discovery"]
