"""OIDC discovery for JWT-SVIDs, in process: the documents (checked with authlib's validator of
OpenID Provider metadata, a standard relying-party library), the JWT-SVID `iss` claim, and the
HTTPS endpoint served with a web-PKI certificate: paths, methods, caching, counts, rotation."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from authlib.oidc.discovery import OpenIDProviderMetadata
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.pki import web_pki
from trustmesh import jose
from trustmesh.bundle import JwtAuthority
from trustmesh.controlplane.ca.authority import CAConfig, CertificateAuthority
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.oidc_discovery import (
    OidcDiscovery,
    discovery_document,
    jwks_document,
    oidc_paths,
    serve_oidc_discovery,
)
from trustmesh.controlplane.store import Store, open_store
from trustmesh.errors import ListenError
from trustmesh.httpserver import HttpServer
from trustmesh.jwtsvid import parse_insecure, validate_jwt_svid
from trustmesh.metrics import Registry
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.tls import server_context_from_files

TD = TrustDomain("example.org")
LEDGER = SpiffeId.parse("spiffe://example.org/ledger")
KEK = KeyEncryptionKey(bytes(range(32)))
NOW = datetime.now(timezone.utc)
ISSUER = "https://localhost/mesh"


def _ec(curve: ec.EllipticCurve) -> JwtAuthority:
    return JwtAuthority(f"k-{curve.name}", ec.generate_private_key(curve).public_key())


# --- the documents (pure) ----------------------------------------------------------------------


def test_paths_follow_the_issuer_path() -> None:
    bare = oidc_paths("https://oidc.bank.example")
    assert (bare.discovery, bare.jwks, bare.authorize) == ("/.well-known/openid-configuration", "/keys", "/authorize")
    assert bare.discovery_url == "https://oidc.bank.example/.well-known/openid-configuration"
    nested = oidc_paths("https://oidc.bank.example:8443/mesh/prod")
    assert nested.discovery == "/mesh/prod/.well-known/openid-configuration"
    assert nested.jwks_uri == "https://oidc.bank.example:8443/mesh/prod/keys"


def test_discovery_document_is_valid_openid_provider_metadata() -> None:
    paths = oidc_paths(ISSUER)
    doc = discovery_document(paths, [_ec(ec.SECP256R1()), _ec(ec.SECP384R1())])
    OpenIDProviderMetadata(doc).validate()  # raises on any violation of Discovery 1.0 / RFC 8414
    assert doc["issuer"] == ISSUER and doc["jwks_uri"] == ISSUER + "/keys"
    assert doc["response_types_supported"] == ["id_token"] and doc["subject_types_supported"] == ["public"]
    # The keys' algorithms, plus RS256 which the standard requires in the list.
    assert doc["id_token_signing_alg_values_supported"] == ["ES256", "ES384", "RS256"]
    assert doc["authorization_endpoint"].startswith(ISSUER + "/")


@pytest.mark.parametrize("authority, expected", [
    (_ec(ec.SECP256R1()), {"kty": "EC", "crv": "P-256", "alg": "ES256"}),
    (_ec(ec.SECP521R1()), {"kty": "EC", "crv": "P-521", "alg": "ES512"}),
    (JwtAuthority("k-rsa", rsa.generate_private_key(65537, 2048).public_key()), {"kty": "RSA", "alg": "RS256"}),
    (JwtAuthority("k-ed", ed25519.Ed25519PrivateKey.generate().public_key()),
     {"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA"}),
])
def test_jwks_names_each_key_for_relying_parties(authority: JwtAuthority, expected: dict[str, str]) -> None:
    (jwk,) = jwks_document([authority])["keys"]
    assert {k: jwk[k] for k in expected} == expected
    assert jwk["kid"] == authority.key_id and jwk["use"] == "sig"
    assert not {"d", "p", "q", "x5c"} & set(jwk)  # public only, and no X.509 authorities
    assert jose.same_public_key(jose.jwk_to_public_key(jwk), authority.public_key)


# --- JWT-SVIDs carry `iss` exactly when an issuer is configured --------------------------------


async def _ca(tmp_path: Path, name: str, issuer: str | None) -> tuple[CertificateAuthority, Store]:
    (tmp_path / name).mkdir()
    store = await open_store("sqlite", tmp_path / name)
    ca = await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r1", jwt_issuer=issuer),
                                                   store, KEK)
    return ca, store


@pytest.mark.parametrize("issuer", [ISSUER, None])
async def test_jwt_svid_iss_claim(tmp_path: Path, issuer: str | None) -> None:
    ca, store = await _ca(tmp_path, "ca", issuer)
    try:
        token, _ = ca.sign_jwt_svid(LEDGER, ["sts.amazonaws.com"], timedelta(minutes=5))
        header, claims = parse_insecure(token)
        assert claims.get("iss") == issuer and ("iss" in claims) == (issuer is not None)
        assert header["kid"] in ca.jwt_authorities()
        # SPIFFE validation is unchanged by the extra claim.
        checked = validate_jwt_svid(token, audience="sts.amazonaws.com", jwt_authorities={TD: ca.jwt_authorities()},
                                    now=datetime.now(timezone.utc))
        assert checked.spiffe_id == LEDGER
    finally:
        ca.close()
        await store.close()


# --- the HTTPS endpoint ------------------------------------------------------------------------


@dataclass
class Running:
    ca: CertificateAuthority
    metrics: Registry
    server: HttpServer
    client: httpx.AsyncClient
    roots: ssl.SSLContext

    @property
    def base(self) -> str:
        return f"https://localhost:{self.server.port}"

    def count(self, path: str, status: int) -> float:
        return self.metrics.counter("trustmesh_oidc_discovery_requests_total", "", ["path", "status"]).value(
            path=path, status=str(status))


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    ca, store = await _ca(tmp_path, "ca", ISSUER)
    ca_file, cert, key = web_pki(tmp_path)
    metrics = Registry()
    server = await serve_oidc_discovery(OidcDiscovery(ISSUER, ca.bundle, metrics), "127.0.0.1:0",
                                        server_context_from_files(cert, key, "flags"))
    roots = ssl.create_default_context(cafile=str(ca_file))
    client = httpx.AsyncClient(verify=roots)
    try:
        yield Running(ca, metrics, server, client, roots)
    finally:
        await client.aclose()
        await server.wait_closed()
        ca.close()
        await store.close()


async def test_serves_discovery_and_the_jwt_keys(running: Running) -> None:
    got = await running.client.get(running.base + "/mesh/.well-known/openid-configuration")
    assert got.status_code == 200 and got.headers["content-type"] == "application/json"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["cache-control"] == "public, max-age=60" and got.headers["etag"].startswith('"')
    doc = got.json()
    OpenIDProviderMetadata(doc).validate()
    assert doc["issuer"] == ISSUER and doc["id_token_signing_alg_values_supported"] == ["ES256", "RS256"]
    keys = (await running.client.get(running.base + "/mesh/keys")).json()["keys"]
    assert [k["kid"] for k in keys] == list(running.ca.jwt_authorities())
    assert all(k["use"] == "sig" and k["alg"] == "ES256" and k["kty"] == "EC" and k["crv"] == "P-256" for k in keys)
    assert running.count("discovery", 200) == 1 and running.count("jwks", 200) == 1


async def test_keys_follow_root_rotation_prepared_key_first(running: Running) -> None:
    async def kids() -> list[str]:
        return [k["kid"] for k in (await running.client.get(running.base + "/mesh/keys")).json()["keys"]]

    (first,) = await kids()
    await running.ca.prepare_root()
    # Published while only prepared: relying parties learn it before any token is signed with it.
    prepared = [kid for kid in await kids() if kid != first]
    assert len(prepared) == 1
    token, _ = running.ca.sign_jwt_svid(LEDGER, ["vault"], timedelta(minutes=1))
    assert parse_insecure(token)[0]["kid"] == first
    await running.ca.activate_root()
    token, _ = running.ca.sign_jwt_svid(LEDGER, ["vault"], timedelta(minutes=1))
    assert parse_insecure(token)[0]["kid"] == prepared[0] and set(await kids()) == {first, prepared[0]}


async def test_conditional_and_head_requests(running: Running) -> None:
    url = running.base + "/mesh/keys"
    first = await running.client.get(url)
    tag = first.headers["etag"]
    again = await running.client.get(url, headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""
    weak = await running.client.get(url, headers={"If-None-Match": f'"other", W/{tag}'})
    assert weak.status_code == 304
    changed = await running.client.get(url, headers={"If-None-Match": '"stale"'})
    assert changed.status_code == 200 and changed.content == first.content
    head = await running.client.head(url)
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == tag
    assert int(head.headers["content-length"]) == len(first.content)
    # A new key changes the document, so the old tag no longer matches.
    await running.ca.prepare_root()
    assert (await running.client.get(url, headers={"If-None-Match": tag})).status_code == 200


async def test_only_the_two_documents_and_only_get(running: Running) -> None:
    for path in ("/", "/mesh", "/mesh/", "/.well-known/openid-configuration", "/keys", "/mesh/keys/",
                 "/mesh/.well-known/", "/mesh/.well-known/openid-configuration/", "/mesh/%6beys", "/MESH/keys",
                 "/mesh/authorize"):
        got = await running.client.get(running.base + path)
        assert got.status_code == 404, path
        assert got.headers["cache-control"] == "no-store" and got.headers["x-content-type-options"] == "nosniff"
        assert b"keys" not in got.content  # nothing listed
    assert b"Workload API" in (await running.client.get(running.base + "/mesh/authorize")).content
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        got = await running.client.request(method, running.base + "/mesh/keys")
        assert got.status_code == 405 and got.headers["allow"] == "GET, HEAD", method
    # The query is ignored: a cache-busting relying party still gets the keys.
    assert (await running.client.get(running.base + "/mesh/keys?x=1")).status_code == 200
    assert running.count("other", 404) == 12 and running.count("jwks", 405) == 5


async def _raw(port: int, roots: ssl.SSLContext, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("localhost", port, ssl=roots)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_hostile_requests_are_bounded_and_counted(running: Running) -> None:
    port = running.server.port
    assert (await _raw(port, running.roots, b"garbage\r\n\r\n")).split(b" ")[1] == b"400"
    long_line = b"GET /mesh/keys?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert (await _raw(port, running.roots, long_line)).split(b" ")[1] in (b"400", b"414")
    big_header = b"GET /mesh/keys HTTP/1.1\r\nHost: localhost\r\nX: " + b"b" * 20_000 + b"\r\n\r\n"
    assert (await _raw(port, running.roots, big_header)).split(b" ")[1] in (b"400", b"431")
    # One request per connection: a pipelined second request is not answered.
    two = b"GET /mesh/keys HTTP/1.1\r\nHost: localhost\r\n\r\nGET /mesh/keys HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert (await _raw(port, running.roots, two)).count(b"HTTP/1.1 200") == 1
    assert sum(running.count("-", s) for s in (400, 414, 431)) == 3
    # Plain HTTP on the TLS port gets no document.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /mesh/keys HTTP/1.1\r\nHost: localhost\r\n\r\n")
    try:
        answer = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        answer = b""
    finally:
        writer.close()
    assert b'"keys"' not in answer


async def test_the_discovery_port_taken_is_one_line_naming_the_flag(running: Running) -> None:
    with pytest.raises(ListenError, match="--oidc-discovery-bind"):
        await serve_oidc_discovery(OidcDiscovery(ISSUER, running.ca.bundle, Registry()),
                                   f"127.0.0.1:{running.server.port}", ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))


def test_issuer_without_path_serves_at_the_root() -> None:
    doc = json.loads(json.dumps(discovery_document(oidc_paths("https://oidc.bank.example"), [])))
    assert doc["jwks_uri"] == "https://oidc.bank.example/keys"
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
