"""Trust bundles: SPIFFE JWKS, PEM and DER forms, strict parsing, and BundleSet shapes."""

from __future__ import annotations

import base64
import copy
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh import jose
from trustmesh.bundle import MAX_JWKS_BYTES, Bundle, BundleSet, JwtAuthority
from trustmesh.errors import BundleError, VerificationError
from trustmesh.jwtsvid import sign_jwt_svid, validate_jwt_svid
from trustmesh.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
PARTNER = TrustDomain("partner.example")
NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)


def make_ca(key: Any, name: str = "example.org", td: str = "example.org") -> x509.Certificate:
    """A tiny self-signed SPIFFE root, enough for a bundle to carry."""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{td}")]),
            critical=False,
        )
        .sign(key, algorithm)
    )


CA_EC_KEY = ec.generate_private_key(ec.SECP256R1())
CA_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CA_EC = make_ca(CA_EC_KEY, "root-ec")
CA_RSA = make_ca(CA_RSA_KEY, "root-rsa")

JWT_P256 = ec.generate_private_key(ec.SECP256R1())
JWT_P384 = ec.generate_private_key(ec.SECP384R1())
JWT_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWT_ED = ed25519.Ed25519PrivateKey.generate()


def full_bundle(**kw: Any) -> Bundle:
    args: dict[str, Any] = dict(
        trust_domain=TD,
        x509_authorities=(CA_EC, CA_RSA),
        jwt_authorities=(
            JwtAuthority("p256", JWT_P256.public_key()),
            JwtAuthority("p384", JWT_P384.public_key()),
            JwtAuthority("rsa", JWT_RSA.public_key()),
            JwtAuthority("ed", JWT_ED.public_key()),
        ),
        sequence_number=7,
        refresh_hint=timedelta(minutes=5),
    )
    args.update(kw)
    return Bundle(**args)


def jwks_doc(bundle: Bundle | None = None) -> dict[str, Any]:
    return json.loads((bundle or full_bundle()).to_jwks())


def parse(doc: Any, td: TrustDomain = TD) -> Bundle:
    return Bundle.from_jwks(json.dumps(doc).encode(), td)


# --------------------------------------------------------------------------- JWKS round trip


def test_jwks_round_trip_with_every_key_type() -> None:
    bundle = full_bundle()
    again = Bundle.from_jwks(bundle.to_jwks(), TD)
    assert again == bundle
    assert again.sequence_number == 7
    assert again.refresh_hint == timedelta(minutes=5)
    keys = again.jwt_keys()
    assert set(keys) == {"p256", "p384", "rsa", "ed"}
    assert jose.same_public_key(keys["ed"], JWT_ED.public_key())


def test_jwks_layout_follows_the_standard() -> None:
    doc = jwks_doc()
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 300
    x509_keys = [k for k in doc["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert [k["kty"] for k in x509_keys] == ["EC", "RSA"]
    for key, cert in zip(x509_keys, (CA_EC, CA_RSA), strict=True):
        # x5c is standard base64 of exactly that one certificate's DER.
        assert key["x5c"] == [base64.b64encode(cert.public_bytes(Encoding.DER)).decode()]
        assert "kid" not in key
    assert {(k["kid"], k["kty"], k.get("crv")) for k in jwt_keys} == {
        ("p256", "EC", "P-256"), ("p384", "EC", "P-384"), ("rsa", "RSA", None), ("ed", "OKP", "Ed25519"),
    }
    assert all("d" not in k for k in doc["keys"])


def test_optional_members_are_omitted_and_empty_keys_is_valid() -> None:
    empty = Bundle(TD)
    assert json.loads(empty.to_jwks()) == {"keys": []}
    assert Bundle.from_jwks(b'{"keys": []}', TD) == empty
    assert Bundle.from_jwks(b'{"keys": []}', TD).is_empty()


def test_serialisation_is_deterministic() -> None:
    a = full_bundle().to_jwks()
    b = Bundle.from_jwks(a, TD).to_jwks()
    assert a == b
    assert json.dumps(json.loads(a), indent=2, sort_keys=True).encode() + b"\n" == a


def test_validates_jwt_svids_through_a_bundle_set() -> None:
    bundles = BundleSet([full_bundle(), Bundle(PARTNER)])
    for key, kid in ((JWT_P256, "p256"), (JWT_P384, "p384"), (JWT_RSA, "rsa"), (JWT_ED, "ed")):
        token = sign_jwt_svid(
            spiffe_id=SpiffeId.parse("spiffe://example.org/w"), audiences=["a"], private_key=key,
            key_id=kid, expires_at=NOW + timedelta(minutes=1), issued_at=NOW,
        )
        reparsed = BundleSet([Bundle.from_jwks(bundles[TD].to_jwks(), TD)])
        for authorities in (bundles.jwt_authorities(), reparsed.jwt_authorities()):
            assert validate_jwt_svid(token, audience="a", jwt_authorities=authorities, now=NOW).key_id == kid


# --------------------------------------------------------------------------- JWKS refusals


def test_x5c_with_two_certificates_is_refused() -> None:
    doc = jwks_doc()
    doc["keys"][0]["x5c"].append(base64.b64encode(CA_RSA.public_bytes(Encoding.DER)).decode())
    with pytest.raises(BundleError, match="exactly one certificate in 'x5c', found 2"):
        parse(doc)


@pytest.mark.parametrize("x5c", [_MISSING := object(), [], "abc", [1], ["not base64!"], ["AAAA"]])
def test_malformed_x5c_is_refused(x5c: Any) -> None:
    doc = jwks_doc()
    if x5c is _MISSING:
        del doc["keys"][0]["x5c"]
    else:
        doc["keys"][0]["x5c"] = x5c
    with pytest.raises(BundleError, match="key 0.*x5c"):
        parse(doc)


def test_x5c_must_not_be_base64url() -> None:
    doc = jwks_doc()
    der = CA_EC.public_bytes(Encoding.DER)
    url = base64.urlsafe_b64encode(der).decode()
    if url == base64.b64encode(der).decode():  # pragma: no cover - depends on random bytes
        pytest.skip("this certificate's base64 has no '+' or '/'")
    doc["keys"][0]["x5c"] = [url]
    with pytest.raises(BundleError, match="not valid base64"):
        parse(doc)


def test_jwk_key_must_match_its_certificate() -> None:
    doc = jwks_doc()
    other = jose.public_key_to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    doc["keys"][0].update(x=other["x"], y=other["y"])
    with pytest.raises(BundleError, match="does not match the key of its x5c certificate"):
        parse(doc)
    # An RSA JWK glued onto the EC certificate is refused too.
    doc = jwks_doc()
    doc["keys"][0]["x5c"] = doc["keys"][1]["x5c"]
    with pytest.raises(BundleError, match="does not match"):
        parse(doc)


def test_jwt_key_without_kid_is_refused() -> None:
    for bad in (_MISSING, "", 5, None):
        doc = jwks_doc()
        jwt_key = next(k for k in doc["keys"] if k["use"] == "jwt-svid")
        if bad is _MISSING:
            del jwt_key["kid"]
        else:
            jwt_key["kid"] = bad
        with pytest.raises(BundleError, match="jwt-svid key must have a non-empty 'kid'"):
            parse(doc)


def test_duplicate_kid_is_refused() -> None:
    doc = jwks_doc()
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    jwt_keys[1]["kid"] = jwt_keys[0]["kid"]
    with pytest.raises(BundleError, match="two JWT authorities with key id 'p256'"):
        parse(doc)
    with pytest.raises(BundleError, match="unique"):
        Bundle(TD, jwt_authorities=(JwtAuthority("k", JWT_ED.public_key()),
                                    JwtAuthority("k", JWT_P256.public_key())))


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "k"])
def test_private_key_material_is_refused(member: str) -> None:
    for index in (0, 3):  # an x509-svid key and a jwt-svid key
        doc = jwks_doc()
        doc["keys"][index][member] = "AQAB"
        with pytest.raises(BundleError, match="private key material"):
            parse(doc)


def test_real_private_jwk_is_refused() -> None:
    doc = jwks_doc(Bundle(TD))
    private_d = JWT_ED.private_bytes(
        Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    jwk = jose.public_key_to_jwk(JWT_ED.public_key(), kid="ed", use="jwt-svid")
    jwk["d"] = jose.b64url_encode(private_d)
    doc["keys"].append(jwk)
    with pytest.raises(BundleError, match=r"private key material \(d\)"):
        parse(doc)


def test_unknown_use_and_kty_are_ignored() -> None:
    doc = jwks_doc(Bundle(TD, jwt_authorities=(JwtAuthority("ed", JWT_ED.public_key()),)))
    doc["keys"] += [
        {"kty": "EC", "use": "enc", "crv": "P-256", "x": "garbage"},   # unknown use: not parsed
        {"kty": "EC", "use": "X509-SVID", "x5c": []},                 # use is case sensitive
        {"kty": "oct", "use": "jwt-svid", "kid": "h", "kk": "c2VjcmV0"},  # unknown kty
        {"kty": "AKP", "use": "x509-svid"},
    ]
    doc["unknown_top_level"] = {"ignored": True}
    bundle = parse(doc)
    assert [a.key_id for a in bundle.jwt_authorities] == ["ed"]
    assert bundle.x509_authorities == ()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda k: k.pop("use"), "no 'use'"),
        (lambda k: k.update(use=1), "'use' must be a string"),
        (lambda k: k.pop("kty"), "'kty' is missing"),
        (lambda k: k.update(crv="P-192"), "curve 'P-192' is not supported"),
        (lambda k: k.update(crv="secp256k1"), "not supported"),
        (lambda k: k.update(x=k["x"][:-3]), "must be 32 bytes"),
        (lambda k: k.update(x=k["x"] + "="), "base64url"),
        (lambda k: k.update(y=jose.b64url_encode(b"\x01" * 32)), "not a valid P-256 point"),
        (lambda k: k.pop("y"), "'y' is missing"),
    ],
)
def test_malformed_ec_jwt_key_is_refused(mutate: Any, message: str) -> None:
    doc = jwks_doc(Bundle(TD, jwt_authorities=(JwtAuthority("k", JWT_P256.public_key()),)))
    mutate(doc["keys"][0])
    with pytest.raises(BundleError, match=message):
        parse(doc)


def test_malformed_rsa_and_okp_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    doc = {"keys": [jose.public_key_to_jwk(weak.public_key(), kid="w", use="jwt-svid")]}
    with pytest.raises(BundleError, match="at least 2048"):
        parse(doc)
    doc = jwks_doc(Bundle(TD, jwt_authorities=(JwtAuthority("r", JWT_RSA.public_key()),)))
    doc["keys"][0]["n"] = "AA" + doc["keys"][0]["n"]
    with pytest.raises(BundleError, match="leading zero"):
        parse(doc)
    doc = jwks_doc(Bundle(TD, jwt_authorities=(JwtAuthority("r", JWT_RSA.public_key()),)))
    doc["keys"][0]["e"] = "Ag"  # e = 2: even exponents are not RSA
    with pytest.raises(BundleError, match="RSA"):
        parse(doc)
    doc = jwks_doc(Bundle(TD, jwt_authorities=(JwtAuthority("e", JWT_ED.public_key()),)))
    doc["keys"][0]["crv"] = "Ed448"
    with pytest.raises(BundleError, match="Ed448"):
        parse(doc)
    doc["keys"][0].update(crv="Ed25519", x=jose.b64url_encode(b"\x00" * 31))
    with pytest.raises(BundleError, match="32 bytes"):
        parse(doc)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "no 'keys'"),
        ({"keys": {}}, "'keys' must be a list"),
        ({"keys": None}, "'keys' must be a list"),
        ({"keys": ["x"]}, "key 0 must be a JSON object"),
        ({"keys": [], "spiffe_sequence": -1}, "spiffe_sequence"),
        ({"keys": [], "spiffe_sequence": "1"}, "spiffe_sequence"),
        ({"keys": [], "spiffe_sequence": True}, "spiffe_sequence"),
        ({"keys": [], "spiffe_sequence": 1.5}, "spiffe_sequence"),
        ({"keys": [], "spiffe_sequence": 2**64}, "spiffe_sequence"),
        ({"keys": [], "spiffe_refresh_hint": -5}, "spiffe_refresh_hint"),
        ({"keys": [], "spiffe_refresh_hint": 1.5}, "spiffe_refresh_hint"),
        ([], "must be a JSON object"),
    ],
)
def test_malformed_documents_are_refused(doc: Any, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        parse(doc)


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b'{"keys": [', b"\xff\xfe{}", b'{"keys": [], "keys": []}',
     b'{"keys": [], "spiffe_sequence": NaN}', b"[" * 100_000 + b"]" * 100_000],
)
def test_garbage_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(BundleError):
        Bundle.from_jwks(data, TD)


def test_oversized_bundle_is_refused() -> None:
    data = b'{"keys": [], "pad": "' + b"x" * MAX_JWKS_BYTES + b'"}'
    with pytest.raises(BundleError, match="limit is 1048576"):
        Bundle.from_jwks(data, TD)


def test_sequence_number_bounds() -> None:
    assert parse({"keys": [], "spiffe_sequence": 2**64 - 1}).sequence_number == 2**64 - 1
    assert parse({"keys": [], "spiffe_sequence": 0}).sequence_number == 0
    with pytest.raises(BundleError):
        Bundle(TD, sequence_number=-1)
    with pytest.raises(BundleError, match="whole number of seconds"):
        Bundle(TD, refresh_hint=timedelta(milliseconds=1500))


# --------------------------------------------------------------------------- PEM and DER


def test_pem_round_trip() -> None:
    bundle = Bundle(TD, x509_authorities=(CA_EC, CA_RSA))
    pem = bundle.to_pem()
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 2
    assert pem == bundle.x509_authorities_pem()
    assert Bundle.from_pem(pem, TD) == bundle
    assert Bundle.from_pem(pem.decode(), TD) == bundle


def test_pem_refusals() -> None:
    with pytest.raises(BundleError, match="no certificates"):
        Bundle.from_pem(b"", TD)
    with pytest.raises(BundleError, match="malformed"):
        Bundle.from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", TD)
    key_pem = CA_EC_KEY.private_bytes(
        Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(BundleError, match="contains a private key"):
        Bundle.from_pem(CA_EC.public_bytes(Encoding.PEM) + key_pem, TD)
    twice = CA_EC.public_bytes(Encoding.PEM) * 2
    with pytest.raises(BundleError, match="twice"):
        Bundle.from_pem(twice, TD)


def test_der_concatenation_round_trip() -> None:
    bundle = Bundle(TD, x509_authorities=(CA_EC, CA_RSA))
    der = bundle.x509_authorities_der()
    assert der == CA_EC.public_bytes(Encoding.DER) + CA_RSA.public_bytes(Encoding.DER)
    assert Bundle.from_der(der, TD) == bundle
    assert Bundle.from_der(b"", TD).is_empty()
    for bad in (der[:-1], der + b"\x30", der + b"\x00\x00", b"\x30\x80" + der):
        with pytest.raises(BundleError, match="DER bundle"):
            Bundle.from_der(bad, TD)


# --------------------------------------------------------------------------- values and sets


def test_bundle_is_a_frozen_hashable_value() -> None:
    a, b = full_bundle(), full_bundle()
    assert a == b and hash(a) == hash(b)
    assert a != a.with_sequence_number(8)
    with pytest.raises(AttributeError):
        a.sequence_number = 3  # type: ignore[misc]
    assert a.with_jwt_authority(JwtAuthority("p256", JWT_ED.public_key())).jwt_keys()["p256"] is not None
    assert "p256" not in a.without_jwt_authority("p256").jwt_keys()
    assert a.with_x509_authorities([CA_RSA]).x509_authorities == (CA_RSA,)
    assert a.with_refresh_hint(None).refresh_hint is None


def test_jwt_authority_equality_uses_the_key_bytes() -> None:
    key = JWT_P256.public_key()
    same = serialization.load_der_public_key(jose.spki_der(key))
    assert JwtAuthority("k", key) == JwtAuthority("k", same)  # type: ignore[arg-type]
    assert JwtAuthority("k", key) != JwtAuthority("k", JWT_P384.public_key())
    with pytest.raises(BundleError, match="key id"):
        JwtAuthority("", key)
    with pytest.raises(BundleError, match="unsupported key type str"):
        JwtAuthority("k", "not a key")  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="private key where a public key belongs"):
        JwtAuthority("k", JWT_P256)  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="secp256k1"):
        JwtAuthority("k", ec.generate_private_key(ec.SECP256K1()).public_key())


def test_bundle_set_shapes_and_immutability() -> None:
    ours = full_bundle()
    partner = Bundle(PARTNER, x509_authorities=(make_ca(CA_RSA_KEY, "p", "partner.example"),),
                     jwt_authorities=(JwtAuthority("pk", JWT_ED.public_key()),))
    bundles = BundleSet([partner, ours])
    assert list(bundles) == [TD, PARTNER]
    assert bundles.get(TD) is ours and bundles.get(TrustDomain("nope.example")) is None
    assert bundles.x509_anchors()[TD] == (CA_EC, CA_RSA)
    assert set(bundles.jwt_authorities()[PARTNER]) == {"pk"}
    assert set(bundles.jwt_authorities()[TD]) == {"p256", "p384", "rsa", "ed"}
    replaced = bundles.with_bundle(Bundle(TD))
    assert replaced[TD].is_empty() and bundles[TD] is ours  # the original is untouched
    assert TD not in bundles.without(TD)
    with pytest.raises(BundleError, match="two bundles"):
        BundleSet([ours, Bundle(TD)])
    with pytest.raises(AttributeError):
        bundles._bundles = {}
    with pytest.raises(TypeError):
        bundles[TD] = ours  # type: ignore[index]


# --------------------------------------------------------------------------- properties

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)
_jwk_like = st.fixed_dictionaries(
    {},
    optional={
        "kty": st.sampled_from(["EC", "RSA", "OKP", "oct"]) | _json,
        "use": st.sampled_from(["x509-svid", "jwt-svid", "enc"]) | _json,
        "crv": st.sampled_from(["P-256", "P-384", "Ed25519"]) | _json,
        "kid": _json,
        "x": st.sampled_from(["", "AAAA", jose.b64url_encode(b"\x01" * 32)]) | _json,
        "y": _json,
        "n": _json,
        "e": st.just("AQAB") | _json,
        "x5c": st.lists(st.text(max_size=30), max_size=2) | _json,
        "d": _json,
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {"keys": st.lists(_jwk_like, max_size=4) | _json},
        optional={"spiffe_sequence": _json, "spiffe_refresh_hint": _json},
    )
    | _json
)
def test_random_json_only_raises_bundle_error(doc: Any) -> None:
    try:
        bundle = Bundle.from_jwks(json.dumps(doc).encode(), TD)
    except BundleError:
        return
    # Whatever parsed must serialise and parse back to the same bundle.
    assert Bundle.from_jwks(bundle.to_jwks(), TD) == bundle


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_bundle_error(data: bytes) -> None:
    for parser in (Bundle.from_jwks, Bundle.from_pem, Bundle.from_der):
        try:
            parser(data, TD)
        except BundleError:
            pass


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_real_bundle_only_raises_bundle_error(data: st.DataObject) -> None:
    doc = copy.deepcopy(_REAL_DOC)
    key = data.draw(st.sampled_from(doc["keys"]))
    member = data.draw(st.sampled_from(sorted(key)))
    key[member] = data.draw(_json)
    try:
        Bundle.from_jwks(json.dumps(doc).encode(), TD)
    except BundleError:
        pass


_REAL_DOC = json.loads(full_bundle().to_jwks())


def test_bundle_error_is_not_a_verification_error() -> None:
    # Callers map these to different gRPC codes; keep the hierarchy honest.
    assert not issubclass(BundleError, VerificationError)
