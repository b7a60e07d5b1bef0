"""OIDC discovery end to end: a real server with --oidc-issuer and --oidc-discovery-bind, a real
agent, JWT-SVIDs fetched through its Workload API, and a standard OIDC relying-party library
(authlib) that starts from the discovery URL, fetches the JWKS it names, and validates the
token's signature, `iss`, `aud` and `exp`, as cloud IAM or Vault would.

One server pair per module: ours (issuer set), and a second trust domain without an issuer,
whose tokens carry no `iss` and must be refused by our relying party.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from authlib.integrations.base_client import BaseApp
from authlib.integrations.base_client.async_app import AsyncOAuth2Mixin
from authlib.integrations.base_client.async_openid import AsyncOpenIDMixin
from authlib.oidc.core import CodeIDToken
from authlib.oidc.discovery import OpenIDProviderMetadata
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    UnsupportedAlgorithmError,
)

from tests.integration.harness import AgentProcess, ServerProcess
from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
from trustmesh.jwtsvid import parse_insecure

with warnings.catch_warnings():
    # authlib's httpx client prefers the `httpx2` package and warns when it runs on httpx,
    # which is what this project already depends on.
    warnings.simplefilter("ignore")
    from authlib.integrations.httpx_client import AsyncOAuth2Client

HEADER = [("workload.spiffe.io", "true")]
LEDGER = "spiffe://example.org/ledger"
SHORT = "spiffe://example.org/short-lived"
AWS = "sts.amazonaws.com"


class RelyingParty(AsyncOAuth2Mixin, AsyncOpenIDMixin, BaseApp):  # type: ignore[misc]
    """authlib's OpenID Connect client without a web framework: it needs only the discovery
    URL (server_metadata_url) and its client ID, which is the audience it accepts."""

    client_cls = AsyncOAuth2Client


@dataclass
class Mesh:
    server: ServerProcess
    agent: AgentProcess
    issuer: str
    oidc_address: str
    other_server: ServerProcess
    other_agent: AgentProcess

    @property
    def discovery_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    def roots(self) -> ssl.SSLContext:
        """What a relying party is told to trust: here the server's own SVID serves discovery,
        so its trust bundle (a cloud provider would need a publicly trusted certificate)."""
        return ssl.create_default_context(cafile=str(self.server.bundle_path))

    def relying_party(self, audience: str) -> RelyingParty:
        return RelyingParty(None, client_id=audience, server_metadata_url=self.discovery_url,
                            client_kwargs={"verify": self.roots()})


def _free_port() -> int:
    # The issuer names its port before the server starts, as a real issuer URL does.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _agent(server: ServerProcess, directory: Path) -> AgentProcess:
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    return AgentProcess(server, directory, join_token=token).start()


def _entry(server: ServerProcess, spiffe_id: str, *extra: str) -> None:
    server.cli("entry", "create", "--spiffe-id", spiffe_id, "--node", "node-1",
               "--selector", f"unix:uid:{os.getuid()}", *extra, check=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("oidc")
    port = _free_port()
    issuer = f"https://localhost:{port}/mesh"
    started: list[ServerProcess | AgentProcess] = []
    try:
        server = ServerProcess(data_dir=root / "server", extra=[
            "--oidc-discovery-bind", f"127.0.0.1:{port}", "--oidc-issuer", issuer])
        started.append(server.start())
        other = ServerProcess(data_dir=root / "other", trust_domain="other.example")
        started.append(other.start())
        _entry(server, LEDGER)
        _entry(server, SHORT, "--jwt-ttl", "1s")
        _entry(other, "spiffe://other.example/ledger")
        agent = _agent(server, root / "agent")
        started.append(agent)
        other_agent = _agent(other, root / "other-agent")
        started.append(other_agent)
        ready = re.search(r"event=ready .*oidc_discovery=(\S+)", server.log())
        assert ready, server.log()
        yield Mesh(server, agent, issuer, ready.group(1), other, other_agent)
    finally:
        for process in reversed(started):
            process.stop()


def _jwt(agent: AgentProcess, audience: str, spiffe_id: str = "") -> str:
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        reply = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=[audience], spiffe_id=spiffe_id), metadata=HEADER, timeout=15)
        return str(reply.svids[0].svid)


async def _validate(party: RelyingParty, token: str, audience: str, expected_issuer: str) -> dict[str, Any]:
    """What a relying party does with a bearer JWT: discovery (checked against the issuer it was
    configured with), then the JWKS it names, then signature, iss, aud and exp, no leeway."""
    metadata = await party.load_server_metadata()
    assert metadata["issuer"] == expected_issuer  # Discovery section 4.3
    OpenIDProviderMetadata({k: v for k, v in metadata.items() if not k.startswith("_")}).validate()
    options = {"iss": {"essential": True, "value": expected_issuer}, "aud": {"essential": True, "value": audience},
               "sub": {"essential": True}, "exp": {"essential": True}}
    claims = await party.parse_id_token({"id_token": token}, nonce=None, claims_options=options,
                                        claims_cls=CodeIDToken, leeway=0)
    return dict(claims)


async def test_a_relying_party_accepts_a_jwt_svid_from_the_workload_api(mesh: Mesh) -> None:
    token = _jwt(mesh.agent, AWS)
    header, raw = parse_insecure(token)
    assert raw["iss"] == mesh.issuer
    claims = await _validate(mesh.relying_party(AWS), token, AWS, mesh.issuer)
    assert claims["sub"] == LEDGER and claims["aud"] == [AWS] and claims["iss"] == mesh.issuer
    # The JWKS holds exactly the JWT authorities, named for relying parties.
    async with httpx.AsyncClient(verify=mesh.roots()) as client:
        keys = (await client.get(mesh.issuer + "/keys")).json()["keys"]
    assert header["kid"] in {k["kid"] for k in keys}
    assert all(k["use"] == "sig" and k["alg"] == "ES256" and k["kty"] == "EC" and k["crv"] == "P-256"
               and "x5c" not in k for k in keys)
    # The listener is announced where operators look for it, and `trustmesh check` finds it.
    assert mesh.oidc_address == mesh.issuer.split("//")[1].split("/")[0].replace("localhost", "127.0.0.1")
    checks = json.loads(mesh.server.cli("check", "--json").stdout)
    (oidc,) = [c for c in checks if "OIDC" in c["name"]]
    assert oidc["status"] == "ok" and mesh.discovery_url.split("/mesh")[1] in oidc["detail"], oidc


def _forge(token: str, header: dict[str, Any], key: bytes = b"") -> str:
    """`token`'s claims under another header, HMAC-signed with `key` (empty: unsigned)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    body = token.split(".")[1]
    signing_input = f"{b64(json.dumps(header).encode())}.{body}"
    signature = b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest()) if key else ""
    return f"{signing_input}.{signature}"


async def test_the_relying_party_refuses_what_it_must(mesh: Mesh) -> None:
    token = _jwt(mesh.agent, AWS)
    # Another audience: a token for AWS is no good at Vault.
    with pytest.raises(InvalidClaimError, match="aud"):
        await _validate(mesh.relying_party("vault"), token, "vault", mesh.issuer)
    # A tampered signature.
    head, body, signature = token.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    with pytest.raises(BadSignatureError):
        await _validate(mesh.relying_party(AWS), f"{head}.{body}.{flipped}", AWS, mesh.issuer)
    # Algorithm confusion: HS256 keyed with the published public key, and no signature at all.
    kid = parse_insecure(token)[0]["kid"]
    async with httpx.AsyncClient(verify=mesh.roots()) as client:
        public = (await client.get(mesh.issuer + "/keys")).content
    for forged in (_forge(token, {"alg": "HS256", "kid": kid, "typ": "JWT"}, public),
                   _forge(token, {"alg": "none", "kid": kid, "typ": "JWT"})):
        with pytest.raises(UnsupportedAlgorithmError):
            await _validate(mesh.relying_party(AWS), forged, AWS, mesh.issuer)
    # A JWT-SVID of another trust domain, whose server has no issuer: no `iss`, and a key
    # our JWKS does not hold.
    foreign = _jwt(mesh.other_agent, AWS)
    assert "iss" not in parse_insecure(foreign)[1]
    with pytest.raises(InvalidKeyIdError):
        await _validate(mesh.relying_party(AWS), foreign, AWS, mesh.issuer)
    # Expired: a one-second JWT-SVID, presented after its `exp`.
    short = _jwt(mesh.agent, AWS, SHORT)
    expires = parse_insecure(short)[1]["exp"]
    while time.time() < expires + 1:
        time.sleep(0.2)
    with pytest.raises(ExpiredTokenError):
        await _validate(mesh.relying_party(AWS), short, AWS, mesh.issuer)


async def test_only_get_and_head_of_the_two_documents(mesh: Mesh) -> None:
    async with httpx.AsyncClient(verify=mesh.roots()) as client:
        for path in ("", "/", "/mesh/", "/.well-known/openid-configuration", "/keys", "/mesh/authorize"):
            got = await client.get(f"https://{mesh.issuer.split('//')[1].split('/')[0]}{path}")
            assert got.status_code == 404, path
        for method in ("POST", "PUT", "DELETE"):
            got = await client.request(method, mesh.discovery_url)
            assert got.status_code == 405 and got.headers["allow"] == "GET, HEAD"
        head = await client.head(mesh.discovery_url)
        assert head.status_code == 200 and head.content == b"" and head.headers["x-content-type-options"] == "nosniff"
        got = await client.get(mesh.discovery_url)
        assert got.headers["content-type"] == "application/json" and "max-age" in got.headers["cache-control"]
