"""Trust bundles: the X.509 and JWT authorities of one trust domain, and sets of them.

Formats, each for its reader:

* SPIFFE JWKS (SPIFFE Trust Domain and Bundle standard, section 4) — the federation format the
  bundle endpoint serves. ``x509-svid`` keys carry exactly one CA certificate in ``x5c``
  (X509-SVID standard); ``jwt-svid`` keys carry a ``kid`` (JWT-SVID standard). Keys with an
  unknown ``use`` or ``kty`` are skipped, as the standard requires; a key we do know how to
  read but that is malformed fails the whole bundle, so a half-read bundle is never trusted.
* PEM — what operators hand to ``--trust-bundle``; X.509 authorities only.
* concatenated DER — the Workload API's ``X509SVIDResponse.bundle`` / ``federated_bundles``.

A bundle is a value tied to its trust domain name; the name is never taken from the bundle
itself (the standard says to record ``<trust_domain, bundle>`` independently).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from trustmesh import jose
from trustmesh.der import split_der
from trustmesh.errors import BundleError
from trustmesh.spiffeid import TrustDomain

MAX_JWKS_BYTES: Final = 1024 * 1024
MAX_PEM_BYTES: Final = 1024 * 1024
X509_SVID_USE: Final = "x509-svid"
JWT_SVID_USE: Final = "jwt-svid"
# The standard asks for at least 64 bits of sequence number; we hold it to exactly that
# range so every consumer (Go's uint64 included) reads the same number we wrote.
MAX_SEQUENCE: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class JwtAuthority:
    """A public key that signs JWT-SVIDs, named by its key id.

    ``expires_at`` is local bookkeeping for rotation; the SPIFFE JWKS has no field for it, so
    it does not survive ``to_jwks``/``from_jwks``.
    """

    key_id: str
    public_key: jose.PublicKey = field(compare=False)
    expires_at: datetime | None = None
    # Key objects from cryptography are not hashable; their DER is, and it is what equality
    # of two authorities should mean anyway.
    _spki: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not self.key_id:
            raise BundleError("a JWT authority needs a non-empty key id")
        try:
            spki = jose.spki_der(jose.check_public_key(self.public_key))
        except jose.JoseError as err:
            raise BundleError(f"JWT authority {self.key_id!r}: {err}") from err
        object.__setattr__(self, "_spki", spki)


@dataclass(frozen=True, slots=True)
class Bundle:
    """The authorities of one trust domain. Build new bundles with the ``with_*`` helpers."""

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: tuple[JwtAuthority, ...] = ()
    sequence_number: int | None = None
    refresh_hint: timedelta | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise BundleError(f"trust_domain must be a TrustDomain, got {self.trust_domain!r}")
        object.__setattr__(self, "x509_authorities", tuple(self.x509_authorities))
        object.__setattr__(self, "jwt_authorities", tuple(self.jwt_authorities))
        seen_certs: set[bytes] = set()
        for cert in self.x509_authorities:
            if not isinstance(cert, x509.Certificate):
                raise BundleError(f"x509 authorities must be certificates, got {type(cert).__name__}")
            der = cert.public_bytes(Encoding.DER)
            if der in seen_certs:
                raise BundleError(
                    f"bundle for {self.trust_domain} lists the x509 authority "
                    f"{cert.subject.rfc4514_string()!r} twice"
                )
            seen_certs.add(der)
        seen_kids: set[str] = set()
        for authority in self.jwt_authorities:
            if not isinstance(authority, JwtAuthority):
                raise BundleError(f"jwt authorities must be JwtAuthority, got {type(authority).__name__}")
            if authority.key_id in seen_kids:
                raise BundleError(
                    f"bundle for {self.trust_domain} has two JWT authorities with key id "
                    f"{authority.key_id!r}; key ids must be unique"
                )
            seen_kids.add(authority.key_id)
        if self.sequence_number is not None:
            _check_sequence(self.sequence_number)
        if self.refresh_hint is not None:
            _check_refresh_hint(self.refresh_hint)

    # ----------------------------------------------------------------- views

    def jwt_keys(self) -> dict[str, jose.PublicKey]:
        """key id -> public key: the shape ``validate_jwt_svid`` looks keys up in."""
        return {a.key_id: a.public_key for a in self.jwt_authorities}

    def x509_authorities_pem(self) -> bytes:
        return b"".join(c.public_bytes(Encoding.PEM) for c in self.x509_authorities)

    def x509_authorities_der(self) -> bytes:
        """Concatenated DER, as the Workload API carries bundles."""
        return b"".join(c.public_bytes(Encoding.DER) for c in self.x509_authorities)

    def to_pem(self) -> bytes:
        """The PEM bundle file (X.509 authorities only; JWT keys have no PEM form here)."""
        return self.x509_authorities_pem()

    def is_empty(self) -> bool:
        return not self.x509_authorities and not self.jwt_authorities

    # ----------------------------------------------------------------- changes

    def with_x509_authorities(self, certs: Iterable[x509.Certificate]) -> Bundle:
        return replace(self, x509_authorities=tuple(certs))

    def with_jwt_authorities(self, authorities: Iterable[JwtAuthority]) -> Bundle:
        return replace(self, jwt_authorities=tuple(authorities))

    def with_jwt_authority(self, authority: JwtAuthority) -> Bundle:
        """Add a JWT authority, or replace the one with the same key id."""
        kept = tuple(a for a in self.jwt_authorities if a.key_id != authority.key_id)
        return replace(self, jwt_authorities=kept + (authority,))

    def without_jwt_authority(self, key_id: str) -> Bundle:
        return replace(
            self, jwt_authorities=tuple(a for a in self.jwt_authorities if a.key_id != key_id)
        )

    def with_sequence_number(self, sequence_number: int | None) -> Bundle:
        return replace(self, sequence_number=sequence_number)

    def with_refresh_hint(self, refresh_hint: timedelta | None) -> Bundle:
        return replace(self, refresh_hint=refresh_hint)

    # ----------------------------------------------------------------- SPIFFE JWKS

    def to_jwks(self) -> bytes:
        """The SPIFFE bundle as a JWK Set; the same bundle always gives the same bytes."""
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            try:
                jwk = jose.public_key_to_jwk(
                    jose.check_public_key(cert.public_key()),
                    use=X509_SVID_USE,
                    x5c=[cert.public_bytes(Encoding.DER)],
                )
            except jose.JoseError as err:
                raise BundleError(
                    f"x509 authority {cert.subject.rfc4514_string()!r} has a key the SPIFFE "
                    f"bundle format cannot carry: {err}"
                ) from err
            keys.append(jwk)
        for authority in self.jwt_authorities:
            keys.append(
                jose.public_key_to_jwk(authority.public_key, kid=authority.key_id, use=JWT_SVID_USE)
            )
        document: dict[str, Any] = {"keys": keys}
        if self.sequence_number is not None:
            document["spiffe_sequence"] = self.sequence_number
        if self.refresh_hint is not None:
            document["spiffe_refresh_hint"] = int(self.refresh_hint.total_seconds())
        return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_jwks(cls, data: bytes | str, trust_domain: TrustDomain) -> Bundle:
        """Parse a SPIFFE bundle for ``trust_domain`` (the caller knows which domain it is)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray)):
            raise BundleError(f"bundle data must be bytes, got {type(data).__name__}")
        if len(data) > MAX_JWKS_BYTES:
            raise BundleError(
                f"bundle for {trust_domain} is {len(data)} bytes; the limit is {MAX_JWKS_BYTES}"
            )
        try:
            document = jose.strict_json_object(bytes(data), f"bundle for {trust_domain}")
        except jose.JoseError as err:
            raise BundleError(str(err)) from err
        if "keys" not in document:
            raise BundleError(f"bundle for {trust_domain} has no 'keys' member (it is required)")
        raw_keys = document["keys"]
        if not isinstance(raw_keys, list):
            raise BundleError(f"bundle for {trust_domain}: 'keys' must be a list")
        x509_authorities: list[x509.Certificate] = []
        jwt_authorities: list[JwtAuthority] = []
        for index, raw in enumerate(raw_keys):
            where = f"bundle for {trust_domain}, key {index}"
            parsed = _parse_jwk_entry(raw, where)
            if isinstance(parsed, x509.Certificate):
                x509_authorities.append(parsed)
            elif isinstance(parsed, JwtAuthority):
                jwt_authorities.append(parsed)
        sequence = _optional_uint(document, "spiffe_sequence", trust_domain)
        hint = _optional_uint(document, "spiffe_refresh_hint", trust_domain)
        return cls(
            trust_domain=trust_domain,
            x509_authorities=tuple(x509_authorities),
            jwt_authorities=tuple(jwt_authorities),
            sequence_number=sequence,
            refresh_hint=None if hint is None else timedelta(seconds=hint),
        )

    # ----------------------------------------------------------------- PEM and DER

    @classmethod
    def from_pem(cls, data: bytes | str, trust_domain: TrustDomain) -> Bundle:
        """A bundle of the X.509 authorities in a PEM file."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if len(data) > MAX_PEM_BYTES:
            raise BundleError(f"PEM bundle is {len(data)} bytes; the limit is {MAX_PEM_BYTES}")
        if b"PRIVATE KEY-----" in data:
            raise BundleError(
                "PEM bundle contains a private key; a trust bundle holds certificates only. "
                "Remove the key from the file (and treat it as exposed)"
            )
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise BundleError(f"no certificates found in the PEM bundle for {trust_domain}")
        try:
            certs = x509.load_pem_x509_certificates(bytes(data))
        except ValueError as err:
            raise BundleError(f"PEM bundle for {trust_domain} is malformed: {err}") from err
        return cls(trust_domain=trust_domain, x509_authorities=tuple(certs))

    @classmethod
    def from_der(cls, data: bytes, trust_domain: TrustDomain) -> Bundle:
        """A bundle of concatenated DER certificates (the Workload API form)."""
        certs = []
        for index, chunk in enumerate(_split_der(bytes(data))):
            try:
                certs.append(x509.load_der_x509_certificate(chunk))
            except ValueError as err:
                raise BundleError(
                    f"DER bundle for {trust_domain}: certificate {index} is malformed: {err}"
                ) from err
        return cls(trust_domain=trust_domain, x509_authorities=tuple(certs))


def _check_sequence(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQUENCE:
        raise BundleError(f"sequence number must be an integer in 0..2**64-1, got {value!r}")


def _check_refresh_hint(value: object) -> None:
    if not isinstance(value, timedelta):
        raise BundleError(f"refresh hint must be a timedelta, got {type(value).__name__}")
    if value < timedelta(0) or value % timedelta(seconds=1):
        raise BundleError(f"refresh hint must be a non-negative whole number of seconds, got {value}")


def _optional_uint(document: Mapping[str, Any], name: str, trust_domain: TrustDomain) -> int | None:
    if name not in document:
        return None
    value = document[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQUENCE:
        raise BundleError(
            f"bundle for {trust_domain}: {name!r} must be a non-negative integer, got {value!r}"
        )
    return value


def _parse_jwk_entry(raw: object, where: str) -> x509.Certificate | JwtAuthority | None:
    """One element of ``keys``: a certificate, a JWT authority, or None when it is to be skipped."""
    if not isinstance(raw, dict):
        raise BundleError(f"{where} must be a JSON object")
    use = raw.get("use")
    if use is None:
        raise BundleError(f"{where} has no 'use' (the standard requires x509-svid or jwt-svid)")
    if not isinstance(use, str):
        raise BundleError(f"{where}: 'use' must be a string")
    if use not in (X509_SVID_USE, JWT_SVID_USE):
        return None  # unknown use: the standard says to ignore the whole element
    try:
        public_key = jose.jwk_to_public_key(raw)
    except jose.UnsupportedKeyTypeError:
        return None  # unknown kty: likewise ignored
    except jose.JoseError as err:
        raise BundleError(f"{where} ({use}): {err}") from err
    if use == X509_SVID_USE:
        return _x509_authority(raw, public_key, where)
    kid = raw.get("kid")
    if not isinstance(kid, str) or not kid:
        raise BundleError(f"{where}: a jwt-svid key must have a non-empty 'kid'")
    return JwtAuthority(key_id=kid, public_key=public_key)


def _x509_authority(raw: Mapping[str, Any], public_key: jose.PublicKey, where: str) -> x509.Certificate:
    x5c = raw.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1:
        count = len(x5c) if isinstance(x5c, list) else "no"
        raise BundleError(
            f"{where}: an x509-svid key must carry exactly one certificate in 'x5c', found {count}"
        )
    if not isinstance(x5c[0], str):
        raise BundleError(f"{where}: 'x5c' must hold a base64 string")
    try:
        # x5c is standard base64 (RFC 7517 section 4.7), not base64url.
        der = base64.b64decode(x5c[0], validate=True)
    except (binascii.Error, ValueError) as err:
        raise BundleError(f"{where}: 'x5c' is not valid base64: {err}") from err
    try:
        cert = x509.load_der_x509_certificate(der)
        cert_key = cert.public_key()
    except ValueError as err:
        raise BundleError(f"{where}: 'x5c' is not a valid DER certificate: {err}") from err
    if not isinstance(cert_key, jose.PublicKey) or not jose.same_public_key(cert_key, public_key):
        raise BundleError(
            f"{where}: the JWK's key does not match the key of its x5c certificate "
            f"{cert.subject.rfc4514_string()!r}"
        )
    return cert


def _split_der(data: bytes) -> Iterator[bytes]:
    try:
        yield from split_der(data)
    except ValueError as err:
        raise BundleError(f"DER bundle: {err}") from err


class BundleSet(Mapping[TrustDomain, Bundle]):
    """An immutable map trust domain -> bundle, in the shapes the verifiers consume."""

    __slots__ = ("_bundles",)

    def __init__(self, bundles: Iterable[Bundle] = ()) -> None:
        table: dict[TrustDomain, Bundle] = {}
        for bundle in bundles:
            if not isinstance(bundle, Bundle):
                raise BundleError(f"BundleSet holds Bundle values, got {type(bundle).__name__}")
            if bundle.trust_domain in table:
                raise BundleError(f"two bundles given for trust domain {bundle.trust_domain}")
            table[bundle.trust_domain] = bundle
        self._bundles: Mapping[TrustDomain, Bundle] = MappingProxyType(
            dict(sorted(table.items()))
        )

    def __getitem__(self, trust_domain: TrustDomain) -> Bundle:
        return self._bundles[trust_domain]

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(self._bundles)

    def __len__(self) -> int:
        return len(self._bundles)

    def __repr__(self) -> str:
        return f"BundleSet({', '.join(str(td) for td in self._bundles)})"

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, "_bundles"):
            raise AttributeError("BundleSet is immutable; use with_bundle()")
        object.__setattr__(self, name, value)

    def with_bundle(self, bundle: Bundle) -> BundleSet:
        """A new set where ``bundle`` replaces any bundle of its trust domain."""
        others = (b for td, b in self._bundles.items() if td != bundle.trust_domain)
        return BundleSet((*others, bundle))

    def without(self, trust_domain: TrustDomain) -> BundleSet:
        return BundleSet(b for td, b in self._bundles.items() if td != trust_domain)

    def x509_anchors(self) -> dict[TrustDomain, tuple[x509.Certificate, ...]]:
        return {td: b.x509_authorities for td, b in self._bundles.items()}

    def jwt_authorities(self) -> dict[TrustDomain, dict[str, jose.PublicKey]]:
        return {td: b.jwt_keys() for td, b in self._bundles.items()}
