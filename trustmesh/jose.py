"""The small part of JOSE that SPIFFE needs: base64url, JWKs for public keys, compact JWS.

Signatures are made and checked by PyJWT's algorithm implementations, taken from a
``PyJWS`` that has only our allowlist registered (``none`` and HMAC are not in it at all).
General JWT libraries accept far more than the SPIFFE standards allow (``alg: none``, HMAC,
keys named inside the token, padded or non-canonical base64url, duplicate JSON members),
and each of those allowances has been a real vulnerability; so the token's form is checked
here, before the library sees it, and every accepted form is listed explicitly:

* base64url is the unpadded, canonical form only (RFC 7515 section 2), so one token has one
  spelling and a signature cannot be replayed under a second encoding;
* JWKs are public keys only: EC P-256/P-384/P-521, RSA (>= 2048 bits) and OKP Ed25519. A JWK
  carrying any private member is refused outright, since a bundle that leaks a private key is
  an incident, not input;
* signatures are ES256/ES384/ES512 (raw ``R||S``, RFC 7518 section 3.4, never DER),
  RS256/384/512, PS256/384/512 and EdDSA (Ed25519), and the key type must fit the algorithm.

JWKs stay on ``cryptography``: PyJWT's ``from_jwk`` accepts private JWKs (and returns a
private key), secp256k1 and Ed448, padded or non-canonical base64url and leading zero
octets, and sets no RSA minimum; refusing all of that would mean checking every member
here first, leaving the library nothing but the final ``public_key()`` call.

Errors are ``JoseError``; the JWT-SVID and bundle modules translate them at their edge.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import Algorithm

from trustmesh.errors import TrustmeshError

PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# RFC 7518 section 3.3: "A key of size 2048 bits or larger MUST be used with these algorithms."
MIN_RSA_BITS: Final = 2048

# JWK curve name -> (cryptography curve, coordinate length in bytes).
_EC_CURVES: Final[dict[str, tuple[ec.EllipticCurve, int]]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
_EC_CURVE_BY_OPENSSL_NAME: Final = {curve.name: crv for crv, (curve, _) in _EC_CURVES.items()}

# Members that exist only in private JWKs (RFC 7518 sections 6.2.2, 6.3.2, 6.4; RFC 8037).
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_B64URL_ALPHABET: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)


class JoseError(TrustmeshError):
    """Malformed base64url, JWK or JWS, or a signature that does not verify."""


class UnsupportedKeyTypeError(JoseError):
    """A JWK's ``kty`` is not one we know. The bundle standard says to skip such keys."""


# --------------------------------------------------------------------------- base64url


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url, as JWS and JWK use it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded, canonical base64url; anything else is a ``JoseError``."""
    if not isinstance(text, str):
        raise JoseError(f"expected a base64url string, got {type(text).__name__}")
    bad = set(text) - _B64URL_ALPHABET
    if bad:
        shown = "".join(sorted(bad))[:10]
        raise JoseError(f"invalid base64url characters {shown!r} (padding '=' is not allowed)")
    if len(text) % 4 == 1:
        raise JoseError("invalid base64url length")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as err:  # pragma: no cover - the checks above leave nothing to fail
        raise JoseError(f"invalid base64url: {err}") from err
    # Leftover bits in the last character must be zero; otherwise two strings decode to the
    # same bytes and a signed token would have more than one valid spelling.
    if b64url_encode(data) != text:
        raise JoseError("non-canonical base64url (unused trailing bits are set)")
    return data


def _uint_to_b64url(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(size, "big"))


def _b64url_to_uint(jwk: Mapping[str, Any], member: str, *, exact_len: int | None = None) -> int:
    raw = jwk.get(member)
    if raw is None:
        raise JoseError(f"JWK member {member!r} is missing")
    data = b64url_decode(raw)
    if not data:
        raise JoseError(f"JWK member {member!r} is empty")
    if exact_len is not None and len(data) != exact_len:
        raise JoseError(
            f"JWK member {member!r} must be {exact_len} bytes for this curve, got {len(data)}"
        )
    # RFC 7518 section 2 (Base64urlUInt): the minimum number of octets; a leading zero octet
    # would give the same key a second spelling.
    if exact_len is None and len(data) > 1 and data[0] == 0:
        raise JoseError(f"JWK member {member!r} has a leading zero byte")
    return int.from_bytes(data, "big")


# --------------------------------------------------------------------------- JWK


def public_key_to_jwk(
    key: PublicKey,
    *,
    kid: str | None = None,
    use: str | None = None,
    x5c: Sequence[bytes] | None = None,
) -> dict[str, Any]:
    """The JWK of a public key. ``x5c`` takes DER certificates; JWK wants standard base64."""
    jwk: dict[str, Any]
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = _EC_CURVE_BY_OPENSSL_NAME.get(key.curve.name)
        if crv is None:
            raise JoseError(f"EC curve {key.curve.name} is not supported (use P-256, P-384 or P-521)")
        size = _EC_CURVES[crv][1]
        numbers = key.public_numbers()
        jwk = {
            "kty": "EC",
            "crv": crv,
            "x": _uint_to_b64url(numbers.x, size),
            "y": _uint_to_b64url(numbers.y, size),
        }
    elif isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        jwk = {"kty": "RSA", "n": _uint_to_b64url(rsa_numbers.n), "e": _uint_to_b64url(rsa_numbers.e)}
    elif isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    else:
        raise JoseError(f"unsupported public key type {type(key).__name__}")
    if kid is not None:
        jwk["kid"] = kid
    if use is not None:
        jwk["use"] = use
    if x5c is not None:
        jwk["x5c"] = [base64.b64encode(der).decode("ascii") for der in x5c]
    return jwk


def jwk_to_public_key(jwk: Mapping[str, Any]) -> PublicKey:
    """The public key a JWK describes, after checking every member it depends on."""
    if not isinstance(jwk, Mapping):
        raise JoseError(f"a JWK must be a JSON object, got {type(jwk).__name__}")
    private = sorted(_PRIVATE_MEMBERS & set(jwk))
    if private:
        raise JoseError(
            f"JWK contains private key material ({', '.join(private)}); "
            "only public keys may be distributed"
        )
    kty = jwk.get("kty")
    if not isinstance(kty, str):
        raise JoseError("JWK member 'kty' is missing or not a string")
    if kty == "EC":
        return _ec_from_jwk(jwk)
    if kty == "RSA":
        return _rsa_from_jwk(jwk)
    if kty == "OKP":
        return _okp_from_jwk(jwk)
    raise UnsupportedKeyTypeError(f"JWK key type {kty!r} is not supported (EC, RSA or OKP)")


def _ec_from_jwk(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    crv = jwk.get("crv")
    if not isinstance(crv, str) or crv not in _EC_CURVES:
        raise JoseError(f"EC JWK curve {crv!r} is not supported (P-256, P-384 or P-521)")
    curve, size = _EC_CURVES[crv]
    x = _b64url_to_uint(jwk, "x", exact_len=size)
    y = _b64url_to_uint(jwk, "y", exact_len=size)
    try:
        # public_key() refuses points that are not on the curve (invalid-curve attacks).
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    except ValueError as err:
        raise JoseError(f"EC JWK is not a valid {crv} point: {err}") from err


def _rsa_from_jwk(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
    n = _b64url_to_uint(jwk, "n")
    e = _b64url_to_uint(jwk, "e")
    if n.bit_length() < MIN_RSA_BITS:
        raise JoseError(f"RSA JWK modulus is {n.bit_length()} bits; at least {MIN_RSA_BITS} required")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as err:
        raise JoseError(f"RSA JWK is not a valid public key: {err}") from err


def _okp_from_jwk(jwk: Mapping[str, Any]) -> ed25519.Ed25519PublicKey:
    crv = jwk.get("crv")
    if crv != "Ed25519":
        raise JoseError(f"OKP JWK curve {crv!r} is not supported (Ed25519)")
    if "x" not in jwk:
        raise JoseError("JWK member 'x' is missing")
    raw = b64url_decode(jwk["x"])
    if len(raw) != 32:
        raise JoseError(f"Ed25519 JWK member 'x' must be 32 bytes, got {len(raw)}")
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as err:  # pragma: no cover - every 32-byte string is accepted today
        raise JoseError(f"Ed25519 JWK is not a valid public key: {err}") from err


def check_public_key(key: object) -> PublicKey:
    """``key`` if it is a public key of a supported type; a private key is refused by name."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise JoseError("got a private key where a public key belongs; pass key.public_key()")
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm_for_key(key)  # refuses curves outside P-256/P-384/P-521
        return key
    if isinstance(key, (rsa.RSAPublicKey, ed25519.Ed25519PublicKey)):
        return key
    raise JoseError(
        f"unsupported key type {type(key).__name__}; "
        "expected an EC (P-256, P-384, P-521), RSA or Ed25519 public key"
    )


def same_public_key(a: PublicKey, b: PublicKey) -> bool:
    """Compare keys by their encoding; key objects of different classes never compare equal."""
    return spki_der(a) == spki_der(b)


def spki_der(key: PublicKey) -> bytes:
    """SubjectPublicKeyInfo DER: a stable, hashable identity for a public key."""
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------- JWS


@dataclass(frozen=True, slots=True)
class _Alg:
    family: str  # "EC", "RSA", "RSA-PSS" or "EdDSA"
    curve: str | None = None  # the JWK curve name an EC key must have


# The JWT-SVID standard's list (RS*, ES*, PS*), and EdDSA, which trustmesh keys may be.
ALGORITHMS: Final[Mapping[str, _Alg]] = {
    "ES256": _Alg("EC", "P-256"),
    "ES384": _Alg("EC", "P-384"),
    "ES512": _Alg("EC", "P-521"),
    "RS256": _Alg("RSA"),
    "RS384": _Alg("RSA"),
    "RS512": _Alg("RSA"),
    "PS256": _Alg("RSA-PSS"),
    "PS384": _Alg("RSA-PSS"),
    "PS512": _Alg("RSA-PSS"),
    "EdDSA": _Alg("EdDSA"),
}
SUPPORTED_ALGORITHMS: Final = frozenset(ALGORITHMS)

# Only the allowlist is registered: an algorithm outside it cannot even be looked up.
_JWS: Final = jwt.PyJWS(algorithms=sorted(SUPPORTED_ALGORITHMS))


def check_algorithm(alg: object) -> str:
    """The ``alg`` if it is an asymmetric algorithm we support; a specific error otherwise."""
    if not isinstance(alg, str):
        raise JoseError("JWS header 'alg' is missing or not a string")
    if alg in ALGORITHMS:
        return alg
    if alg.lower() == "none":
        raise JoseError(f"algorithm {alg!r} is not allowed: unsigned tokens are never accepted")
    if alg.upper().startswith("HS"):
        raise JoseError(
            f"algorithm {alg!r} is not allowed: only asymmetric signatures "
            f"({', '.join(sorted(ALGORITHMS))}) are accepted"
        )
    raise JoseError(
        f"algorithm {alg!r} is not allowed (use one of {', '.join(sorted(ALGORITHMS))})"
    )


def algorithm_for_key(key: PrivateKey | PublicKey) -> str:
    """The default ``alg`` for a key: ES* by curve, RS256 for RSA, EdDSA for Ed25519."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        crv = _EC_CURVE_BY_OPENSSL_NAME.get(key.curve.name)
        for name, alg in ALGORITHMS.items():
            if alg.family == "EC" and alg.curve == crv:
                return name
        raise JoseError(f"EC curve {key.curve.name} is not supported (use P-256, P-384 or P-521)")
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "RS256"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "EdDSA"
    raise JoseError(f"unsupported key type {type(key).__name__}")


def _check_key_fits(alg: str, key: PrivateKey | PublicKey) -> _Alg:
    """Refuse algorithm confusion: the key, not the token, decides what kind of signature counts."""
    spec = ALGORITHMS[check_algorithm(alg)]
    if spec.family == "EC":
        if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
            raise JoseError(f"algorithm {alg} needs an EC key, the key is {_key_kind(key)}")
        crv = _EC_CURVE_BY_OPENSSL_NAME.get(key.curve.name)
        if crv != spec.curve:
            raise JoseError(f"algorithm {alg} needs a {spec.curve} key, the key is {_key_kind(key)}")
    elif spec.family in ("RSA", "RSA-PSS"):
        if not isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
            raise JoseError(f"algorithm {alg} needs an RSA key, the key is {_key_kind(key)}")
        if key.key_size < MIN_RSA_BITS:
            raise JoseError(f"RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} required")
    elif not isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        raise JoseError(f"algorithm {alg} needs an Ed25519 key, the key is {_key_kind(key)}")
    return spec


def _key_kind(key: object) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"EC {_EC_CURVE_BY_OPENSSL_NAME.get(key.curve.name, key.curve.name)}"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA {key.key_size}"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "Ed25519"
    return type(key).__name__


def _library_algorithm(alg: str) -> Algorithm:
    return _JWS.get_algorithm_by_name(alg)


def sign(alg: str, key: PrivateKey, signing_input: bytes) -> bytes:
    """The JWS signature bytes for ``signing_input`` (ECDSA as raw ``R||S``)."""
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise JoseError(f"signing needs a private key, got {type(key).__name__}")
    _check_key_fits(alg, key)
    algorithm = _library_algorithm(alg)
    signature: bytes = algorithm.sign(signing_input, algorithm.prepare_key(key))
    return signature


def verify(alg: str, key: PublicKey, signing_input: bytes, signature: bytes) -> None:
    """Raise ``JoseError`` unless ``signature`` is a valid ``alg`` signature by ``key``."""
    spec = _check_key_fits(alg, check_public_key(key))
    if spec.family == "EC" and spec.curve is not None:
        size = _EC_CURVES[spec.curve][1]
        # RFC 7518 section 3.4: exactly R||S, each the curve's size. A DER signature has
        # another length; it is refused by name rather than as a failed signature.
        if len(signature) != 2 * size:
            raise JoseError(f"{alg} signature must be {2 * size} bytes (raw R||S), got {len(signature)}")
    algorithm = _library_algorithm(alg)
    try:
        valid = algorithm.verify(signing_input, algorithm.prepare_key(key), signature)
    except (jwt.InvalidKeyError, TypeError, ValueError) as err:  # pragma: no cover - _check_key_fits ran first
        raise JoseError(f"key cannot verify {alg}: {err}") from err
    if not valid:
        raise JoseError("signature does not verify")


@dataclass(frozen=True, slots=True)
class CompactJws:
    """The parts of a compact JWS, decoded but not yet verified."""

    header: Mapping[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes


def strict_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object, refusing duplicate names and non-finite numbers.

    Duplicate names are refused because two parsers may keep different copies: a token that
    says ``"sub"`` twice could mean one thing to us and another to the next hop.
    """
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, value in pairs:
            if name in result:
                raise JoseError(f"{what} has duplicate member {name!r}")
            result[name] = value
        return result

    def no_constants(name: str) -> Any:
        raise JoseError(f"{what} contains {name}, which is not valid JSON")

    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except UnicodeDecodeError as err:
        raise JoseError(f"{what} is not valid UTF-8") from err
    except RecursionError as err:
        raise JoseError(f"{what} is nested too deeply") from err
    except ValueError as err:  # json.JSONDecodeError, and oversized integers
        raise JoseError(f"{what} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise JoseError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_compact(token: str, *, max_size: int) -> CompactJws:
    """Split and decode a compact JWS (three base64url parts) without verifying it."""
    if not isinstance(token, str):
        raise JoseError(f"a compact JWS must be a string, got {type(token).__name__}")
    if len(token) > max_size:
        raise JoseError(f"token is {len(token)} characters; the limit is {max_size}")
    parts = token.split(".")
    if len(parts) != 3:
        raise JoseError(
            f"a compact JWS has 3 dot-separated parts, this has {len(parts)}"
            + (" (a 5-part token is JWE, which is not accepted)" if len(parts) == 5 else "")
        )
    header_b64, payload_b64, signature_b64 = parts
    if not header_b64 or not payload_b64 or not signature_b64:
        raise JoseError("a compact JWS part is empty (unsigned or detached tokens are not accepted)")
    try:
        header_raw = b64url_decode(header_b64)
        payload = b64url_decode(payload_b64)
        signature = b64url_decode(signature_b64)
    except JoseError as err:
        raise JoseError(f"malformed token: {err}") from err
    header = strict_json_object(header_raw, "JWS header")
    return CompactJws(
        header=header,
        payload=payload,
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=signature,
    )


def jws_sign(header: Mapping[str, Any], payload: bytes, private_key: PrivateKey) -> str:
    """A compact JWS. ``header['alg']`` defaults to the key's algorithm and must fit the key."""
    full = dict(header)
    full.setdefault("alg", algorithm_for_key(private_key))
    if not isinstance(private_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise JoseError(f"signing needs a private key, got {type(private_key).__name__}")
    _check_key_fits(full["alg"], private_key)
    try:
        # The header is written with sorted keys and no spaces, so one header has one spelling.
        return _JWS.encode(payload, private_key, algorithm=full["alg"], headers=full, sort_headers=True)
    except jwt.PyJWTError as err:
        raise JoseError(f"cannot sign: {err}") from err
