"""SPIFFE federation: fetch partner trust domains' bundles from their bundle endpoints.

A partner's bundle endpoint is hostile input like any network peer. A fetch that fails in
any way (down, slow, garbage, a bundle naming another trust domain, a sequence number that
went backwards, a TLS identity that is not the configured one) changes nothing: the last
good bundle stays in force, the failure is logged at ERROR, counted in
`trustmesh_federation_refresh_total{outcome="failed"}`, kept on the relationship
(`trustmesh federation list` shows it) and audited once per run of failures of one kind.

Rollback: once a partner's bundle has carried a `spiffe_sequence`, every later one must carry
one (a bundle without could re-add a root the partner removed), never lower, and the same
number only with the same authorities. The highest sequence seen is kept on the relationship
record, so a restart does not forget it. A bundle with the same authorities and sequence as
the one held is not stored or audited again, whatever its bytes (key order, whitespace).

Profiles, as the SPIFFE federation standard defines them:
- `https_web`: the endpoint has a web-PKI server certificate for its host name, checked
  against the system's CA certificates (or $SSL_CERT_FILE).
- `https_spiffe`: the endpoint presents an X509-SVID with the configured SPIFFE ID, which
  must chain to the partner's bundle we already hold (given out of band at `federation add`,
  then kept current by these fetches).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from urllib.parse import urlsplit

import httpx
from cryptography import x509

from trustmesh.bundle import Bundle
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import BundleRecord, FederationRecord
from trustmesh.errors import BundleError, InvalidSpiffeIdError, TrustmeshError, VerificationError
from trustmesh.logs import log_event
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.tls import peer_chain
from trustmesh.x509svid import verify_x509_svid

log = logging.getLogger("trustmesh.federation")

PROFILES = ("https_web", "https_spiffe")
FETCH_TIMEOUT = 10.0
MAX_RESPONSE_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
DEFAULT_REFRESH = timedelta(minutes=5)
MIN_REFRESH = timedelta(seconds=1)
MAX_REFRESH = timedelta(hours=1)
RETRY_AFTER_FAILURE = timedelta(seconds=30)


class BundleFetchError(TrustmeshError):
    """A partner's bundle could not be fetched or was refused; `reason` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path: str
    url: str


def parse_endpoint_url(url: str) -> Endpoint:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"bundle endpoint {url!r} must be an https:// URL with a host, e.g. "
                         "https://bundle.partner.example:8443/")
    if parts.username or parts.password or parts.fragment:
        raise ValueError(f"bundle endpoint {url!r} must not carry credentials or a fragment")
    try:
        port = parts.port or 443
    except ValueError as err:
        raise ValueError(f"bundle endpoint {url!r} has a bad port") from err
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Endpoint(parts.hostname, port, path, url)


def refresh_interval(bundle: Bundle) -> timedelta:
    """The partner's refresh hint, within sane bounds (default 5 minutes)."""
    hint = bundle.refresh_hint or DEFAULT_REFRESH
    return max(MIN_REFRESH, min(MAX_REFRESH, hint))


# --- fetching -------------------------------------------------------------------------------


def _client_context(profile: str, known: Bundle | None) -> ssl.SSLContext:
    if profile == "https_web":
        ctx = ssl.create_default_context()  # system CAs; honours $SSL_CERT_FILE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
    if known is None or not known.x509_authorities:
        raise BundleFetchError("no_bundle", "https_spiffe needs the partner's current bundle to authenticate "
                                            "its endpoint; add the relationship with --bundle-file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the endpoint is checked by SPIFFE ID below instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=known.x509_authorities_pem().decode())
    return ctx


def _check_spiffe_peer(ssl_object: ssl.SSLObject | None, known: Bundle, expected: SpiffeId) -> None:
    chain = peer_chain(ssl_object) if ssl_object is not None else []
    if not chain:
        raise BundleFetchError("tls", "the bundle endpoint presented no certificate")
    try:
        # Again with our own verifier, against the partner's roots only (OpenSSL already
        # checked the chain, but not which SPIFFE ID it names).
        found = verify_x509_svid(chain, {known.trust_domain: list(known.x509_authorities)})
    except VerificationError as err:
        raise BundleFetchError("tls", f"the bundle endpoint's certificate is not a valid SVID of "
                                      f"{known.trust_domain}: {err}") from err
    if found != expected:
        raise BundleFetchError("tls", f"the bundle endpoint is {found}, not the configured {expected}")


def _check_head(response: httpx.Response) -> None:
    if response.status_code != 200:  # redirects included: they are not followed
        raise BundleFetchError("http_status", f"the bundle endpoint answered HTTP {response.status_code}")
    if sum(len(name) + len(value) + 4 for name, value in response.headers.raw) > MAX_HEADER_BYTES:
        raise BundleFetchError("garbage", "the bundle endpoint's response headers are too large")
    length = response.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_RESPONSE_BYTES):
        raise BundleFetchError("garbage", "the bundle endpoint's response is too large or has a bad length")


async def _read_body(response: httpx.Response) -> bytes:
    body = bytearray()
    # Raw bytes: no Content-Encoding is asked for or undone (a compressed body is not a bundle),
    # so the cap bounds what is held in memory.
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            raise BundleFetchError("garbage", "the bundle endpoint's response is larger than 1 MiB")
    return bytes(body)


async def _get(endpoint: Endpoint, ctx: ssl.SSLContext, timeout: float,
               check_peer: Callable[[ssl.SSLObject | None], None] | None) -> bytes:
    try:
        # trust_env: HTTPS_PROXY / NO_PROXY from the environment, as operators expect.
        client = httpx.AsyncClient(verify=ctx, trust_env=True, follow_redirects=False,
                                   timeout=httpx.Timeout(timeout),
                                   limits=httpx.Limits(max_connections=1, max_keepalive_connections=0))
    except ImportError as err:  # e.g. ALL_PROXY=socks5://... without socksio
        raise BundleFetchError("config", f"cannot use the proxy the environment names: {err}") from err
    async with client:
        request = client.build_request("GET", endpoint.url, headers={
            "Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": "trustmesh"})
        response = await client.send(request, stream=True)
        try:
            if check_peer is not None:
                # Before a byte of the body is read: the request carries nothing secret, the
                # answer is trusted only once the endpoint has proven its SPIFFE ID.
                stream = response.extensions.get("network_stream")
                check_peer(stream.get_extra_info("ssl_object") if stream is not None else None)
            _check_head(response)
            return await _read_body(response)
        finally:
            await response.aclose()


def _chain(err: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and seen not in found:
        found.append(seen)
        seen = seen.__cause__ or seen.__context__
    return found


def _fetch_error(err: httpx.HTTPError, endpoint: Endpoint) -> BundleFetchError:
    """httpx's errors in the terms of BundleFetchError.reason (the metric label)."""
    chain = _chain(err)
    tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
    if tls is not None:
        return BundleFetchError("tls", f"TLS with {endpoint.url} failed: {tls.reason or tls}")
    if isinstance(err, (httpx.ProtocolError, httpx.DecodingError)):
        return BundleFetchError("garbage", f"the bundle endpoint did not answer valid HTTP: {err}")
    # The most specific cause: "Connection refused" rather than "all connection attempts failed".
    detail = next((e.strerror for e in chain if isinstance(e, OSError) and e.strerror), str(err) or type(err).__name__)
    return BundleFetchError("unreachable", f"cannot reach {endpoint.url}: {detail}")


async def fetch_bundle(relationship: FederationRecord, known: Bundle | None, *,
                       timeout: float = FETCH_TIMEOUT) -> tuple[Bundle, bytes]:
    """Fetch and validate the partner's bundle; (bundle, the JWKS bytes as served)."""
    td = relationship.trust_domain
    endpoint = parse_endpoint_url(relationship.endpoint_url)
    ctx = _client_context(relationship.profile, known)
    check_peer = None
    if relationship.profile == "https_spiffe":
        assert known is not None  # _client_context refused https_spiffe without it
        if relationship.endpoint_spiffe_id is None:
            raise InvalidSpiffeIdError("", "an https_spiffe relationship needs the endpoint's SPIFFE ID")
        check_peer = partial(_check_spiffe_peer, known=known, expected=relationship.endpoint_spiffe_id)
    try:
        async with asyncio.timeout(timeout):
            body = await _get(endpoint, ctx, timeout, check_peer)
    except (TimeoutError, httpx.TimeoutException) as err:
        raise BundleFetchError("timeout", f"the bundle endpoint {endpoint.url} did not answer within "
                                          f"{timeout:.0f}s") from err
    except httpx.HTTPError as err:
        raise _fetch_error(err, endpoint) from err
    except ssl.SSLError as err:
        raise BundleFetchError("tls", f"TLS with {endpoint.url} failed: {err.reason or err}") from err
    except OSError as err:
        raise BundleFetchError("unreachable", f"cannot reach {endpoint.url}: {err.strerror or err}") from err
    return validate_bundle(body, td, known, carried=relationship.spiffe_sequence), body


def validate_bundle(body: bytes, td: TrustDomain, known: Bundle | None, *, carried: int | None = None) -> Bundle:
    """Parse a fetched bundle and refuse what must never replace the one we hold; `carried`
    is the highest spiffe_sequence the partner's bundles have carried (None: none has)."""
    try:
        bundle = Bundle.from_jwks(body, td)
    except BundleError as err:
        raise BundleFetchError("garbage", f"not a SPIFFE bundle: {err}") from err
    if not bundle.x509_authorities and not bundle.jwt_authorities:
        raise BundleFetchError("garbage", f"the bundle for {td} holds no authorities")
    for cert in bundle.x509_authorities:
        for named in _spiffe_trust_domains(cert):
            if named != td:
                raise BundleFetchError("wrong_trust_domain",
                                       f"the bundle served for {td} holds a CA of trust domain {named}")
    check_sequence(bundle, known, carried)
    return bundle


def same_content(a: Bundle, b: Bundle) -> bool:
    """The same authorities and sequence, in any order and whatever the bytes (pure); the
    refresh hint is scheduling advice, not content."""
    return (a.sequence_number == b.sequence_number
            and frozenset(a.x509_authorities) == frozenset(b.x509_authorities)
            and frozenset(a.jwt_authorities) == frozenset(b.jwt_authorities))


def check_sequence(bundle: Bundle, known: Bundle | None, carried: int | None) -> None:
    """Refuse a bundle that could roll the partner's back (pure): once one carried a sequence
    (`carried`, or the bundle held), each later one carries one, no lower, and the same
    number only with the same content."""
    td = bundle.trust_domain
    seen = [s for s in (carried, known.sequence_number if known is not None else None) if s is not None]
    if not seen:
        return  # the partner does not number its bundles (and never has)
    highest, sequence = max(seen), bundle.sequence_number
    if sequence is None:
        raise BundleFetchError("no_sequence", f"the bundle for {td} carries no spiffe_sequence, but its bundles "
                                              f"have (up to {highest}); without one it could undo a change, so it "
                                              "is refused")
    if sequence < highest:
        raise BundleFetchError("rollback", f"the bundle for {td} went back from sequence {highest} to {sequence}")
    if sequence == highest and known is not None and known.sequence_number == highest \
            and not same_content(known, bundle):
        raise BundleFetchError("sequence_reused", f"the bundle for {td} changed its authorities but kept "
                                                  f"sequence {sequence}; a changed bundle needs a higher one")


def _spiffe_trust_domains(cert: x509.Certificate) -> list[TrustDomain]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            try:
                out.append(SpiffeId.parse(uri).trust_domain)
            except InvalidSpiffeIdError:
                out.append(TrustDomain("invalid.invalid"))
    return out


# --- refreshing (leader duty, and `federation refresh`) ------------------------------------


async def stored_bundle(rt: ServerRuntime, trust_domain: str) -> tuple[Bundle | None, BundleRecord | None]:
    try:
        record = await rt.store.get_bundle(trust_domain)
    except TrustmeshError:
        return None, None
    try:
        return Bundle.from_jwks(record.jwks, TrustDomain(trust_domain)), record
    except BundleError:
        return None, record


async def refresh(rt: ServerRuntime, relationship: FederationRecord, *, actor: str) -> Bundle:
    """Fetch one partner's bundle now; store it if it changed. Raises BundleFetchError
    after recording the failure (the stored bundle is left as it was)."""
    td = relationship.trust_domain.name
    counter = rt.metrics.counter("trustmesh_federation_refresh_total", "federated bundle fetches by outcome",
                                 ["trust_domain", "outcome", "reason"])
    now = rt.clock()
    known, record = await stored_bundle(rt, td)
    try:
        bundle, body = await fetch_bundle(relationship, known)
    except (BundleFetchError, ValueError, InvalidSpiffeIdError) as err:
        reason = err.reason if isinstance(err, BundleFetchError) else "config"
        counter.inc(trust_domain=td, outcome="failed", reason=reason)
        log_event(log, "federated_bundle_refresh_failed", level=logging.ERROR, trust_domain=td, reason=reason,
                  error=str(err), keeping="the last good bundle")
        # Once per run of failures of one kind: a retry of the same failure adds nothing, a
        # new kind (down, then serving a rolled-back bundle) is worth its own event.
        if relationship.last_error.partition(":")[0] != reason:
            await rt.audit.record("federation.refresh_failed", actor=actor, subject=td, outcome="failed",
                                  reason=reason, error=str(err))
        failed = replace(relationship, last_error=f"{reason}: {err}",
                         next_refresh_at=now + RETRY_AFTER_FAILURE.total_seconds())
        await rt.store.update_federation(failed)
        raise BundleFetchError(reason, str(err)) from err
    # By content, not bytes: a partner may serialise the same bundle differently each time.
    changed = record is None or known is None or not same_content(known, bundle)
    new_record = None
    if changed:
        new_record = BundleRecord(relationship.trust_domain, body, (record.sequence if record else 0) + 1, now)
    carried = [s for s in (relationship.spiffe_sequence, bundle.sequence_number) if s is not None]
    done = replace(relationship, last_error="", last_refreshed_at=now,
                   next_refresh_at=now + refresh_interval(bundle).total_seconds(),
                   spiffe_sequence=max(carried) if carried else None)
    if await rt.store.update_federation(done, new_record):
        counter.inc(trust_domain=td, outcome="changed" if changed else "unchanged", reason="")
        if changed:
            await rt.audit.record("federation.bundle_updated", actor=actor, subject=td,
                                  sequence=bundle.sequence_number, x509_authorities=len(bundle.x509_authorities),
                                  jwt_authorities=len(bundle.jwt_authorities))
            log_event(log, "federated_bundle_updated", trust_domain=td, sequence=bundle.sequence_number)
        else:
            log_event(log, "federated_bundle_unchanged", level=logging.DEBUG, trust_domain=td,
                      sequence=bundle.sequence_number)
    return bundle


async def refresh_due(rt: ServerRuntime, actor: str, relationships: list[FederationRecord] | None = None) -> None:
    """Refresh every relationship that is due; `relationships` as the caller knows them
    (the leader keeps them from the change feed), else read from the store."""
    now = rt.clock()
    for relationship in relationships if relationships is not None else await rt.store.list_federations():
        if relationship.endpoint_url and now >= relationship.next_refresh_at:
            try:
                await refresh(rt, relationship, actor=actor)
            except BundleFetchError:
                pass  # recorded; the next due time retries it


__all__ = ["BundleFetchError", "PROFILES", "check_sequence", "fetch_bundle", "parse_endpoint_url", "refresh",
           "refresh_due", "same_content", "validate_bundle"]
