"""JWT-SVID minting and validation: the happy path once, then every way a token must be refused.

Tokens for the refusal paths are built by hand (``craft``) so each test breaks exactly one
rule while everything else about the token stays valid and correctly signed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh import jose
from trustmesh.errors import SvidError, VerificationError
from trustmesh.jwtsvid import (
    MAX_TOKEN_CHARS,
    JwtSvid,
    JwtSvidAudienceError,
    JwtSvidError,
    JwtSvidExpiredError,
    MalformedJwtSvidError,
    UnknownJwtAuthorityError,
    parse_insecure,
    sign_jwt_svid,
    validate_jwt_svid,
)
from trustmesh.spiffeid import SpiffeId, TrustDomain

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
TD = TrustDomain("example.org")
PARTNER = TrustDomain("partner.example")
WORKLOAD = SpiffeId.parse("spiffe://example.org/payments")

EC256 = ec.generate_private_key(ec.SECP256R1())
EC384 = ec.generate_private_key(ec.SECP384R1())
ED = ed25519.Ed25519PrivateKey.generate()
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PARTNER_KEY = ec.generate_private_key(ec.SECP256R1())

AUTHORITIES: dict[TrustDomain, dict[str, Any]] = {
    TD: {"k1": EC256.public_key(), "k384": EC384.public_key(), "ked": ED.public_key(),
         "krsa": RSA.public_key()},
    PARTNER: {"pk1": PARTNER_KEY.public_key()},
}


def mint(key: Any = EC256, kid: str = "k1", **overrides: Any) -> str:
    args: dict[str, Any] = dict(
        spiffe_id=WORKLOAD, audiences=["ledger"], private_key=key, key_id=kid,
        expires_at=NOW + timedelta(minutes=5), issued_at=NOW,
    )
    args.update(overrides)
    return sign_jwt_svid(**args)


def b64json(value: Any) -> str:
    return jose.b64url_encode(json.dumps(value).encode())


def good_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": str(WORKLOAD), "aud": ["ledger"],
        "exp": int((NOW + timedelta(minutes=5)).timestamp()), "iat": int(NOW.timestamp()),
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not _DROP}


_DROP = object()


def craft(
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
    key: Any = EC256,
    alg: str | None = None,
) -> str:
    """A correctly signed token with an arbitrary header and claims."""
    header = {"alg": "ES256", "kid": "k1", "typ": "JWT"} if header is None else header
    claims = good_claims() if claims is None else claims
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    sig = jose.sign(alg or header["alg"], key, signing_input.encode())
    return f"{signing_input}.{jose.b64url_encode(sig)}"


def validate(token: str, audience: Any = "ledger", **kw: Any) -> JwtSvid:
    kw.setdefault("jwt_authorities", AUTHORITIES)
    kw.setdefault("now", NOW)
    return validate_jwt_svid(token, audience=audience, **kw)


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize(
    ("key", "kid", "alg"),
    [(EC256, "k1", "ES256"), (EC384, "k384", "ES384"), (ED, "ked", "EdDSA"), (RSA, "krsa", "RS256")],
)
def test_round_trip_for_each_key_type(key: Any, kid: str, alg: str) -> None:
    token = mint(key, kid, audiences=["ledger", "spiffe://example.org/reports"],
                 extra_claims={"jti": "abc"})
    svid = validate(token)
    assert svid.spiffe_id == WORKLOAD
    assert svid.audience == ("ledger", "spiffe://example.org/reports")
    assert svid.expires_at == NOW + timedelta(minutes=5)
    assert svid.issued_at == NOW
    assert svid.key_id == kid and svid.algorithm == alg
    assert svid.claims["jti"] == "abc"
    assert svid.token == token
    header, claims = parse_insecure(token)
    assert header == {"alg": alg, "kid": kid, "typ": "JWT"}
    assert set(claims) == {"sub", "aud", "exp", "iat", "jti"}


def test_audiences_hold_every_requested_audience_once() -> None:
    token = mint(audiences=["a", "b", "c", "b"])
    _, claims = parse_insecure(token)
    assert claims["aud"] == ["a", "b", "c"]
    for aud in ("a", "b", "c"):
        assert validate(token, audience=aud).audience == ("a", "b", "c")


def test_single_string_aud_and_list_of_expected_audiences() -> None:
    token = craft(claims=good_claims(aud="ledger"))
    assert validate(token).audience == ("ledger",)
    assert validate(token, audience=["other", "ledger"]).audience == ("ledger",)


def test_callable_authorities_only_asked_for_the_subject_trust_domain() -> None:
    asked: list[TrustDomain] = []

    def lookup(td: TrustDomain) -> dict[str, Any] | None:
        asked.append(td)
        return AUTHORITIES.get(td)

    validate(mint(), jwt_authorities=lookup)
    assert asked == [TD]


def test_pss_and_es512_tokens_verify() -> None:
    p521 = ec.generate_private_key(ec.SECP521R1())
    auth = {TD: {"k1": RSA.public_key(), "k5": p521.public_key()}}
    assert validate(craft({"alg": "PS256", "kid": "k1"}, key=RSA), jwt_authorities=auth).algorithm == "PS256"
    assert validate(craft({"alg": "RS512", "kid": "k1"}, key=RSA), jwt_authorities=auth).algorithm == "RS512"
    assert validate(craft({"alg": "ES512", "kid": "k5"}, key=p521), jwt_authorities=auth).algorithm == "ES512"


def test_typ_jose_and_absent_are_accepted() -> None:
    validate(craft({"alg": "ES256", "kid": "k1", "typ": "JOSE"}))
    validate(craft({"alg": "ES256", "kid": "k1"}))


def test_leeway_tolerates_small_clock_skew_only() -> None:
    token = mint()
    late = NOW + timedelta(minutes=5, seconds=10)
    with pytest.raises(JwtSvidExpiredError):
        validate(token, now=late)
    validate(token, now=late, leeway=timedelta(seconds=30))
    with pytest.raises(JwtSvidExpiredError):
        validate(token, now=late, leeway=timedelta(seconds=5))


def test_jwtsvid_is_hashable_and_equal_by_content() -> None:
    token = mint()
    assert validate(token) == validate(token)
    assert len({validate(token), validate(token)}) == 1


def test_tokens_interoperate_with_an_independent_pyjwt_encoder_and_decoder() -> None:
    # PyJWT makes and checks the signatures inside trustmesh too, but its token handling
    # (header, claims, base64url) is its own: a token from either side is read by the other.
    import jwt

    theirs = jwt.encode(good_claims(), EC384, algorithm="ES384", headers={"kid": "k384"})
    assert validate(theirs).algorithm == "ES384"
    ours = mint(RSA, "krsa")
    claims = jwt.decode(ours, RSA.public_key(), algorithms=["RS256"], audience="ledger",
                        options={"verify_exp": False, "verify_iat": False})
    assert claims["sub"] == str(WORKLOAD)


def test_only_the_allowlist_is_registered_with_the_jose_library() -> None:
    assert sorted(jose._JWS.get_algorithms()) == sorted(jose.SUPPORTED_ALGORITHMS)
    assert not {"none", "HS256", "HS384", "HS512", "ES256K"} & jose.SUPPORTED_ALGORITHMS


# --------------------------------------------------------------------------- signing refusals


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"audiences": []}, "at least one audience"),
        ({"audiences": "ledger"}, "not a single string"),
        ({"audiences": [""]}, "non-empty"),
        ({"expires_at": NOW}, "after issued_at"),
        ({"expires_at": NOW - timedelta(minutes=1)}, "after issued_at"),
        ({"expires_at": NOW + timedelta(milliseconds=500)}, "after issued_at"),
        ({"issued_at": datetime(2026, 3, 1)}, "timezone-aware"),
        ({"kid": ""}, "key_id"),
        ({"spiffe_id": TD.id}, "trust domain ID"),
        ({"extra_claims": {"sub": "spiffe://example.org/admin"}}, "may not set sub"),
        ({"extra_claims": {"aud": "x", "exp": 1}}, "may not set aud, exp"),
        ({"extra_claims": {"x": object()}}, "JSON"),
        ({"extra_claims": {"x": float("nan")}}, "JSON"),
    ],
)
def test_sign_refuses_bad_requests(overrides: dict[str, Any], message: str) -> None:
    kid = overrides.pop("kid", "k1")
    with pytest.raises(SvidError, match=message):
        mint(kid=kid, **overrides)


def test_sign_refuses_unsupported_key() -> None:
    with pytest.raises(SvidError, match="secp256k1|not supported"):
        mint(key=ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(SvidError, match="needs a private key"):
        mint(key=EC256.public_key())


def test_misconfigured_authority_key_is_a_refusal_not_a_crash() -> None:
    # A private key (or anything else) placed in the authorities by mistake must not be used.
    for wrong in (EC256, "k1-pem", None):
        with pytest.raises(JwtSvidError):
            validate(mint(), jwt_authorities={TD: {"k1": wrong}})


# --------------------------------------------------------------------------- algorithm attacks


def test_alg_none_is_refused() -> None:
    for alg in ("none", "None", "NONE"):
        token = f"{b64json({'alg': alg, 'kid': 'k1', 'typ': 'JWT'})}.{b64json(good_claims())}."
        with pytest.raises(JwtSvidError, match="malformed|empty"):
            validate(token)
        # Even with a bogus signature part, "none" itself is named as the reason.
        with pytest.raises(JwtSvidError, match=f"algorithm '{alg}' is not allowed"):
            validate(token + "AAAA")


def test_hs256_with_public_key_as_hmac_secret_is_refused() -> None:
    # The classic confusion: the verifier's public key is known, so an attacker MACs with it.
    for secret in (
        EC256.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        EC256.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
    ):
        header = {"alg": "HS256", "kid": "k1", "typ": "JWT"}
        signing_input = f"{b64json(header)}.{b64json(good_claims())}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        with pytest.raises(JwtSvidError, match="algorithm 'HS256' is not allowed"):
            validate(f"{signing_input}.{jose.b64url_encode(mac)}")


@pytest.mark.parametrize("alg", ["HS384", "HS512", "ES256K", "RSA-OAEP", "Ed25519", "es256", ""])
def test_other_algorithms_are_refused(alg: str) -> None:
    token = f"{b64json({'alg': alg, 'kid': 'k1'})}.{b64json(good_claims())}.AAAA"
    with pytest.raises(JwtSvidError, match="not allowed"):
        validate(token)


@pytest.mark.parametrize(
    ("alg", "signer", "kid"),
    [
        ("ES256", EC256, "krsa"),   # EC signature, RSA key registered under that kid
        ("RS256", RSA, "k1"),       # RSA signature, EC key registered
        ("ES384", EC384, "k1"),     # right family, wrong curve
        ("EdDSA", ED, "k1"),
        ("ES256", EC256, "ked"),
    ],
)
def test_key_must_fit_the_algorithm(alg: str, signer: Any, kid: str) -> None:
    token = craft({"alg": alg, "kid": kid}, key=signer)
    with pytest.raises(JwtSvidError, match="needs an? .* key"):
        validate(token)


def test_alg_missing_or_not_a_string() -> None:
    for header in ({"kid": "k1"}, {"alg": 256, "kid": "k1"}, {"alg": ["ES256"], "kid": "k1"}):
        with pytest.raises(JwtSvidError, match="'alg' is missing or not a string"):
            validate(f"{b64json(header)}.{b64json(good_claims())}.AAAA")


# --------------------------------------------------------------------------- header refusals


def test_missing_kid_is_refused() -> None:
    with pytest.raises(JwtSvidError, match="'kid' is missing"):
        validate(craft({"alg": "ES256", "typ": "JWT"}))


@pytest.mark.parametrize("kid", ["", 1, None, ["k1"]])
def test_kid_must_be_a_non_empty_string(kid: Any) -> None:
    with pytest.raises(JwtSvidError, match="kid"):
        validate(craft({"alg": "ES256", "kid": kid}))


def test_unknown_kid_is_refused() -> None:
    with pytest.raises(UnknownJwtAuthorityError,
                       match="no JWT authority with key id 'nope' for trust domain example.org"):
        validate(craft({"alg": "ES256", "kid": "nope"}))


def test_kid_of_another_trust_domain_is_never_used() -> None:
    # Signed by the partner's real key, under the partner's real kid, but claiming to be a
    # workload of example.org: the partner's authorities must not vouch for example.org.
    token = craft({"alg": "ES256", "kid": "pk1"}, key=PARTNER_KEY)
    with pytest.raises(UnknownJwtAuthorityError,
                       match="no JWT authority with key id 'pk1' for trust domain example.org"):
        validate(token)
    # The same key is fine for the partner's own workloads.
    own = craft({"alg": "ES256", "kid": "pk1"},
                good_claims(sub="spiffe://partner.example/settlement"), key=PARTNER_KEY)
    assert validate(own).spiffe_id.trust_domain == PARTNER


def test_trust_domain_without_bundle_is_refused() -> None:
    token = craft(claims=good_claims(sub="spiffe://unknown.example/x"))
    with pytest.raises(UnknownJwtAuthorityError, match="no JWT authorities for trust domain unknown.example"):
        validate(token)
    with pytest.raises(UnknownJwtAuthorityError, match="unknown.example"):
        validate(token, jwt_authorities=lambda td: None)


@pytest.mark.parametrize("typ", ["at+jwt", "jwt", "", 1])
def test_bad_typ_is_refused(typ: Any) -> None:
    with pytest.raises(JwtSvidError, match="typ"):
        validate(craft({"alg": "ES256", "kid": "k1", "typ": typ}))


def test_crit_header_is_refused() -> None:
    with pytest.raises(JwtSvidError, match="crit"):
        validate(craft({"alg": "ES256", "kid": "k1", "crit": ["exp"]}))


# --------------------------------------------------------------------------- subject refusals


@pytest.mark.parametrize(
    ("sub", "message"),
    [
        ("payments", "not a SPIFFE ID"),
        ("https://example.org/payments", "not a SPIFFE ID"),
        ("spiffe://example.org", "trust domain, not a workload"),
        ("spiffe://Example.org/x", "not a SPIFFE ID"),
        (42, "must be a string"),
        (_DROP, "'sub' is missing"),
    ],
)
def test_subject_must_be_a_workload_spiffe_id(sub: Any, message: str) -> None:
    with pytest.raises(JwtSvidError, match=message):
        validate(craft(claims=good_claims(sub=sub)))


# --------------------------------------------------------------------------- claim refusals


def test_wrong_audience_is_refused() -> None:
    token = mint(audiences=["a", "b"])
    with pytest.raises(JwtSvidAudienceError, match=r"audience 'x' not in token audiences \['a', 'b'\]"):
        validate(token, audience="x")
    with pytest.raises(JwtSvidAudienceError):
        validate(token, audience=["x", "y"])


@pytest.mark.parametrize("aud", [_DROP, [], "", [""], 7, {"a": 1}, ["ledger", 3]])
def test_malformed_aud_is_refused(aud: Any) -> None:
    with pytest.raises(JwtSvidAudienceError, match="aud"):
        validate(craft(claims=good_claims(aud=aud)))


def test_expired_token_is_refused_with_the_time() -> None:
    token = mint()
    with pytest.raises(JwtSvidExpiredError, match=r"token expired at 2026-03-01T12:05:00Z"):
        validate(token, now=NOW + timedelta(minutes=5))  # exp is exclusive
    with pytest.raises(JwtSvidExpiredError):
        validate(token, now=NOW + timedelta(days=1))


@pytest.mark.parametrize("exp", [_DROP, "1700000000", True, None, [1], 10**30])
def test_bad_exp_is_refused(exp: Any) -> None:
    with pytest.raises(JwtSvidError, match="exp"):
        validate(craft(claims=good_claims(exp=exp)))


def test_nbf_in_the_future_is_refused() -> None:
    nbf = int((NOW + timedelta(minutes=1)).timestamp())
    token = craft(claims=good_claims(nbf=nbf))
    with pytest.raises(JwtSvidExpiredError, match="not valid before 2026-03-01T12:01:00Z"):
        validate(token)
    validate(token, now=NOW + timedelta(minutes=1))
    validate(token, leeway=timedelta(minutes=1))


def test_iat_in_the_future_or_after_exp_is_refused() -> None:
    with pytest.raises(JwtSvidExpiredError, match="issued in the future"):
        validate(craft(claims=good_claims(iat=int((NOW + timedelta(minutes=2)).timestamp()))))
    exp = int((NOW + timedelta(minutes=5)).timestamp())
    with pytest.raises(JwtSvidError, match="issued|'iat'"):
        validate(craft(claims=good_claims(iat=exp + 1)), now=NOW + timedelta(minutes=4),
                 leeway=timedelta(hours=1))
    with pytest.raises(JwtSvidError, match="'iat'"):
        validate(craft(claims=good_claims(iat="yesterday")))


def test_duplicate_claim_names_are_refused() -> None:
    # Two "sub" members: a different JSON parser downstream might keep the other one.
    header = b64json({"alg": "ES256", "kid": "k1"})
    raw = json.dumps(good_claims())[:-1] + ', "sub": "spiffe://example.org/admin"}'
    signing_input = f"{header}.{jose.b64url_encode(raw.encode())}"
    sig = jose.b64url_encode(jose.sign("ES256", EC256, signing_input.encode()))
    with pytest.raises(MalformedJwtSvidError, match="duplicate member 'sub'"):
        validate(f"{signing_input}.{sig}")


# --------------------------------------------------------------------------- tampering


def test_tampered_payload_is_refused() -> None:
    header, _, sig = mint().split(".")
    forged = b64json(good_claims(sub="spiffe://example.org/admin"))
    with pytest.raises(JwtSvidError, match="not validly signed"):
        validate(f"{header}.{forged}.{sig}")


def test_tampered_header_is_refused() -> None:
    _, payload, sig = mint().split(".")
    header = b64json({"alg": "ES256", "kid": "k1", "typ": "JOSE"})
    with pytest.raises(JwtSvidError, match="not validly signed"):
        validate(f"{header}.{payload}.{sig}")


def test_tampered_signature_is_refused() -> None:
    header, payload, sig = mint().split(".")
    raw = bytearray(jose.b64url_decode(sig))
    raw[10] ^= 0x01
    with pytest.raises(JwtSvidError, match="signature does not verify"):
        validate(f"{header}.{payload}.{jose.b64url_encode(bytes(raw))}")


def test_signature_by_another_key_is_refused() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(JwtSvidError, match="signature does not verify"):
        validate(mint(key=other))


def test_der_encoded_ecdsa_signature_is_refused() -> None:
    header = b64json({"alg": "ES256", "kid": "k1"})
    signing_input = f"{header}.{b64json(good_claims())}"
    der = EC256.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))  # a real, valid DER sig
    with pytest.raises(JwtSvidError, match=r"raw R\|\|S"):
        validate(f"{signing_input}.{jose.b64url_encode(der)}")


def test_pss_signature_with_wrong_salt_length_is_refused() -> None:
    header = b64json({"alg": "PS256", "kid": "krsa"})
    signing_input = f"{header}.{b64json(good_claims())}"
    sig = RSA.sign(signing_input.encode(),
                   padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=0), hashes.SHA256())
    with pytest.raises(JwtSvidError, match="signature does not verify"):
        validate(f"{signing_input}.{jose.b64url_encode(sig)}")


# --------------------------------------------------------------------------- structure


def test_oversized_token_is_refused_before_parsing() -> None:
    token = craft(claims=good_claims(pad="x" * MAX_TOKEN_CHARS))
    with pytest.raises(MalformedJwtSvidError, match="limit is 16384"):
        validate(token)
    with pytest.raises(MalformedJwtSvidError, match="limit"):
        parse_insecure(token)


@pytest.mark.parametrize("parts", [1, 2, 4, 5])
def test_wrong_number_of_parts_is_refused(parts: int) -> None:
    pieces = (mint().split(".") + ["AAAA", "AAAA"])[:parts]
    with pytest.raises(MalformedJwtSvidError, match=f"this has {parts}"):
        validate(".".join(pieces))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda h, p, s: f"{h}=.{p}.{s}",          # padding
        lambda h, p, s: f"{h}.{p}.{s}=",
        lambda h, p, s: f"{h}.{p.replace('e', '+')}.{s}",  # base64, not base64url
        lambda h, p, s: f"{h}.{p}.{s[:-1]}/",
        lambda h, p, s: f"{h}.{p}.{s} ",
        lambda h, p, s: f"{h}.{p}ä.{s}",
        lambda h, p, s: f"{h}.{p}.{s}AAA",        # 86 + 3 = 4n+1 chars: never valid
        lambda h, p, s: f"{h}..{s}",
    ],
)
def test_non_base64url_is_refused(mangle: Any) -> None:
    h, p, s = mint().split(".")
    with pytest.raises(MalformedJwtSvidError):
        validate(mangle(h, p, s))


def test_non_canonical_base64url_is_refused() -> None:
    h, p, s = mint().split(".")
    # A 64-byte signature is 86 chars; the last one carries 4 unused bits: set the lowest.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    bumped = alphabet[alphabet.index(s[-1]) ^ 0x01]
    with pytest.raises(MalformedJwtSvidError, match="non-canonical"):
        validate(f"{h}.{p}.{s[:-1]}{bumped}")


@pytest.mark.parametrize(
    "header_bytes",
    [b"not json", b"[1,2]", b'"str"', b'{"alg":"ES256","kid":"k1","exp":NaN}', b"\xff\xfe",
     b"[" * 5000 + b"]" * 5000],
)
def test_header_must_be_a_json_object(header_bytes: bytes) -> None:
    token = f"{jose.b64url_encode(header_bytes)}.{b64json(good_claims())}.AAAA"
    with pytest.raises(MalformedJwtSvidError):
        validate(token)


def test_claims_must_be_a_json_object() -> None:
    header = b64json({"alg": "ES256", "kid": "k1"})
    for payload in (b"[]", b"null", b"{", b'{"sub": 1e999999}'):
        signing_input = f"{header}.{jose.b64url_encode(payload)}"
        sig = jose.b64url_encode(jose.sign("ES256", EC256, signing_input.encode()))
        with pytest.raises(JwtSvidError):
            validate(f"{signing_input}.{sig}")


@pytest.mark.parametrize("token", [None, b"a.b.c", 42])
def test_non_string_token_is_refused(token: Any) -> None:
    with pytest.raises(MalformedJwtSvidError, match="must be a string"):
        validate(token)


def test_caller_misconfiguration_is_a_value_error() -> None:
    token = mint()
    with pytest.raises(ValueError, match="audience"):
        validate(token, audience=[])
    with pytest.raises(ValueError, match="timezone-aware"):
        validate(token, now=datetime(2026, 3, 1))
    with pytest.raises(ValueError, match="leeway"):
        validate(token, leeway=timedelta(seconds=-1))


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_text_only_raises_verification_error(text: str) -> None:
    with pytest.raises(VerificationError):
        validate(text)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_header_like = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["ES256", "RS256", "EdDSA", "none", "HS256"]) | _json_values,
        "kid": st.sampled_from(["k1", "krsa", "pk1"]) | _json_values,
        "typ": st.sampled_from(["JWT", "JOSE"]) | _json_values,
    },
)
_claims_like = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.sampled_from([str(WORKLOAD), "spiffe://partner.example/x"]) | _json_values,
        "aud": st.sampled_from(["ledger", ["ledger"]]) | _json_values,
        "exp": st.integers() | _json_values,
        "nbf": _json_values,
        "iat": _json_values,
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_header_like, _claims_like, st.binary(max_size=100))
def test_structured_garbage_only_raises_verification_error(
    header: dict[str, Any], claims: dict[str, Any], sig: bytes
) -> None:
    token = f"{b64json(header)}.{b64json(claims)}.{jose.b64url_encode(sig)}"
    with pytest.raises(VerificationError):
        validate(token)


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_b64url_round_trips_and_is_canonical(data: bytes) -> None:
    text = jose.b64url_encode(data)
    assert "=" not in text
    assert jose.b64url_decode(text) == data
