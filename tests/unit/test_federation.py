"""Fetching partners' bundles from a real HTTPS bundle endpoint (in-process, loopback):
the happy path, and every way a partner's endpoint can fail or lie. A failed fetch never
replaces the last good bundle."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.pki import web_pki
from trustmesh.bundle import Bundle
from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.ca.authority import CAConfig, CertificateAuthority
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.config import ServerConfig
from trustmesh.controlplane.federation import (
    BundleFetchError,
    fetch_bundle,
    parse_endpoint_url,
    refresh,
    same_content,
    validate_bundle,
)
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store import Store, open_store
from trustmesh.controlplane.store.records import BundleRecord, FederationRecord
from trustmesh.keys import PrivateKey, generate_private_key
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.tls import load_key_and_chain, rotating_server_context, server_context_from_files
from trustmesh.x509svid import build_ca_certificate, build_leaf_certificate

PARTNER = TrustDomain("partner.example")
ENDPOINT_ID = "spiffe://partner.example/trustmesh/server"
NOW = datetime.now(timezone.utc)


@dataclass
class PartnerCA:
    td: TrustDomain
    key: PrivateKey = field(default_factory=generate_private_key)

    def __post_init__(self) -> None:
        self.root = build_ca_certificate(trust_domain=self.td, public_key=self.key.public_key(), issuer=None,
                                         issuer_key=self.key, not_before=NOW - timedelta(minutes=1),
                                         not_after=NOW + timedelta(days=1), path_length=1,
                                         common_name=f"test root {self.td}")

    def leaf(self, spiffe_id: str) -> tuple[bytes, bytes]:
        key = generate_private_key()
        cert = build_leaf_certificate(spiffe_id=SpiffeId.parse(spiffe_id), public_key=key.public_key(),
                                      issuer=self.root, issuer_key=self.key, not_before=NOW - timedelta(minutes=1),
                                      not_after=NOW + timedelta(hours=1))
        chain = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return chain, key_pem

    def bundle(self, sequence: int | None = 1, hint: int | None = 60) -> Bundle:
        return Bundle(self.td, (self.root,), (), sequence_number=sequence,
                      refresh_hint=None if hint is None else timedelta(seconds=hint))


@dataclass
class Endpoint:
    """A partner's bundle endpoint whose answer each test chooses."""

    answer: Callable[[], bytes]
    delay: float = 0.0
    port: int = 0
    requests: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/bundle"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(self.delay)
            writer.write(self.answer())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


def http(body: bytes, status: str = "200 OK") -> Callable[[], bytes]:
    return lambda: f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.fixture
async def partner() -> AsyncIterator[tuple[PartnerCA, Endpoint]]:
    ca = PartnerCA(PARTNER)
    endpoint = Endpoint(http(ca.bundle().to_jwks()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_key_and_chain(ctx, *ca.leaf(ENDPOINT_ID))
    server = await asyncio.start_server(endpoint.handle, "127.0.0.1", 0, ssl=ctx)
    endpoint.port = server.sockets[0].getsockname()[1]
    yield ca, endpoint
    server.close()


def relationship(endpoint: Endpoint, **kw: object) -> FederationRecord:
    fields: dict[str, object] = dict(trust_domain=PARTNER.name, endpoint_url=endpoint.url, profile="https_spiffe",
                                     endpoint_spiffe_id=ENDPOINT_ID, created_at=0.0)
    fields.update(kw)
    # Records hold parsed values; the tests name them as text, as the CLI would.
    sid = fields["endpoint_spiffe_id"]
    fields["endpoint_spiffe_id"] = SpiffeId.parse(sid) if isinstance(sid, str) and sid else None
    fields["trust_domain"] = TrustDomain(str(fields["trust_domain"]))
    return FederationRecord(**fields)  # type: ignore[arg-type]


async def test_a_good_fetch(partner: tuple[PartnerCA, Endpoint]) -> None:
    ca, endpoint = partner
    bundle, body = await fetch_bundle(relationship(endpoint), ca.bundle())
    assert bundle.x509_authorities == (ca.root,) and bundle.sequence_number == 1
    assert body == ca.bundle().to_jwks()


async def test_an_endpoint_with_another_spiffe_id_is_refused(partner: tuple[PartnerCA, Endpoint]) -> None:
    ca, endpoint = partner
    with pytest.raises(BundleFetchError, match="not the configured") as info:
        await fetch_bundle(relationship(endpoint, endpoint_spiffe_id="spiffe://partner.example/other"), ca.bundle())
    assert info.value.reason == "tls"


async def test_an_endpoint_not_chaining_to_the_known_bundle_is_refused(partner: tuple[PartnerCA, Endpoint]) -> None:
    _, endpoint = partner
    stranger = PartnerCA(PARTNER)  # same trust domain name, another CA: an impostor
    with pytest.raises(BundleFetchError) as info:
        await fetch_bundle(relationship(endpoint), stranger.bundle())
    assert info.value.reason == "tls"


@pytest.mark.parametrize("case, reason", [
    ("garbage", "garbage"), ("html", "garbage"), ("empty", "garbage"), ("status", "http_status"),
    ("other_td", "wrong_trust_domain"), ("rollback", "rollback"), ("huge", "garbage"), ("no_http", "garbage"),
])
async def test_bad_answers_are_refused(partner: tuple[PartnerCA, Endpoint], case: str, reason: str) -> None:
    ca, endpoint = partner
    other = PartnerCA(TrustDomain("third.example"))
    endpoint.answer = {
        "garbage": http(b"\x00\xff not json"),
        "html": http(b"<html>maintenance</html>"),
        "empty": http(json.dumps({"keys": []}).encode()),
        "status": http(b"oops", "500 Internal Server Error"),
        "other_td": http(other.bundle(sequence=9).to_jwks()),
        "rollback": http(ca.bundle(sequence=3).to_jwks()),
        "huge": lambda: b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n{",
        "no_http": lambda: b"SSH-2.0-OpenSSH\r\n\r\n",
    }[case]
    with pytest.raises(BundleFetchError) as info:
        await fetch_bundle(relationship(endpoint), ca.bundle(sequence=7))
    assert info.value.reason == reason, info.value


async def test_a_slow_endpoint_times_out(partner: tuple[PartnerCA, Endpoint]) -> None:
    ca, endpoint = partner
    endpoint.delay = 5
    with pytest.raises(BundleFetchError) as info:
        await fetch_bundle(relationship(endpoint), ca.bundle(), timeout=0.3)
    assert info.value.reason == "timeout"


async def test_a_down_endpoint() -> None:
    from tests.etcd_process import free_port

    ca = PartnerCA(PARTNER)
    endpoint = Endpoint(http(b""), port=free_port())
    with pytest.raises(BundleFetchError) as info:
        await fetch_bundle(relationship(endpoint), ca.bundle())
    assert info.value.reason == "unreachable"


def chunked(*chunks: bytes, size_lines: tuple[bytes, ...] = ()) -> Callable[[], bytes]:
    lines = size_lines or tuple(f"{len(c):x}".encode() for c in chunks)
    body = b"".join(line + b"\r\n" + c + b"\r\n" for line, c in zip(lines, chunks, strict=True))
    return lambda: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"


async def test_a_chunked_answer_is_decoded(partner: tuple[PartnerCA, Endpoint]) -> None:
    ca, endpoint = partner
    jwks = ca.bundle().to_jwks()
    endpoint.answer = chunked(jwks[:10], jwks[10:])
    bundle, body = await fetch_bundle(relationship(endpoint), ca.bundle())
    assert body == jwks and bundle.x509_authorities == (ca.root,)


@pytest.mark.parametrize("case, reason", [
    ("redirect", "http_status"), ("chunked_huge", "garbage"), ("bad_chunk", "garbage"), ("cut_short", "garbage"),
    ("huge_headers", "garbage"), ("bad_length", "garbage"), ("unbounded_huge", "garbage"), ("gzip", "garbage"),
])
async def test_hostile_http_is_refused(partner: tuple[PartnerCA, Endpoint], case: str, reason: str) -> None:
    import gzip

    ca, endpoint = partner
    jwks = ca.bundle().to_jwks()
    endpoint.answer = {
        # Redirects are not followed: the configured URL is the partner's endpoint.
        "redirect": lambda: (b"HTTP/1.1 302 Found\r\nLocation: https://elsewhere.example/\r\n"
                             b"Content-Length: 0\r\n\r\n"),
        "chunked_huge": chunked(*([b"x" * 65536] * 20)),
        "bad_chunk": chunked(b"{}", size_lines=(b"zz",)),
        "cut_short": lambda: b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + jwks[:10],
        "huge_headers": lambda: b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 20000 + b"\r\n\r\n" + jwks,
        "bad_length": lambda: b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n" + jwks,
        "unbounded_huge": lambda: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b" " * (2 * 1024 * 1024),
        # Not asked for (Accept-Encoding: identity), so not undone: no decompression bombs.
        "gzip": lambda: (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: "
                         + str(len(gzip.compress(jwks))).encode() + b"\r\n\r\n" + gzip.compress(jwks)),
    }[case]
    with pytest.raises(BundleFetchError) as info:
        await fetch_bundle(relationship(endpoint), ca.bundle())
    assert info.value.reason == reason, info.value
    assert endpoint.requests == 1


@dataclass
class ConnectProxy:
    """An HTTP CONNECT proxy, as an operator's egress proxy would be: it records each target."""

    targets: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, target, _ = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0].decode().split(" ")
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            self.targets.append(target)
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        sink.close()


async def test_the_fetch_goes_through_the_https_proxy(partner: tuple[PartnerCA, Endpoint],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.etcd_process import free_port

    ca, endpoint = partner
    proxy = ConnectProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        bundle, _ = await fetch_bundle(relationship(endpoint), ca.bundle())
        assert bundle.x509_authorities == (ca.root,)
        assert proxy.targets == [f"127.0.0.1:{endpoint.port}"] and endpoint.requests == 1
        # Through the tunnel the endpoint's SPIFFE ID is checked all the same.
        with pytest.raises(BundleFetchError, match="not the configured") as info:
            await fetch_bundle(relationship(endpoint, endpoint_spiffe_id="spiffe://partner.example/other"),
                               ca.bundle())
        assert info.value.reason == "tls" and len(proxy.targets) == 2
        # A proxy that is down is not gone around.
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
        with pytest.raises(BundleFetchError) as info:
            await fetch_bundle(relationship(endpoint), ca.bundle())
        assert info.value.reason == "unreachable" and endpoint.requests == 2
    finally:
        server.close()


@pytest.mark.parametrize("url", ["http://x.example/", "https:///nohost", "ftp://x.example/", "https://u:p@x.example/",
                                 "https://x.example:99999/", "x.example"])
def test_endpoint_urls_must_be_https_with_a_host(url: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint_url(url)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_validation_only_ever_raises_a_fetch_error(body: bytes) -> None:
    try:
        validate_bundle(body, PARTNER, None)
    except BundleFetchError:
        pass


# --- refresh: the last good bundle stays --------------------------------------------------------


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ServerRuntime]:
    store: Store = await open_store("sqlite", tmp_path)
    kek = KeyEncryptionKey(bytes(range(32)))
    config = ServerConfig(trust_domain=TrustDomain("example.org"), data_dir=tmp_path)
    ca = await CertificateAuthority.load_or_create(CAConfig(trust_domain=config.trust_domain, replica_id="r1"),
                                                   store, kek)
    yield ServerRuntime(config=config, store=store, ca=ca, audit=AuditLog(store, kek.derive("audit-chain")))
    await store.close()


async def test_refresh_stores_a_new_bundle_and_keeps_the_last_good_one_on_failure(
        runtime: ServerRuntime, partner: tuple[PartnerCA, Endpoint]) -> None:
    ca, endpoint = partner
    initial = ca.bundle(sequence=1)
    await runtime.store.create_federation(relationship(endpoint),
                                          BundleRecord(PARTNER, initial.to_jwks(), 1, 0.0))
    # A newer bundle (a second root, sequence 2) is fetched and stored.
    newer_root = PartnerCA(PARTNER)
    newer = Bundle(PARTNER, (ca.root, newer_root.root), (), sequence_number=2, refresh_hint=timedelta(seconds=30))
    endpoint.answer = http(newer.to_jwks())
    await refresh(runtime, await runtime.store.get_federation(PARTNER.name), actor="test")
    stored = await runtime.store.get_bundle(PARTNER.name)
    assert stored.jwks == newer.to_jwks() and stored.sequence == 2
    record = await runtime.store.get_federation(PARTNER.name)
    assert record.last_error == "" and record.next_refresh_at - record.last_refreshed_at == pytest.approx(30)
    # Then the endpoint serves garbage, then a rolled-back bundle: nothing replaces the good one.
    for answer in (http(b"{not json"), http(ca.bundle(sequence=1).to_jwks()), http(ca.bundle(sequence=1).to_jwks())):
        endpoint.answer = answer
        with pytest.raises(BundleFetchError):
            await refresh(runtime, await runtime.store.get_federation(PARTNER.name), actor="test")
        assert (await runtime.store.get_bundle(PARTNER.name)).jwks == newer.to_jwks()
    record = await runtime.store.get_federation(PARTNER.name)
    assert record.last_error.startswith("rollback:")
    counter = runtime.metrics.counter("trustmesh_federation_refresh_total", "", ["trust_domain", "outcome", "reason"])
    assert counter.value(trust_domain=PARTNER.name, outcome="failed", reason="garbage") == 1
    assert counter.value(trust_domain=PARTNER.name, outcome="failed", reason="rollback") == 2
    # A run of failures is audited once per kind (garbage, then rollback), not at every retry.
    events = [e.kind for e in await runtime.store.list_audit_events()]
    assert events.count("federation.refresh_failed") == 2 and events.count("federation.bundle_updated") == 1
    # The endpoint recovers: the next refresh succeeds and clears the error.
    endpoint.answer = http(replace(newer, sequence_number=3).to_jwks())
    await refresh(runtime, await runtime.store.get_federation(PARTNER.name), actor="test")
    assert (await runtime.store.get_federation(PARTNER.name)).last_error == ""


# --- our own bundle endpoint, fetched by our own client, in both profiles -----------------------


async def test_our_endpoint_over_https_web(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trustmesh.controlplane.bundle_endpoint import BundleEndpoint, serve_bundle_endpoint
    from trustmesh.metrics import Registry

    ca = PartnerCA(PARTNER)
    ca_file, cert, key = web_pki(tmp_path)
    endpoint = BundleEndpoint(lambda: ca.bundle(sequence=4, hint=None), timedelta(seconds=42), Registry(),
                              path="/bundle")
    server = await serve_bundle_endpoint(endpoint, "127.0.0.1:0", server_context_from_files(cert, key, "flags"))
    port = server.sockets[0].getsockname()[1]
    record = relationship(Endpoint(http(b""), port=port), endpoint_url=f"https://localhost:{port}/bundle",
                          profile="https_web", endpoint_spiffe_id="")
    try:
        # Without the web CA the certificate is not trusted ...
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
        with pytest.raises(BundleFetchError) as info:
            await fetch_bundle(record, None)
        assert info.value.reason == "tls"
        # ... with it (as with a public web CA) the bundle arrives, refresh hint included.
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        bundle, _ = await fetch_bundle(record, None)
        assert bundle.x509_authorities == (ca.root,) and bundle.sequence_number == 4
        assert bundle.refresh_hint == timedelta(seconds=42)
        # The endpoint serves only GET of its path.
        raw_ctx = ssl.create_default_context(cafile=str(ca_file))
        # (HTTP/1.1 without Host is a 400, as RFC 9112 section 3.2 requires.)
        for request, status in ((b"GET /other HTTP/1.1\r\nHost: localhost\r\n\r\n", b"404"),
                                (b"POST /bundle HTTP/1.1\r\nHost: localhost\r\n\r\n", b"405"),
                                (b"garbage\r\n\r\n", b"400"), (b"GET /bundle HTTP/1.1\r\n\r\n", b"400")):
            reader, writer = await asyncio.open_connection("localhost", port, ssl=raw_ctx)
            writer.write(request)
            await writer.drain()
            assert (await reader.read(64)).split(b" ")[1] == status
            writer.close()
    finally:
        server.close()


async def test_our_endpoint_over_https_spiffe_serves_the_rotated_svid(tmp_path: Path) -> None:
    from trustmesh.controlplane.bundle_endpoint import BundleEndpoint, serve_bundle_endpoint
    from trustmesh.metrics import Registry

    ca = PartnerCA(PARTNER)

    class Svid:
        version = 1
        chain_pem, key_pem = ca.leaf(ENDPOINT_ID)

    svid = Svid()
    endpoint = BundleEndpoint(lambda: ca.bundle(), timedelta(minutes=5), Registry())
    server = await serve_bundle_endpoint(endpoint, "127.0.0.1:0", rotating_server_context(svid))
    port = server.sockets[0].getsockname()[1]
    record = relationship(Endpoint(http(b""), port=port), endpoint_url=f"https://127.0.0.1:{port}/")
    try:
        await fetch_bundle(record, ca.bundle())
        # Rotated to an SVID with another ID: the next handshake presents it, and a client
        # configured for the old ID refuses it.
        svid.chain_pem, svid.key_pem = ca.leaf("spiffe://partner.example/elsewhere")
        svid.version = 2
        with pytest.raises(BundleFetchError, match="not the configured"):
            await fetch_bundle(record, ca.bundle())
    finally:
        server.close()


async def _exchange(port: int, ctx: ssl.SSLContext | None, request: bytes) -> bytes:
    """Send `request`, then read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("localhost" if ctx else "127.0.0.1", port, ssl=ctx)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 3)
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        writer.close()


async def test_our_endpoint_headers_counts_and_hostile_clients(tmp_path: Path) -> None:
    from trustmesh.controlplane.bundle_endpoint import BundleEndpoint, serve_bundle_endpoint
    from trustmesh.httpserver import Limits
    from trustmesh.metrics import Registry

    ca = PartnerCA(PARTNER)
    ca_file, cert, key = web_pki(tmp_path)
    metrics = Registry()
    endpoint = BundleEndpoint(lambda: ca.bundle(), timedelta(minutes=5), metrics, path="/bundle")
    server = await serve_bundle_endpoint(endpoint, "127.0.0.1:0", server_context_from_files(cert, key, "flags"),
                                         limits=Limits(request_timeout=0.5))
    port = server.sockets[0].getsockname()[1]
    ctx = ssl.create_default_context(cafile=str(ca_file))
    loop = asyncio.get_running_loop()
    try:
        answer = await _exchange(port, ctx, b"GET /bundle?ignored=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, body = answer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 200 OK"
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
        assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
        assert headers["connection"] == "close"  # one request per connection
        assert Bundle.from_jwks(body, PARTNER).refresh_hint == timedelta(minutes=5)
        # Oversized request lines and headers are refused, not buffered.
        long_line = await _exchange(port, ctx, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert long_line.split(b" ")[1] == b"400"
        long_header = await _exchange(port, ctx, b"GET /bundle HTTP/1.1\r\nHost: localhost\r\nX: "
                                      + b"a" * 20000 + b"\r\n\r\n")
        assert long_header.split(b" ")[1] in (b"400", b"431")
        # A client that sends half a request, or never starts TLS, is cut off at the limit.
        for tls, request in ((ctx, b"GET /bundle HTTP/1.1\r\n"), (None, b"")):
            started = loop.time()
            assert await _exchange(port, tls, request) == b""
            assert loop.time() - started < 2.5
        # Every answer is counted by status, aiohttp's own 400s included.
        requests = metrics.counter("trustmesh_bundle_endpoint_requests_total", "", ["status"])
        assert requests.value(status="200") == 1 and requests.value(status="400") >= 1
    finally:
        await server.wait_closed()


# --- sequence numbers: once carried, always carried, only upwards (issue 14, hole 6) ----------


def test_once_a_partner_numbered_its_bundles_it_cannot_stop_or_go_back() -> None:
    ca, newer = PartnerCA(PARTNER), PartnerCA(PARTNER)
    held = Bundle(PARTNER, (newer.root,), sequence_number=5)
    both = Bundle(PARTNER, (ca.root, newer.root))
    for known, carried in ((held, None), (None, 5), (Bundle(PARTNER, (newer.root,)), 5)):
        with pytest.raises(BundleFetchError, match="carries no spiffe_sequence") as info:
            validate_bundle(both.to_jwks(), PARTNER, known, carried=carried)
        assert info.value.reason == "no_sequence"
        with pytest.raises(BundleFetchError, match="went back from sequence 5 to 1"):
            validate_bundle(both.with_sequence_number(1).to_jwks(), PARTNER, known, carried=carried)
    with pytest.raises(BundleFetchError, match="kept sequence 5") as info:
        validate_bundle(both.with_sequence_number(5).to_jwks(), PARTNER, held, carried=5)
    assert info.value.reason == "sequence_reused"
    # The same content in other bytes, and anything from a partner that never numbered: taken.
    reordered = json.loads(held.to_jwks())
    assert validate_bundle(json.dumps(reordered).encode(), PARTNER, held, carried=5) == held
    assert validate_bundle(both.to_jwks(), PARTNER, Bundle(PARTNER, (ca.root,)), carried=None) == both


def test_same_content_ignores_order_bytes_and_hint() -> None:
    a, b = PartnerCA(PARTNER), PartnerCA(PARTNER)
    one = Bundle(PARTNER, (a.root, b.root), sequence_number=3, refresh_hint=timedelta(seconds=1))
    assert same_content(one, Bundle(PARTNER, (b.root, a.root), sequence_number=3))
    assert not same_content(one, one.with_sequence_number(4))
    assert not same_content(one, one.with_x509_authorities([a.root]))


async def test_an_unchanged_bundle_is_not_stored_again_and_the_sequence_is_kept(
        runtime: ServerRuntime, partner: tuple[PartnerCA, Endpoint]) -> None:
    ca, endpoint = partner
    await runtime.store.create_federation(relationship(endpoint), BundleRecord(PARTNER, ca.bundle(1).to_jwks(), 1, 0.0))
    document = json.loads(ca.bundle(2).to_jwks())
    for body in (json.dumps(document, indent=2), json.dumps(document), json.dumps(document, sort_keys=True)):
        endpoint.answer = http(body.encode())
        await refresh(runtime, await runtime.store.get_federation(PARTNER.name), actor="test")
    assert (await runtime.store.get_bundle(PARTNER.name)).sequence == 2  # the record's own counter: one write
    assert (await runtime.store.get_federation(PARTNER.name)).spiffe_sequence == 2
    events = [e.kind for e in await runtime.store.list_audit_events()]
    assert events == ["federation.bundle_updated"]
