"""X509-SVID building and verification against the rules of the X509-SVID standard."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import SvidError, VerificationError
from trustmesh.keys import generate_private_key, key_id, load_private_key_pkcs8_der, private_key_to_pkcs8_der
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import (
    MAX_CHAIN_DEPTH,
    MAX_CSR_BYTES,
    X509Svid,
    build_ca_certificate,
    build_csr,
    build_leaf_certificate,
    parse_csr,
    spiffe_id_from_certificate,
    verify_x509_svid,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
TD = TrustDomain("example.org")
PARTNER = TrustDomain("partner.example")
LEDGER = SpiffeId.parse("spiffe://example.org/ledger")


def _root(td: TrustDomain = TD, path_length: int | None = 1, kind: str = "ec-p256",
          not_after: datetime = NOW + timedelta(days=30)) -> tuple[x509.Certificate, object]:
    key = generate_private_key(kind)
    cert = build_ca_certificate(trust_domain=td, public_key=key.public_key(), issuer=None, issuer_key=key,
                                not_before=NOW - timedelta(days=1), not_after=not_after,
                                path_length=path_length, common_name=f"root {td}")
    return cert, key


def _intermediate(root: x509.Certificate, root_key: object, td: TrustDomain = TD,
                  not_after: datetime = NOW + timedelta(days=1), path_length: int | None = 0) -> tuple[x509.Certificate, object]:
    key = generate_private_key()
    cert = build_ca_certificate(trust_domain=td, public_key=key.public_key(), issuer=root, issuer_key=root_key,  # type: ignore[arg-type]
                                not_before=NOW - timedelta(hours=1), not_after=not_after,
                                path_length=path_length, common_name="signing")
    return cert, key


def _leaf(issuer: x509.Certificate, issuer_key: object, spiffe_id: SpiffeId = LEDGER, dns: tuple[str, ...] = (),
          not_before: datetime = NOW - timedelta(minutes=1), not_after: datetime = NOW + timedelta(hours=1)) -> x509.Certificate:
    key = generate_private_key()
    return build_leaf_certificate(spiffe_id=spiffe_id, public_key=key.public_key(), issuer=issuer,
                                  issuer_key=issuer_key, not_before=not_before, not_after=not_after,  # type: ignore[arg-type]
                                  dns_names=dns)


ROOT, ROOT_KEY = _root()
INTER, INTER_KEY = _intermediate(ROOT, ROOT_KEY)
LEAF = _leaf(INTER, INTER_KEY)
ANCHORS = {TD: (ROOT,)}


def _raw_leaf(issuer: x509.Certificate, issuer_key: object, *, uris: list[str], ca: bool | None = False,
              key_cert_sign: bool = False, digital_signature: bool = True) -> x509.Certificate:
    """A leaf built by hand, to break one rule at a time."""
    key = generate_private_key()
    b = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - timedelta(minutes=1)).not_valid_after(NOW + timedelta(hours=1)))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    b = b.add_extension(x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False, key_agreement=False,
                                      key_cert_sign=key_cert_sign, crl_sign=False, encipher_only=False,
                                      decipher_only=False), critical=True)
    return b.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]


# --- building ---------------------------------------------------------------------------


def test_leaf_has_exactly_the_extensions_the_standard_requires() -> None:
    ext = LEAF.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(LEDGER)]
    assert san.critical, "an empty subject requires a critical SAN"
    assert LEAF.subject == x509.Name([])
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_agreement
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == INTER.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def test_leaf_with_dns_names_gets_a_common_name_and_a_non_critical_san() -> None:
    leaf = _leaf(INTER, INTER_KEY, dns=("ledger.internal", "ledger"))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["ledger.internal", "ledger"]
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(LEDGER)]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ledger.internal"


def test_a_leaf_needs_a_path() -> None:
    with pytest.raises(SvidError, match="path"):
        _leaf(INTER, INTER_KEY, spiffe_id=TD.id)


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "ed25519"])
def test_every_issuer_key_kind_signs_verifiable_chains(kind: str) -> None:
    root, key = _root(kind=kind)
    leaf = _leaf(root, key)
    leaf.verify_directly_issued_by(root)
    assert verify_x509_svid([leaf], {TD: [root]}, now=NOW) == LEDGER


def test_signing_certificates_are_cas_whose_id_has_no_path() -> None:
    for cert, path_length in ((ROOT, 1), (INTER, 0)):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == path_length
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        assert spiffe_id_from_certificate(cert) == TD.id
    ROOT.verify_directly_issued_by(ROOT)
    INTER.verify_directly_issued_by(ROOT)


@pytest.mark.parametrize("uris", [[], ["spiffe://example.org/a", "spiffe://example.org/b"], ["https://example.org/a"],
                                  ["spiffe://Example.org/a"]])
def test_spiffe_id_from_certificate_needs_exactly_one_spiffe_uri(uris: list[str]) -> None:
    with pytest.raises(VerificationError):
        spiffe_id_from_certificate(_raw_leaf(INTER, INTER_KEY, uris=uris))


# --- verification ---------------------------------------------------------------------


def test_verifies_leaf_intermediate_root_and_leaf_root() -> None:
    assert verify_x509_svid([LEAF, INTER], ANCHORS, now=NOW) == LEDGER
    direct = _leaf(ROOT, ROOT_KEY)
    assert verify_x509_svid([direct], ANCHORS, now=NOW) == LEDGER


def test_verifies_against_any_root_of_the_bundle_during_rotation() -> None:
    new_root, new_key = _root()
    leaf = _leaf(new_root, new_key)
    assert verify_x509_svid([leaf], {TD: (ROOT, new_root)}, now=NOW) == LEDGER


def _refused(chain: list[x509.Certificate], match: str, anchors: object = None, now: datetime = NOW) -> None:
    with pytest.raises(VerificationError, match=match):
        verify_x509_svid(chain, anchors if anchors is not None else ANCHORS, now=now)  # type: ignore[arg-type]


def test_refuses_a_leaf_that_is_a_ca() -> None:
    _refused([INTER, ROOT], "is a CA")
    _refused([_raw_leaf(INTER, INTER_KEY, uris=[str(LEDGER)], ca=True), INTER], "is a CA")


def test_refuses_leaf_rule_breaks() -> None:
    _refused([_raw_leaf(INTER, INTER_KEY, uris=[str(LEDGER)], ca=None), INTER], "basic constraints")
    _refused([_raw_leaf(INTER, INTER_KEY, uris=[str(LEDGER)], key_cert_sign=True), INTER], "keyCertSign")
    _refused([_raw_leaf(INTER, INTER_KEY, uris=[str(LEDGER)], digital_signature=False), INTER], "digitalSignature")
    _refused([_raw_leaf(INTER, INTER_KEY, uris=[]), INTER], "0 URI SANs")
    _refused([_raw_leaf(INTER, INTER_KEY, uris=[str(LEDGER), "spiffe://example.org/b"]), INTER], "2 URI SANs")
    _refused([_raw_leaf(INTER, INTER_KEY, uris=["https://ledger.example.org"]), INTER], "not a SPIFFE ID")
    _refused([_raw_leaf(INTER, INTER_KEY, uris=["spiffe://example.org"]), INTER], "no path")


def test_refuses_certificates_outside_their_validity() -> None:
    _refused([LEAF, INTER], "expired", now=NOW + timedelta(hours=2))
    early = _leaf(INTER, INTER_KEY, not_before=NOW + timedelta(minutes=5))
    _refused([early, INTER], "not valid until")
    old_inter, old_key = _intermediate(ROOT, ROOT_KEY, not_after=NOW - timedelta(minutes=1))
    leaf = _leaf(old_inter, old_key)
    _refused([leaf, old_inter], "intermediate certificate expired")
    old_root, old_root_key = _root(not_after=NOW - timedelta(minutes=1))
    _refused([_leaf(old_root, old_root_key)], "root certificate expired", anchors={TD: [old_root]})


def test_a_partner_ca_cannot_vouch_for_our_trust_domain() -> None:
    attacker_root, attacker_key = _root(td=PARTNER)
    forged = _leaf(attacker_root, attacker_key, spiffe_id=LEDGER)
    # Both trust domains are known; the chain must be checked against example.org's roots only.
    _refused([forged], "does not lead to a root of trust domain example.org",
             anchors={TD: [ROOT], PARTNER: [attacker_root]})


def test_refuses_unknown_trust_domains_and_empty_chains() -> None:
    partner_root, partner_key = _root(td=PARTNER)
    partner_leaf = _leaf(partner_root, partner_key, spiffe_id=SpiffeId.parse("spiffe://partner.example/api"))
    _refused([partner_leaf], "no trust bundle for trust domain partner.example")
    _refused([], "no certificate")


def test_refuses_an_intermediate_that_is_not_a_ca_or_of_another_domain() -> None:
    # A leaf used as an "issuer": signed properly but CA=false.
    fake_issuer_key = generate_private_key()
    fake_issuer = build_leaf_certificate(spiffe_id=SpiffeId.parse("spiffe://example.org/x"),
                                         public_key=fake_issuer_key.public_key(), issuer=ROOT, issuer_key=ROOT_KEY,  # type: ignore[arg-type]
                                         not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(hours=1),
                                         dns_names=("issuer.example",))
    leaf = build_leaf_certificate(spiffe_id=LEDGER, public_key=generate_private_key().public_key(),
                                  issuer=fake_issuer, issuer_key=fake_issuer_key, not_before=NOW - timedelta(minutes=1),
                                  not_after=NOW + timedelta(minutes=30))
    _refused([leaf, fake_issuer], "not a CA")
    foreign_inter, foreign_key = _intermediate(ROOT, ROOT_KEY, td=PARTNER)
    _refused([_leaf(foreign_inter, foreign_key), foreign_inter], "belongs to trust domain partner.example")


def test_refuses_a_chain_longer_than_the_path_length_allows() -> None:
    root, root_key = _root(path_length=0)
    inter1, key1 = _intermediate(root, root_key, path_length=None)
    inter2, key2 = _intermediate(inter1, key1, path_length=None)
    _refused([_leaf(inter2, key2), inter2, inter1], "path length", anchors={TD: [root]})


def test_refuses_a_forged_signature() -> None:
    # Same issuer name as the real intermediate, different key.
    impostor, impostor_key = _intermediate(ROOT, ROOT_KEY)
    forged = _leaf(impostor, generate_private_key())  # signed by an unrelated key
    _refused([forged, INTER], "broken|does not lead")


def test_refuses_overlong_chains() -> None:
    _refused([LEAF] + [INTER] * MAX_CHAIN_DEPTH, "longer than")


# --- CSRs -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "ed25519"])
def test_csr_round_trip(kind: str) -> None:
    key = generate_private_key(kind)
    csr = parse_csr(build_csr(key, LEDGER))
    assert csr.public_key() == key.public_key()


def _csr_with(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: b"", "empty"),
        (lambda: b"\x30\x03garbage", "not a valid"),
        (lambda: b"\x30" * (MAX_CSR_BYTES + 1), "larger than"),
        (lambda: _csr_with(rsa.generate_private_key(65537, 2048)), "RSAPublicKey"),
        (lambda: _csr_with(ec.generate_private_key(ec.SECP521R1())), "secp521r1"),
        (lambda: _csr_with(ec.generate_private_key(ec.SECP256K1())), "secp256k1"),
    ],
)
def test_csr_refusals(make: object, match: str) -> None:
    with pytest.raises(SvidError, match=match):
        parse_csr(make())  # type: ignore[operator]


def test_csr_with_a_bad_signature_is_refused() -> None:
    der = bytearray(build_csr(generate_private_key(), LEDGER))
    der[-3] ^= 0x01  # inside the signature value; the DER structure stays intact
    with pytest.raises(SvidError, match="signature"):
        parse_csr(bytes(der))


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_random_bytes_never_crash_the_csr_parser(data: bytes) -> None:
    try:
        parse_csr(data)
    except SvidError:
        pass


# --- the SVID value and keys ----------------------------------------------------------------


def test_chain_der_round_trip() -> None:
    svid = X509Svid(LEDGER, (LEAF, INTER))
    back = X509Svid.from_der_chain(svid.chain_der())
    assert back.spiffe_id == LEDGER and back.cert_chain == (LEAF, INTER)
    assert back.expires_at == LEAF.not_valid_after_utc


@pytest.mark.parametrize("data", [b"", b"garbage", X509Svid(LEDGER, (LEAF,)).chain_der()[:-5]])
def test_chain_der_refusals(data: bytes) -> None:
    with pytest.raises(SvidError):
        X509Svid.from_der_chain(data)


@given(st.binary(max_size=400))
@settings(max_examples=300)
def test_random_bytes_never_crash_the_chain_parser(data: bytes) -> None:
    try:
        X509Svid.from_der_chain(data)
    except SvidError:
        pass


def test_keys() -> None:
    for kind in ("ec-p256", "ec-p384", "ed25519"):
        key = generate_private_key(kind)
        again = load_private_key_pkcs8_der(private_key_to_pkcs8_der(key))
        assert again.public_key() == key.public_key()
    with pytest.raises(ValueError, match="unknown key kind"):
        generate_private_key("rsa-1024")
    with pytest.raises(SvidError):
        load_private_key_pkcs8_der(b"not a key")
    a, b = generate_private_key(), generate_private_key()
    assert key_id(a.public_key()) == key_id(a.public_key()) != key_id(b.public_key())
