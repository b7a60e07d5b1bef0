"""JWT-SVIDs: minting and validating them as the SPIFFE JWT-SVID standard says.

Validation order matters and is fixed: structure, then header (``alg`` from a closed list of
asymmetric algorithms, ``typ``, ``kid``), then ``sub`` — because the key must come from the
authorities of the *subject's own* trust domain and no other — then the signature, and only
then the claims. A token is never trusted for anything before its signature checks out; the
subject is read early only to choose where to look for the key.

Beyond the standard (which makes ``kid`` optional) a ``kid`` is required: SPIRE always sets
one, and trying every key of a trust domain would turn each bad token into N verifications.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Final, TypeAlias

from trustmesh import jose
from trustmesh.errors import InvalidSpiffeIdError, SvidError, VerificationError
from trustmesh.spiffeid import SpiffeId, TrustDomain

MAX_TOKEN_CHARS: Final = 16 * 1024
ALLOWED_TYP: Final = frozenset({"JWT", "JOSE"})
# Claims that sign_jwt_svid writes itself; extra_claims may not override them.
_REGISTERED_BY_US: Final = frozenset({"sub", "aud", "exp", "iat"})

JwtAuthorities: TypeAlias = (
    Mapping[TrustDomain, Mapping[str, jose.PublicKey]]
    | Callable[[TrustDomain], Mapping[str, jose.PublicKey] | None]
)


class JwtSvidError(VerificationError):
    """A JWT-SVID failed validation; the message says which rule it broke."""


class MalformedJwtSvidError(JwtSvidError):
    """The token is not a well-formed compact JWS with JSON header and claims."""


class JwtSvidExpiredError(JwtSvidError):
    """The token's ``exp`` has passed (or its ``nbf``/``iat`` is in the future)."""


class JwtSvidAudienceError(JwtSvidError):
    """The token is not meant for this audience."""


class UnknownJwtAuthorityError(JwtSvidError):
    """No JWT authority of the subject's trust domain has the token's key id."""


@dataclass(frozen=True, slots=True)
class JwtSvid:
    """A validated JWT-SVID. ``claims`` is a read-only view; equality follows the token."""

    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expires_at: datetime
    issued_at: datetime | None
    key_id: str
    algorithm: str
    token: str = field(repr=False)
    claims: Mapping[str, Any] = field(repr=False, compare=False, hash=False)


# --------------------------------------------------------------------------- minting


def sign_jwt_svid(
    *,
    spiffe_id: SpiffeId,
    audiences: Sequence[str],
    private_key: jose.PrivateKey,
    key_id: str,
    expires_at: datetime,
    issued_at: datetime,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """Mint a JWT-SVID. ``alg`` follows the key: ES256/ES384/ES512, RS256 or EdDSA."""
    if not isinstance(spiffe_id, SpiffeId):
        raise SvidError(f"spiffe_id must be a SpiffeId, got {type(spiffe_id).__name__}")
    if spiffe_id.is_trust_domain_id:
        raise SvidError(
            f"a JWT-SVID names a workload; {spiffe_id} is a trust domain ID with no path"
        )
    if isinstance(audiences, str):
        # A bare string is a sequence of characters; "ledger" would become 6 audiences.
        raise SvidError("audiences must be a list of strings, not a single string")
    aud = _dedupe(audiences)
    if not aud:
        raise SvidError("a JWT-SVID needs at least one audience")
    for value in aud:
        if not isinstance(value, str) or not value:
            raise SvidError(f"audience {value!r} must be a non-empty string")
    if not isinstance(key_id, str) or not key_id:
        raise SvidError("key_id must be a non-empty string (validators look keys up by it)")
    iat = _epoch_seconds(issued_at, "issued_at")
    exp = _epoch_seconds(expires_at, "expires_at")
    if exp <= iat:
        raise SvidError(
            f"expires_at ({_iso(expires_at)}) must be at least a second after "
            f"issued_at ({_iso(issued_at)})"
        )
    claims: dict[str, Any] = {}
    if extra_claims:
        clash = sorted(_REGISTERED_BY_US & set(extra_claims))
        if clash:
            raise SvidError(f"extra_claims may not set {', '.join(clash)}; pass them as arguments")
        claims.update(extra_claims)
    claims.update({"sub": str(spiffe_id), "aud": aud, "exp": exp, "iat": iat})
    try:
        payload = json.dumps(claims, separators=(",", ":"), sort_keys=True, allow_nan=False)
        alg = jose.algorithm_for_key(private_key)
        return jose.jws_sign({"alg": alg, "kid": key_id, "typ": "JWT"}, payload.encode(), private_key)
    except (TypeError, ValueError) as err:
        raise SvidError(f"extra_claims are not JSON-serialisable: {err}") from err
    except jose.JoseError as err:
        raise SvidError(f"cannot sign JWT-SVID: {err}") from err


def _dedupe(values: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def _epoch_seconds(moment: datetime, name: str) -> int:
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise SvidError(f"{name} must be a timezone-aware datetime")
    # Truncate: an expiry rounded down is never later than the one asked for.
    return int(moment.timestamp())


# --------------------------------------------------------------------------- inspection


def parse_insecure(token: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(header, claims) of a token, for logging and debugging. Nothing here is verified."""
    jws = _parse(token)
    claims = _claims(jws)
    return MappingProxyType(dict(jws.header)), MappingProxyType(claims)


def _parse(token: str) -> jose.CompactJws:
    try:
        return jose.parse_compact(token, max_size=MAX_TOKEN_CHARS)
    except jose.JoseError as err:
        raise MalformedJwtSvidError(f"malformed JWT-SVID: {err}") from err


def _claims(jws: jose.CompactJws) -> dict[str, Any]:
    try:
        return jose.strict_json_object(jws.payload, "JWT claims")
    except jose.JoseError as err:
        raise MalformedJwtSvidError(f"malformed JWT-SVID: {err}") from err


# --------------------------------------------------------------------------- validation


def validate_jwt_svid(
    token: str,
    *,
    audience: str | Sequence[str],
    jwt_authorities: JwtAuthorities,
    now: datetime,
    leeway: timedelta = timedelta(0),
) -> JwtSvid:
    """Validate a JWT-SVID and return what it proves.

    ``audience``: the name(s) this validator answers to; the token must carry at least one.
    ``jwt_authorities``: per trust domain, key id -> public key (``BundleSet.jwt_authorities()``
    fits), or a function from trust domain to that mapping. ``now`` must be timezone-aware.
    Every refusal is a ``JwtSvidError``; a misconfigured caller gets ``ValueError``.
    """
    expected = _expected_audiences(audience)
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    if leeway < timedelta(0):
        raise ValueError("leeway must not be negative")

    jws = _parse(token)
    alg, key_id = _check_header(jws.header)
    claims = _claims(jws)
    spiffe_id = _subject(claims)

    key = _find_key(jwt_authorities, spiffe_id.trust_domain, key_id)
    try:
        jose.verify(alg, key, jws.signing_input, jws.signature)
    except jose.JoseError as err:
        raise JwtSvidError(
            f"JWT-SVID for {spiffe_id} (key id {key_id!r}) is not validly signed: {err}"
        ) from err

    token_aud = _audience(claims)
    if not any(a in token_aud for a in expected):
        wanted = repr(expected[0]) if len(expected) == 1 else repr(list(expected))
        raise JwtSvidAudienceError(f"audience {wanted} not in token audiences {list(token_aud)}")
    expires_at, issued_at = _check_times(claims, now, leeway)
    return JwtSvid(
        spiffe_id=spiffe_id,
        audience=token_aud,
        expires_at=expires_at,
        issued_at=issued_at,
        key_id=key_id,
        algorithm=alg,
        token=token,
        claims=MappingProxyType(copy.deepcopy(claims)),
    )


def _expected_audiences(audience: str | Sequence[str]) -> tuple[str, ...]:
    expected = (audience,) if isinstance(audience, str) else tuple(audience)
    if not expected or not all(isinstance(a, str) and a for a in expected):
        raise ValueError("audience must be a non-empty string or a list of non-empty strings")
    return expected


def _check_header(header: Mapping[str, Any]) -> tuple[str, str]:
    try:
        alg = jose.check_algorithm(header.get("alg"))
    except jose.JoseError as err:
        raise JwtSvidError(str(err)) from err
    # isinstance first: a list or object here is unhashable and must not reach the set test.
    if "typ" in header and not (isinstance(header["typ"], str) and header["typ"] in ALLOWED_TYP):
        raise JwtSvidError(f"header typ {header['typ']!r} is not allowed (JWT or JOSE)")
    if "crit" in header:
        raise JwtSvidError("header 'crit' is not supported: a JWT-SVID carries no extensions")
    kid = header.get("kid")
    if kid is None:
        raise JwtSvidError("header 'kid' is missing; trustmesh requires a key id on every JWT-SVID")
    if not isinstance(kid, str) or not kid:
        raise JwtSvidError(f"header 'kid' must be a non-empty string, got {kid!r}")
    return alg, kid


def _subject(claims: Mapping[str, Any]) -> SpiffeId:
    sub = claims.get("sub")
    if sub is None:
        raise JwtSvidError("claim 'sub' is missing; a JWT-SVID names its SPIFFE ID there")
    if not isinstance(sub, str):
        raise JwtSvidError(f"claim 'sub' must be a string, got {type(sub).__name__}")
    try:
        spiffe_id = SpiffeId.parse(sub)
    except InvalidSpiffeIdError as err:
        raise JwtSvidError(f"claim 'sub' is not a SPIFFE ID: {err}") from err
    if spiffe_id.is_trust_domain_id:
        raise JwtSvidError(f"claim 'sub' {sub!r} is a trust domain, not a workload SPIFFE ID")
    return spiffe_id


def _find_key(
    authorities: JwtAuthorities, trust_domain: TrustDomain, key_id: str
) -> jose.PublicKey:
    # Only the subject's own trust domain: a key trusted for partner.example must never be
    # able to vouch for spiffe://example.org/... (SPIFFE bundle standard, section 6.4).
    keys = authorities(trust_domain) if callable(authorities) else authorities.get(trust_domain)
    if not keys:
        raise UnknownJwtAuthorityError(
            f"no JWT authorities for trust domain {trust_domain}; is its bundle loaded "
            "(federation configured)?"
        )
    key = keys.get(key_id)
    if key is None:
        raise UnknownJwtAuthorityError(
            f"no JWT authority with key id {key_id!r} for trust domain {trust_domain}"
        )
    return key


def _audience(claims: Mapping[str, Any]) -> tuple[str, ...]:
    if "aud" not in claims:
        raise JwtSvidAudienceError("claim 'aud' is missing; a JWT-SVID must name its audience")
    aud = claims["aud"]
    if isinstance(aud, str):
        values = [aud]
    elif isinstance(aud, list):
        values = aud
    else:
        raise JwtSvidAudienceError(f"claim 'aud' must be a string or a list, got {type(aud).__name__}")
    if not values or not all(isinstance(v, str) and v for v in values):
        raise JwtSvidAudienceError("claim 'aud' must hold at least one non-empty string")
    return tuple(values)


def _numeric_date(claims: Mapping[str, Any], name: str) -> datetime | None:
    if name not in claims:
        return None
    value = claims[name]
    # bool is an int in Python, but `"exp": true` is not a date.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JwtSvidError(f"claim {name!r} must be a number of seconds, got {value!r}")
    try:
        return datetime.fromtimestamp(value, tz=timezone.utc)
    except (OverflowError, OSError, ValueError) as err:
        raise JwtSvidError(f"claim {name!r} is out of range: {value!r}") from err


def _check_times(
    claims: Mapping[str, Any], now: datetime, leeway: timedelta
) -> tuple[datetime, datetime | None]:
    expires_at = _numeric_date(claims, "exp")
    if expires_at is None:
        raise JwtSvidError("claim 'exp' is missing; a JWT-SVID must expire")
    if now >= expires_at + leeway:
        raise JwtSvidExpiredError(f"token expired at {_iso(expires_at)} (now {_iso(now)})")
    not_before = _numeric_date(claims, "nbf")
    if not_before is not None and now + leeway < not_before:
        raise JwtSvidExpiredError(f"token is not valid before {_iso(not_before)} (now {_iso(now)})")
    issued_at = _numeric_date(claims, "iat")
    if issued_at is not None:
        if now + leeway < issued_at:
            raise JwtSvidExpiredError(
                f"token issued in the future at {_iso(issued_at)} (now {_iso(now)}); "
                "check the issuer's clock"
            )
        if issued_at > expires_at:
            raise JwtSvidError(f"token issued at {_iso(issued_at)}, after it expires")
    return expires_at, issued_at


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
