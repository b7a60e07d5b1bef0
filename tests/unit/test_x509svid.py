"""X509-SVIDs, CSRs and keys against the rules of the SPIFFE X509-SVID standard.

Every refusal is checked as carefully as the happy path it mirrors: each broken certificate
differs from a valid one in exactly one respect, and a positive control shows the valid
one passes. Keys and certificates are made once at module level to keep the file fast;
time is always injected (`NOW`), never read from the clock.
"""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trustmesh.errors import SvidError, VerificationError
from trustmesh.keys import (
    KEY_KINDS,
    generate_private_key,
    key_id,
    load_private_key_pkcs8_der,
    private_key_to_pkcs8_der,
    public_key_fingerprint,
)
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import (
    ADMIN_ENTRY_OID,
    MAX_CHAIN_DEPTH,
    MAX_CSR_BYTES,
    X509Svid,
    admin_entry_of,
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
PARTNER_API = SpiffeId.parse("spiffe://partner.example/api")


# --- builders ---------------------------------------------------------------------------


def _ca(
    issuer: x509.Certificate | None = None,
    issuer_key: object = None,
    *,
    td: TrustDomain = TD,
    kind: str = "ec-p256",
    path_length: int | None = None,
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=30),
    common_name: str | None = None,
    key: object = None,
) -> tuple[x509.Certificate, object]:
    """A root (issuer None) or an intermediate, through the module under test."""
    key = key or generate_private_key(kind)
    cert = build_ca_certificate(
        trust_domain=td, public_key=key.public_key(),  # type: ignore[attr-defined]
        issuer=issuer, issuer_key=key if issuer is None else issuer_key,  # type: ignore[arg-type]
        not_before=not_before, not_after=not_after, path_length=path_length,
        common_name=common_name or (f"root {td}" if issuer is None else f"signing {td}"),
    )
    return cert, key


def _leaf(
    issuer: x509.Certificate,
    issuer_key: object,
    *,
    spiffe_id: SpiffeId = LEDGER,
    key: object = None,
    dns: tuple[str, ...] = (),
    not_before: datetime = NOW - timedelta(minutes=1),
    not_after: datetime = NOW + timedelta(hours=1),
) -> x509.Certificate:
    key = key or generate_private_key()
    return build_leaf_certificate(
        spiffe_id=spiffe_id, public_key=key.public_key(), issuer=issuer,  # type: ignore[attr-defined]
        issuer_key=issuer_key, not_before=not_before, not_after=not_after, dns_names=dns,  # type: ignore[arg-type]
    )


_UNSET = object()


def _usage(*, digital_signature: bool = True, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def _raw(
    issuer: x509.Certificate,
    issuer_key: object,
    *,
    uris: list[str] | None = None,
    subject: x509.Name | None = None,
    ca: bool | None = False,
    path_length: int | None = None,
    usage: object = _UNSET,
    key: object = None,
) -> x509.Certificate:
    """A certificate built by hand, so that exactly one rule can be broken at a time.

    Defaults describe a valid leaf for LEDGER; each argument breaks one thing.
    """
    key = key or generate_private_key()
    uris = [str(LEDGER)] if uris is None else uris
    b = (x509.CertificateBuilder().subject_name(subject or x509.Name([])).issuer_name(issuer.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())  # type: ignore[attr-defined]
         .not_valid_before(NOW - timedelta(minutes=1)).not_valid_after(NOW + timedelta(hours=1)))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                            critical=subject is None)
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
    if usage is _UNSET:
        usage = _usage(digital_signature=not ca, key_cert_sign=bool(ca), crl_sign=bool(ca))
    if usage is not None:
        b = b.add_extension(usage, critical=True)  # type: ignore[arg-type]
    return b.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


# Made once: the shared hierarchy every test starts from.
ROOT, ROOT_KEY = _ca(path_length=1)
INTER, INTER_KEY = _ca(ROOT, ROOT_KEY, path_length=0, not_after=NOW + timedelta(days=1))
LEAF_KEY = generate_private_key()
LEAF = _leaf(INTER, INTER_KEY, key=LEAF_KEY)
ANCHORS = {TD: [ROOT]}
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _refused(chain: list[x509.Certificate], match: str, anchors: object = None, now: datetime = NOW) -> None:
    with pytest.raises(VerificationError, match=match):
        verify_x509_svid(chain, ANCHORS if anchors is None else anchors, now=now)  # type: ignore[arg-type]


# --- build_leaf_certificate ------------------------------------------------------------------


def test_leaf_san_is_exactly_the_spiffe_id_and_critical_because_the_subject_is_empty() -> None:
    san = LEAF.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.UniformResourceIdentifier(str(LEDGER))]
    assert LEAF.subject == x509.Name([])
    assert san.critical, "RFC 5280 4.1.2.6: an empty subject requires a critical SAN"
    assert spiffe_id_from_certificate(LEAF) == LEDGER


def test_leaf_with_dns_names_has_them_in_the_san_and_the_first_as_cn() -> None:
    leaf = _leaf(INTER, INTER_KEY, dns=("ledger.internal", "ledger", "*.ledger.internal"))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(LEDGER)]
    assert san.value.get_values_for_type(x509.DNSName) == ["ledger.internal", "ledger", "*.ledger.internal"]
    assert [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["ledger.internal"]
    assert not san.critical  # the subject is not empty, so criticality is not required
    assert verify_x509_svid([leaf, INTER], ANCHORS, now=NOW) == LEDGER


def test_a_first_dns_name_too_long_for_a_cn_leaves_the_subject_empty_and_the_san_critical() -> None:
    long_name = ("a" * 60) + ".example.org"  # a valid DNS name, but over the 64-character CN bound
    leaf = _leaf(INTER, INTER_KEY, dns=(long_name,))
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.DNSName) == [long_name]


def test_leaf_basic_constraints_say_not_a_ca_and_are_critical() -> None:
    bc = LEAF.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False and bc.value.path_length is None


@pytest.mark.parametrize(
    ("key", "key_agreement", "key_encipherment"),
    [
        (LEAF_KEY, True, False),
        (generate_private_key("ec-p384"), True, False),
        (generate_private_key("ed25519"), False, False),
        (RSA_KEY, False, True),
    ],
    ids=["ec-p256", "ec-p384", "ed25519", "rsa"],
)
def test_leaf_key_usage_is_critical_signing_only_and_never_a_ca_usage(
    key: object, key_agreement: bool, key_encipherment: bool
) -> None:
    leaf = _leaf(INTER, INTER_KEY, key=key)
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert ku.value.key_agreement is key_agreement
    assert ku.value.key_encipherment is key_encipherment
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert not ku.value.content_commitment and not ku.value.data_encipherment
    assert verify_x509_svid([leaf, INTER], ANCHORS, now=NOW) == LEDGER


def test_leaf_extended_key_usage_is_server_and_client_auth() -> None:
    eku = LEAF.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert set(eku.value) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert len(list(eku.value)) == 2


def test_leaf_key_identifiers_link_it_to_its_key_and_its_issuer() -> None:
    ski = _ski(LEAF)
    assert ski == x509.SubjectKeyIdentifier.from_public_key(LEAF_KEY.public_key()).digest  # type: ignore[arg-type]
    aki = LEAF.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ski(INTER)
    assert aki.key_identifier != _ski(ROOT)
    direct = _leaf(ROOT, ROOT_KEY)
    assert direct.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == _ski(ROOT)


def test_leaf_issuer_name_and_validity_are_what_was_asked() -> None:
    assert LEAF.issuer == INTER.subject
    assert LEAF.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert LEAF.not_valid_after_utc == NOW + timedelta(hours=1)
    assert LEAF.public_key() == LEAF_KEY.public_key()
    assert LEAF.serial_number > 0
    assert _leaf(INTER, INTER_KEY).serial_number != LEAF.serial_number


@pytest.mark.parametrize("spiffe_id", [TD.id, PARTNER.id])
def test_a_trust_domain_only_id_is_refused_for_a_leaf(spiffe_id: SpiffeId) -> None:
    with pytest.raises(SvidError, match="path"):
        _leaf(INTER, INTER_KEY, spiffe_id=spiffe_id)


@pytest.mark.parametrize("dns", [("bad name",), ("-ledger.example",), ("",), ("a" * 64 + ".example",), ("ledger..x",)])
def test_invalid_dns_names_are_refused(dns: tuple[str, ...]) -> None:
    with pytest.raises(SvidError, match="DNS name"):
        _leaf(INTER, INTER_KEY, dns=dns)


def test_dns_names_as_one_string_is_refused_rather_than_split_into_letters() -> None:
    with pytest.raises(SvidError, match="sequence"):
        build_leaf_certificate(spiffe_id=LEDGER, public_key=LEAF_KEY.public_key(), issuer=INTER,  # type: ignore[arg-type]
                               issuer_key=INTER_KEY, not_before=NOW, not_after=NOW + timedelta(hours=1),  # type: ignore[arg-type]
                               dns_names="ledger.internal")


def test_a_window_that_ends_before_it_starts_is_refused() -> None:
    with pytest.raises(SvidError, match="before it starts"):
        _leaf(INTER, INTER_KEY, not_before=NOW, not_after=NOW)


@pytest.mark.parametrize(("kind", "hash_name"), [("ec-p256", "sha256"), ("ec-p384", "sha384"), ("ed25519", None)])
def test_every_issuer_key_kind_signs_leaves_that_verify(kind: str, hash_name: str | None) -> None:
    root, key = _ca(kind=kind)
    leaf = _leaf(root, key)
    leaf.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    algorithm = leaf.signature_hash_algorithm
    assert (algorithm.name if algorithm else None) == hash_name
    assert verify_x509_svid([leaf], {TD: [root]}, now=NOW) == LEDGER
    # ... and an intermediate of that kind too.
    inter, inter_key = _ca(root, key, kind=kind)
    assert verify_x509_svid([_leaf(inter, inter_key), inter], {TD: [root]}, now=NOW) == LEDGER


# --- build_ca_certificate --------------------------------------------------------------------


@pytest.mark.parametrize("cert", [ROOT, INTER], ids=["root", "intermediate"])
def test_signing_certificates_are_critical_cas_with_cert_and_crl_sign(cert: x509.Certificate) -> None:
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.key_agreement and not ku.value.key_encipherment


@pytest.mark.parametrize("cert", [ROOT, INTER], ids=["root", "intermediate"])
def test_signing_certificate_san_is_the_trust_domain_id_without_a_path(cert: x509.Certificate) -> None:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert spiffe_id_from_certificate(cert) == TD.id
    assert spiffe_id_from_certificate(cert).is_trust_domain_id


def test_root_is_self_signed_and_the_intermediate_is_signed_by_it() -> None:
    assert ROOT.issuer == ROOT.subject
    ROOT.verify_directly_issued_by(ROOT)
    INTER.verify_directly_issued_by(ROOT)
    with pytest.raises(ValueError):  # names differ
        INTER.verify_directly_issued_by(INTER)
    root_aki = ROOT.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert root_aki.key_identifier == _ski(ROOT)
    inter_aki = INTER.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert inter_aki.key_identifier == _ski(ROOT) != _ski(INTER)
    assert _ski(INTER) == x509.SubjectKeyIdentifier.from_public_key(INTER_KEY.public_key()).digest  # type: ignore[attr-defined]


@pytest.mark.parametrize("path_length", [None, 0, 1, 5])
def test_path_length_is_honoured(path_length: int | None) -> None:
    root, _ = _ca(path_length=path_length)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == path_length


@pytest.mark.parametrize("common_name", ["", "x" * 65])
def test_ca_common_name_bounds(common_name: str) -> None:
    key = generate_private_key()
    with pytest.raises(SvidError, match="common name"):
        build_ca_certificate(trust_domain=TD, public_key=key.public_key(), issuer=None, issuer_key=key,
                             not_before=NOW, not_after=NOW + timedelta(days=1), path_length=None,
                             common_name=common_name)


# --- spiffe_id_from_certificate ---------------------------------------------------------------


def test_spiffe_id_from_a_hand_built_valid_leaf() -> None:
    assert spiffe_id_from_certificate(_raw(INTER, INTER_KEY)) == LEDGER


@pytest.mark.parametrize(
    ("uris", "match"),
    [
        ([], "0 URI SANs"),
        (["spiffe://example.org/a", "spiffe://example.org/b"], "2 URI SANs"),
        (["spiffe://example.org/a", "https://example.org/b"], "2 URI SANs"),
        (["https://example.org/ledger"], "not a SPIFFE ID"),
        (["SPIFFE://example.org/ledger"], "not a SPIFFE ID"),
        (["spiffe://example.org/a/../b"], "not a SPIFFE ID"),
    ],
)
def test_spiffe_id_from_certificate_needs_exactly_one_spiffe_uri(uris: list[str], match: str) -> None:
    with pytest.raises(VerificationError, match=match):
        spiffe_id_from_certificate(_raw(INTER, INTER_KEY, uris=uris))


def test_dns_sans_do_not_count_as_uri_sans() -> None:
    key = generate_private_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(INTER.subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("ledger"), x509.UniformResourceIdentifier(str(LEDGER)), x509.DNSName("spiffe.example")]
            ),
            critical=True,
        )
        .sign(INTER_KEY, hashes.SHA256())
    )  # type: ignore[arg-type]
    assert spiffe_id_from_certificate(cert) == LEDGER


# --- verify_x509_svid: accepted ---------------------------------------------------------------


def test_verifies_leaf_to_root_and_leaf_to_intermediate_to_root() -> None:
    assert verify_x509_svid([_leaf(ROOT, ROOT_KEY)], ANCHORS, now=NOW) == LEDGER
    assert verify_x509_svid([LEAF, INTER], ANCHORS, now=NOW) == LEDGER
    # A chain that also carries the root is fine: the root is matched from the bundle.
    assert verify_x509_svid([LEAF, INTER, ROOT], ANCHORS, now=NOW) == LEDGER
    # Anchors may be any sequence, and other trust domains may sit beside ours.
    partner_root, _ = _ca(td=PARTNER)
    assert verify_x509_svid([LEAF, INTER], {TD: (ROOT,), PARTNER: (partner_root,)}, now=NOW) == LEDGER


def test_verifies_against_either_root_during_a_rotation() -> None:
    new_root, new_key = _ca()
    new_inter, new_inter_key = _ca(new_root, new_key)
    both = {TD: [ROOT, new_root]}
    assert verify_x509_svid([LEAF, INTER], both, now=NOW) == LEDGER
    assert verify_x509_svid([_leaf(new_inter, new_inter_key), new_inter], both, now=NOW) == LEDGER
    assert verify_x509_svid([_leaf(new_root, new_key)], {TD: [new_root, ROOT]}, now=NOW) == LEDGER
    # Control: without the new root, the new chain is refused.
    _refused([_leaf(new_inter, new_inter_key), new_inter], "does not lead to a root")


def test_a_root_reissued_with_the_same_key_works_beside_its_expired_predecessor() -> None:
    # Same key and name, so both certificates "issued" the leaf; only the fresh one is valid.
    key = generate_private_key()
    old, _ = _ca(key=key, not_before=NOW - timedelta(days=60), not_after=NOW - timedelta(days=1))
    new, _ = _ca(key=key, not_before=NOW - timedelta(days=2), not_after=NOW + timedelta(days=60))
    assert old.subject == new.subject
    leaf = _leaf(new, key)
    assert verify_x509_svid([leaf], {TD: [old, new]}, now=NOW) == LEDGER
    assert verify_x509_svid([leaf], {TD: [new, old]}, now=NOW) == LEDGER
    _refused([leaf], "root certificate expired", anchors={TD: [old]})


def test_validity_edges_are_inclusive() -> None:
    assert verify_x509_svid([LEAF, INTER], ANCHORS, now=LEAF.not_valid_before_utc) == LEDGER
    assert verify_x509_svid([LEAF, INTER], ANCHORS, now=LEAF.not_valid_after_utc) == LEDGER


def test_longest_allowed_chain_verifies_and_one_more_is_refused() -> None:
    root, key = _ca()
    issuers = [(root, key)]
    for _ in range(MAX_CHAIN_DEPTH):
        issuers.append(_ca(*issuers[-1]))
    # MAX_CHAIN_DEPTH certificates: the leaf and MAX_CHAIN_DEPTH - 1 intermediates.
    top = issuers[MAX_CHAIN_DEPTH - 1]
    chain = [_leaf(*top)] + [c for c, _ in reversed(issuers[1:MAX_CHAIN_DEPTH])]
    assert len(chain) == MAX_CHAIN_DEPTH
    assert verify_x509_svid(chain, {TD: [root]}, now=NOW) == LEDGER
    longer = [_leaf(*issuers[-1])] + [c for c, _ in reversed(issuers[1:])]
    assert len(longer) == MAX_CHAIN_DEPTH + 1
    _refused(longer, f"longer than {MAX_CHAIN_DEPTH}", anchors={TD: [root]})


# --- verify_x509_svid: refused ----------------------------------------------------------------


def test_control_the_hand_built_leaf_verifies() -> None:
    assert verify_x509_svid([_raw(INTER, INTER_KEY), INTER], ANCHORS, now=NOW) == LEDGER


def test_refuses_a_leaf_that_is_a_ca() -> None:
    _refused([INTER, ROOT], "is a CA")  # a real signing certificate presented as a leaf
    _refused([_raw(INTER, INTER_KEY, ca=True, usage=_usage()), INTER], "is a CA")


def test_refuses_a_leaf_without_basic_constraints() -> None:
    _refused([_raw(INTER, INTER_KEY, ca=None), INTER], "basic constraints")


@pytest.mark.parametrize(
    ("usage", "match"),
    [
        (_usage(key_cert_sign=True), "keyCertSign"),
        (_usage(crl_sign=True), "cRLSign"),
        (_usage(digital_signature=False), "digitalSignature"),
        (None, "no key usage"),
    ],
)
def test_refuses_leaf_key_usage_breaks(usage: object, match: str) -> None:
    _refused([_raw(INTER, INTER_KEY, usage=usage), INTER], match)


@pytest.mark.parametrize(
    ("uris", "match"),
    [
        ([], "0 URI SANs"),
        ([str(LEDGER), "spiffe://example.org/other"], "2 URI SANs"),
        ([str(LEDGER), "https://ledger.example.org"], "2 URI SANs"),
        (["https://ledger.example.org"], "not a SPIFFE ID"),
        (["spiffe://example.org"], "no path"),
        (["spiffe://example.org/"], "not a SPIFFE ID"),
    ],
)
def test_refuses_leaf_identity_breaks(uris: list[str], match: str) -> None:
    _refused([_raw(INTER, INTER_KEY, uris=uris), INTER], match)


def test_refuses_an_expired_or_not_yet_valid_leaf() -> None:
    _refused([LEAF, INTER], "leaf certificate expired", now=NOW + timedelta(hours=1, seconds=1))
    early = _leaf(INTER, INTER_KEY, not_before=NOW + timedelta(minutes=5))
    _refused([early, INTER], "leaf certificate is not valid until")
    assert verify_x509_svid([early, INTER], ANCHORS, now=NOW + timedelta(minutes=5)) == LEDGER


def test_refuses_an_expired_intermediate() -> None:
    old_inter, old_key = _ca(ROOT, ROOT_KEY, not_before=NOW - timedelta(days=2), not_after=NOW - timedelta(seconds=1))
    leaf = _leaf(old_inter, old_key)
    _refused([leaf, old_inter], "intermediate certificate expired")
    assert verify_x509_svid([leaf, old_inter], ANCHORS, now=NOW - timedelta(seconds=1)) == LEDGER


def test_refuses_a_not_yet_valid_intermediate() -> None:
    future, key = _ca(ROOT, ROOT_KEY, not_before=NOW + timedelta(hours=1), not_after=NOW + timedelta(days=1))
    _refused([_leaf(future, key), future], "intermediate certificate is not valid until")


def test_refuses_an_expired_root() -> None:
    old_root, key = _ca(not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(seconds=1))
    leaf = _leaf(old_root, key)
    _refused([leaf], "root certificate expired", anchors={TD: [old_root]})
    assert verify_x509_svid([leaf], {TD: [old_root]}, now=NOW - timedelta(seconds=1)) == LEDGER


def test_a_partner_root_cannot_vouch_for_our_trust_domain() -> None:
    # The attacker controls partner.example's CA and copies our root's name exactly.
    attacker_root, attacker_key = _ca(td=PARTNER, common_name=f"root {TD}")
    assert attacker_root.subject == ROOT.subject
    forged = _leaf(attacker_root, attacker_key, spiffe_id=LEDGER)
    anchors = {TD: [ROOT], PARTNER: [attacker_root]}
    _refused([forged], "does not lead to a root of trust domain example.org", anchors=anchors)
    _refused([forged, attacker_root], "belongs to trust domain partner.example", anchors=anchors)
    # Through an intermediate it made for "example.org": still refused.
    fake_inter, fake_key = _ca(attacker_root, attacker_key, td=TD)
    _refused(
        [_leaf(fake_inter, fake_key), fake_inter],
        "does not lead to a root of trust domain example.org",
        anchors=anchors,
    )
    # Control: the same attacker root does vouch for its own trust domain.
    own = _leaf(attacker_root, attacker_key, spiffe_id=PARTNER_API)
    assert verify_x509_svid([own], anchors, now=NOW) == PARTNER_API
    # ... and a mixed store keyed the wrong way round is refused too.
    _refused([LEAF, INTER], "does not lead to a root of trust domain example.org", anchors={TD: [attacker_root]})


def test_refuses_a_trust_domain_with_no_anchors() -> None:
    partner_root, partner_key = _ca(td=PARTNER)
    partner_leaf = _leaf(partner_root, partner_key, spiffe_id=PARTNER_API)
    _refused([partner_leaf], "no trust bundle for trust domain partner.example")
    _refused([partner_leaf], "no trust bundle", anchors={PARTNER: [], TD: [ROOT]})
    _refused([LEAF, INTER], "no trust bundle for trust domain example.org", anchors={})


def test_refuses_an_intermediate_that_is_not_a_ca() -> None:
    # A real leaf SVID used to sign another: signature and names fine, CA=false.
    fake_key = generate_private_key()
    fake_issuer = _raw(
        ROOT,
        ROOT_KEY,
        uris=["spiffe://example.org/x"],
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sneaky")]),
        key=fake_key,
    )
    leaf = _leaf(fake_issuer, fake_key)
    leaf.verify_directly_issued_by(fake_issuer)
    _refused([leaf, fake_issuer], "intermediate certificate is not a CA")
    # No basic constraints at all is no better.
    bare = _raw(
        ROOT,
        ROOT_KEY,
        uris=[],
        ca=None,
        usage=_usage(key_cert_sign=True),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare")]),
        key=fake_key,
    )
    _refused([_leaf(bare, fake_key), bare], "not a CA")


def test_refuses_an_intermediate_ca_without_key_cert_sign() -> None:
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-certsign")])
    inter = _raw(ROOT, ROOT_KEY, uris=[str(TD.id)], subject=name, ca=True, usage=_usage(crl_sign=True), key=key)
    _refused([_leaf(inter, key), inter], "keyCertSign")
    control = _raw(ROOT, ROOT_KEY, uris=[str(TD.id)], subject=name, ca=True, key=key)
    assert verify_x509_svid([_leaf(control, key), control], ANCHORS, now=NOW) == LEDGER


def test_refuses_an_intermediate_of_another_trust_domain() -> None:
    foreign, key = _ca(ROOT, ROOT_KEY, td=PARTNER)
    _refused([_leaf(foreign, key), foreign], "belongs to trust domain partner.example")


def test_refuses_an_intermediate_whose_spiffe_id_has_a_path() -> None:
    # X509-SVID 3.2: a signing certificate's SPIFFE ID MUST NOT have a path.
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pathy")])
    inter = _raw(ROOT, ROOT_KEY, uris=["spiffe://example.org/ca"], subject=name, ca=True, key=key)
    _refused([_leaf(inter, key), inter], "has no path")


def test_refuses_an_intermediate_with_a_non_spiffe_uri() -> None:
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    inter = _raw(ROOT, ROOT_KEY, uris=["https://example.org"], subject=name, ca=True, key=key)
    _refused([_leaf(inter, key), inter], "not a SPIFFE ID")


def test_refuses_a_chain_longer_than_the_root_path_length_allows() -> None:
    root, root_key = _ca(path_length=0)
    inter1, key1 = _ca(root, root_key)
    inter2, key2 = _ca(inter1, key1)
    _refused(
        [_leaf(inter2, key2), inter2, inter1],
        "root certificate path length constraint 0 exceeded",
        anchors={TD: [root]},
    )
    _refused([_leaf(inter1, key1), inter1], "path length", anchors={TD: [root]})
    # Control: path length 0 still lets the root sign leaves directly.
    assert verify_x509_svid([_leaf(root, root_key)], {TD: [root]}, now=NOW) == LEDGER


def test_refuses_a_chain_longer_than_an_intermediate_path_length_allows() -> None:
    # INTER has path length 0: it may not sign another CA.
    sub, sub_key = _ca(INTER, INTER_KEY)
    _refused([_leaf(sub, sub_key), sub, INTER], "intermediate certificate path length constraint 0 exceeded")


def test_refuses_a_leaf_signed_by_another_key_under_the_same_issuer_name() -> None:
    impostor_key = generate_private_key()
    forged = _leaf(INTER, impostor_key)  # issuer name and AKI copied from INTER; wrong key
    assert forged.issuer == INTER.subject
    _refused([forged, INTER], "broken")
    forged_direct = _leaf(ROOT, impostor_key)
    _refused([forged_direct], "does not lead to a root")


def test_refuses_a_leaf_whose_signature_bytes_were_tampered_with() -> None:
    der = bytearray(_der(LEAF))
    der[-1] ^= 0x01  # last byte of the signature value
    tampered = x509.load_der_x509_certificate(bytes(der))
    assert tampered.tbs_certificate_bytes == LEAF.tbs_certificate_bytes
    _refused([tampered, INTER], "broken")


def test_refuses_a_broken_chain_order() -> None:
    other_inter, _ = _ca(ROOT, ROOT_KEY)
    _refused([LEAF, other_inter], "broken")
    _refused([LEAF, ROOT, INTER], "broken")


def test_refuses_empty_and_overlong_chains() -> None:
    _refused([], "no certificate")
    _refused([LEAF] + [INTER] * MAX_CHAIN_DEPTH, f"longer than {MAX_CHAIN_DEPTH}")


def test_refuses_a_critical_extension_it_does_not_understand() -> None:
    key = generate_private_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(INTER.subject)
        .public_key(key.public_key())
        .serial_number(9)
        .not_valid_before(NOW - timedelta(minutes=1))
        .not_valid_after(NOW + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(LEDGER))]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(), critical=True)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), critical=True
        )
        .sign(INTER_KEY, hashes.SHA256())
    )  # type: ignore[arg-type]
    _refused([cert, INTER], "critical extension")


def test_a_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_x509_svid([LEAF, INTER], ANCHORS, now=NOW.replace(tzinfo=None))


def test_a_malformed_name_in_a_loaded_certificate_is_a_refusal_not_a_crash() -> None:
    # cryptography parses names lazily: invalid UTF-8 in the issuer name loads fine and
    # only fails when the verifier compares names. That must be a VerificationError.
    leaf_der = _der(LEAF)
    assert leaf_der.count(b"trustmesh") == 1  # only in the issuer name: the subject is empty
    bad_leaf = x509.load_der_x509_certificate(leaf_der.replace(b"trustmesh", b"\x80rustmesh"))
    _refused([bad_leaf, INTER], "broken")
    inter_der = _der(INTER)
    assert inter_der.count(b"trustmesh") == 2  # issuer first, then subject
    bad_inter = x509.load_der_x509_certificate(inter_der.replace(b"trustmesh", b"\x80rustmesh", 1))
    _refused([LEAF, bad_inter], "does not lead to a root")
    # A malformed anchor is no match, and does not stop a good one from matching.
    bad_root = x509.load_der_x509_certificate(_der(ROOT).replace(b"trustmesh", b"\x80rustmesh"))
    _refused([LEAF, INTER], "does not lead to a root", anchors={TD: [bad_root]})
    assert verify_x509_svid([LEAF, INTER], {TD: [bad_root, ROOT]}, now=NOW) == LEDGER


# --- CSRs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KEY_KINDS)
@pytest.mark.parametrize("with_id", [True, False])
def test_csr_round_trip(kind: str, with_id: bool) -> None:
    key = generate_private_key(kind)
    der = build_csr(key, LEDGER if with_id else None)
    csr = parse_csr(der)
    assert csr.public_key() == key.public_key()
    assert csr.is_signature_valid
    assert parse_csr(bytearray(der)).public_key() == key.public_key()
    if with_id:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(LEDGER)]
    else:
        assert len(csr.extensions) == 0


def _csr_with(key: object, algorithm: object = None, dns_count: int = 0) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if dns_count:
        names = [x509.DNSName(f"host-{i:05d}.example.org") for i in range(dns_count)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, algorithm or hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: b"", "empty"),
        (lambda: "a string", "empty"),
        (lambda: b"garbage", "not a valid DER"),
        (lambda: b"\x30\x03\x02\x01\x00", "not a valid DER"),
        (lambda: b"\x30" * (MAX_CSR_BYTES + 1), "larger than"),
        (lambda: _csr_with(RSA_KEY), "RSAPublicKey is not allowed"),
        (lambda: _csr_with(ec.generate_private_key(ec.SECP521R1()), hashes.SHA512()), "secp521r1 is not allowed"),
        (lambda: _csr_with(ec.generate_private_key(ec.SECP256K1())), "secp256k1 is not allowed"),
    ],
    ids=["empty", "str", "garbage", "tbs-only", "oversize", "rsa", "p521", "secp256k1"],
)
def test_csr_refusals(make: object, match: str) -> None:
    with pytest.raises(SvidError, match=match):
        parse_csr(make())  # type: ignore[operator]


def test_an_oversize_csr_is_refused_by_size_even_when_it_is_valid() -> None:
    der = _csr_with(LEAF_KEY, dns_count=700)
    assert len(der) > MAX_CSR_BYTES
    x509.load_der_x509_csr(der)  # well-formed: the size alone is the reason
    with pytest.raises(SvidError, match="larger than"):
        parse_csr(der)
    small = _csr_with(LEAF_KEY, dns_count=10)
    assert parse_csr(small).public_key() == LEAF_KEY.public_key()


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_a_csr_with_a_flipped_signature_byte_is_refused(kind: str) -> None:
    original = build_csr(generate_private_key(kind), LEDGER)
    der = bytearray(original)
    der[-1] ^= 0x01  # the last byte of the signature value
    tampered = bytes(der)
    # Still well-formed DER with the same request info: only the signature check can fail.
    csr = x509.load_der_x509_csr(tampered)
    assert csr.tbs_certrequest_bytes == x509.load_der_x509_csr(original).tbs_certrequest_bytes
    assert csr.signature != x509.load_der_x509_csr(original).signature
    with pytest.raises(SvidError, match="signature is invalid"):
        parse_csr(tampered)


def test_a_csr_whose_key_was_swapped_is_refused() -> None:
    # A request signed by one key that names another key: no proof of possession.
    victim_spki = _der_spki(generate_private_key())
    der = build_csr(LEAF_KEY, LEDGER)
    own_spki = _der_spki(LEAF_KEY)
    assert der.count(own_spki) == 1
    with pytest.raises(SvidError, match="signature is invalid"):
        parse_csr(der.replace(own_spki, victim_spki))


def _der_spki(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_csr_with_an_unknown_version_is_refused_as_svid_error() -> None:
    der = build_csr(LEAF_KEY, LEDGER)
    assert der.count(b"\x02\x01\x00") >= 1
    bad = der.replace(b"\x02\x01\x00", b"\x02\x01\x05", 1)  # CertificationRequestInfo.version
    with pytest.raises(SvidError, match="not a valid DER"):
        parse_csr(bad)


# --- X509Svid ------------------------------------------------------------------------------


def test_chain_der_round_trip() -> None:
    svid = X509Svid(LEDGER, (LEAF, INTER), LEAF_KEY)
    der = svid.chain_der()
    assert der == _der(LEAF) + _der(INTER)
    back = X509Svid.from_der_chain(der, LEAF_KEY)
    assert back.spiffe_id == LEDGER
    assert back.cert_chain == (LEAF, INTER)
    assert back.leaf == LEAF
    assert back.expires_at == LEAF.not_valid_after_utc
    assert back.issued_at == LEAF.not_valid_before_utc
    assert back.private_key is LEAF_KEY
    assert X509Svid.from_der_chain(_der(LEAF)).cert_chain == (LEAF,)
    assert svid.to_pem() == svid.chain_pem()
    assert svid.chain_pem().count(b"BEGIN CERTIFICATE") == 2 and b"PRIVATE" not in svid.chain_pem()
    assert "PrivateKey" not in repr(svid)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\x30\x03abc",
        _der(LEAF)[:-5],
        _der(LEAF) + _der(INTER)[:40],
        _der(LEAF) + b"\x00",
        _der(LEAF)[:1],
    ],
    ids=["empty", "garbage", "not-a-cert", "truncated", "truncated-second", "trailing-byte", "one-byte"],
)
def test_from_der_chain_refusals(data: bytes) -> None:
    with pytest.raises(SvidError):
        X509Svid.from_der_chain(data)


def test_from_der_chain_refuses_a_leaf_that_is_not_an_svid() -> None:
    with pytest.raises(SvidError, match="0 URI SANs"):
        X509Svid.from_der_chain(_der(_raw(INTER, INTER_KEY, uris=[])))


def test_from_der_chain_refuses_a_certificate_with_an_unknown_version() -> None:
    der = _der(LEAF)
    assert der.count(b"\xa0\x03\x02\x01\x02") == 1  # [0] EXPLICIT version v3
    with pytest.raises(SvidError):
        X509Svid.from_der_chain(der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x07"))


def test_from_der_chain_refuses_a_key_that_is_not_the_leafs() -> None:
    with pytest.raises(SvidError, match="does not belong"):
        X509Svid.from_der_chain(_der(LEAF), generate_private_key())


def test_svid_value_refuses_inconsistent_parts() -> None:
    with pytest.raises(SvidError, match="at least its leaf"):
        X509Svid(LEDGER, ())
    with pytest.raises(SvidError, match="does not match"):
        X509Svid(SpiffeId.parse("spiffe://example.org/other"), (LEAF,))
    with pytest.raises(SvidError, match="does not belong"):
        X509Svid(LEDGER, (LEAF,), generate_private_key())


# --- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("ec-p256", lambda k: isinstance(k, ec.EllipticCurvePrivateKey) and isinstance(k.curve, ec.SECP256R1)),
        ("ec-p384", lambda k: isinstance(k, ec.EllipticCurvePrivateKey) and isinstance(k.curve, ec.SECP384R1)),
        ("ed25519", lambda k: isinstance(k, ed25519.Ed25519PrivateKey)),
    ],
)
def test_generate_kinds_and_pkcs8_round_trip(kind: str, check: object) -> None:
    key = generate_private_key(kind)
    assert check(key)  # type: ignore[operator]
    der = private_key_to_pkcs8_der(key)
    again = load_private_key_pkcs8_der(der)
    assert type(again) is type(key)
    assert private_key_to_pkcs8_der(again) == der
    assert again.public_key() == key.public_key()


def test_default_kind_is_p256_and_kinds_are_listed() -> None:
    key = generate_private_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert set(KEY_KINDS) == {"ec-p256", "ec-p384", "ed25519"}


@pytest.mark.parametrize("kind", ["rsa-2048", "EC-P256", "p256", "", "ed448"])
def test_unknown_kind_is_a_value_error(kind: str) -> None:
    with pytest.raises(ValueError, match="unknown key kind"):
        generate_private_key(kind)


def test_rsa_keys_load_from_pkcs8() -> None:
    assert load_private_key_pkcs8_der(private_key_to_pkcs8_der(RSA_KEY)).public_key() == RSA_KEY.public_key()


def _unknown_algorithm_pkcs8() -> bytes:
    der = private_key_to_pkcs8_der(LEAF_KEY)
    ec_public_key_oid = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey
    assert der.count(ec_public_key_oid) == 1
    return der.replace(ec_public_key_oid, bytes.fromhex("06072a8648ce3d0209"))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: b"", "not a valid"),
        (lambda: b"not a key", "not a valid"),
        (lambda: private_key_to_pkcs8_der(LEAF_KEY)[:-3], "not a valid"),
        (
            lambda: LEAF_KEY.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "not a valid",
        ),
        (_unknown_algorithm_pkcs8, "not a valid"),
        (lambda: private_key_to_pkcs8_der(x25519.X25519PrivateKey.generate()), "unsupported private key type"),  # type: ignore[arg-type]
    ],
    ids=["empty", "garbage", "truncated", "encrypted", "unknown-algorithm", "x25519"],
)
def test_bad_pkcs8_is_an_svid_error(make: object, match: str) -> None:
    with pytest.raises(SvidError, match=match):
        load_private_key_pkcs8_der(make())  # type: ignore[operator]


def test_key_id_is_stable_short_and_distinct() -> None:
    a, b = generate_private_key(), generate_private_key()
    kid = key_id(a.public_key())
    assert kid == key_id(a.public_key())
    assert kid == key_id(load_private_key_pkcs8_der(private_key_to_pkcs8_der(a)).public_key())
    assert kid != key_id(b.public_key())
    assert (
        len(kid) == 27
        and "=" not in kid
        and set(kid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    )
    fp = public_key_fingerprint(a.public_key())
    assert len(fp) == 64 and fp == public_key_fingerprint(a.public_key()) != public_key_fingerprint(b.public_key())
    ed = generate_private_key("ed25519")
    assert key_id(ed.public_key()) not in (kid, key_id(b.public_key()))


# --- property tests: hostile bytes only ever produce our own errors -----------------------


_FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
_CSR_DER = build_csr(LEAF_KEY, LEDGER)
_CHAIN_DER = _der(LEAF) + _der(INTER)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out)


_EDITS = st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=3)


@given(st.binary(max_size=600))
@_FUZZ
def test_random_bytes_into_parse_csr_only_raise_svid_error(data: bytes) -> None:
    try:
        parse_csr(data)
    except SvidError:
        pass


@given(st.binary(max_size=600))
@_FUZZ
def test_random_bytes_into_from_der_chain_only_raise_svid_error(data: bytes) -> None:
    try:
        X509Svid.from_der_chain(data)
    except SvidError:
        pass


@given(st.binary(max_size=64).map(lambda tail: b"\x30\x82" + len(tail).to_bytes(2, "big") + tail))
@_FUZZ
def test_random_der_shaped_bytes_into_both_parsers_only_raise_svid_error(data: bytes) -> None:
    for parse in (parse_csr, X509Svid.from_der_chain):
        try:
            parse(data)  # type: ignore[operator]
        except SvidError:
            pass


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@given(_EDITS)
@_FUZZ
def test_mutated_csrs_only_raise_svid_error(edits: list[tuple[int, int]]) -> None:
    data = _mutate(_CSR_DER, edits)
    try:
        csr = parse_csr(data)
    except SvidError:
        return
    assert csr.is_signature_valid


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@given(_EDITS)
@_FUZZ
def test_mutated_chains_only_raise_svid_error(edits: list[tuple[int, int]]) -> None:
    try:
        svid = X509Svid.from_der_chain(_mutate(_CHAIN_DER, edits))
    except SvidError:
        return
    assert svid.cert_chain


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@given(st.sampled_from(["leaf", "intermediate"]), _EDITS)
@_FUZZ
def test_mutated_certificates_are_refused_or_still_name_the_signed_identity(
    which: str, edits: list[tuple[int, int]]
) -> None:
    original = LEAF if which == "leaf" else INTER
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cert = x509.load_der_x509_certificate(_mutate(_der(original), edits))
        except (ValueError, x509.InvalidVersion):
            assume(False)
            return
    chain = [cert, INTER] if which == "leaf" else [LEAF, cert]
    try:
        result = verify_x509_svid(chain, ANCHORS, now=NOW)
    except VerificationError:
        return
    # Accepted only if nothing signed changed: the identity is the one the CA signed.
    assert result == LEDGER
    assert cert.tbs_certificate_bytes == original.tbs_certificate_bytes


# --- the admin entry extension ----------------------------------------------------------------


@pytest.mark.parametrize("entry_id", ["e1", "x" * 127, "y" * 128, "z" * 256])
def test_an_admin_svid_names_its_entry(entry_id: str) -> None:
    key = generate_private_key()
    leaf = build_leaf_certificate(spiffe_id=LEDGER, public_key=key.public_key(), issuer=INTER, issuer_key=INTER_KEY,
                                  not_before=NOW - timedelta(minutes=1), not_after=NOW + timedelta(hours=1),
                                  admin_entry=entry_id)
    assert admin_entry_of(leaf) == entry_id
    assert not leaf.extensions.get_extension_for_oid(ADMIN_ENTRY_OID).critical
    assert admin_entry_of(_leaf(INTER, INTER_KEY)) == ""  # ordinary SVIDs name no entry


@pytest.mark.parametrize("value", [b"", b"\x0c", b"\x0c\x05ab", b"\x04\x02ab", b"\x0c\x02\xff\xfe",
                                   b"\x0c\x83\x00\x00\x01a", b"\x0c\x00"])
def test_a_malformed_admin_entry_extension_names_no_entry(value: bytes) -> None:
    key = generate_private_key()
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(INTER.subject)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(NOW).not_valid_after(NOW + timedelta(hours=1))
            .add_extension(x509.UnrecognizedExtension(ADMIN_ENTRY_OID, value), critical=False)
            .sign(INTER_KEY, hashes.SHA256()))  # type: ignore[arg-type]
    assert admin_entry_of(leaf) == ""
