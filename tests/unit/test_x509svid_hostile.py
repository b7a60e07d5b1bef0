"""Hostile certificates against verify_x509_svid: each is refused with a VerificationError
that names the rule, never a crash and never silently accepted.

Kept apart from test_x509svid.py (the standard's rules) because these tests forge DER by
hand: a duplicated extension, an unknown key algorithm, name constraints, a sha1 signature.
Each refusal has a positive control that differs from it in the one respect tested.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from trustmesh.errors import SvidError, VerificationError
from trustmesh.keys import PrivateKey, generate_private_key
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import (
    X509Svid,
    build_ca_certificate,
    build_leaf_certificate,
    spiffe_id_from_certificate,
    verify_x509_svid,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
TD = TrustDomain("example.org")
LEDGER = SpiffeId.parse("spiffe://example.org/ledger")

_SAN_OID = bytes.fromhex("0603551d11")  # 2.5.29.17 subjectAltName, as DER
_SPARE_OID = bytes.fromhex("0603551d63")  # 2.5.29.99: same length, unassigned
_EC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey
_UNKNOWN_KEY_OID = bytes.fromhex("06072a8648ce3d0209")  # same length, no such algorithm


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _root() -> tuple[x509.Certificate, PrivateKey]:
    key = generate_private_key()
    return build_ca_certificate(trust_domain=TD, public_key=key.public_key(), issuer=None, issuer_key=key,
                                not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=30),
                                path_length=1, common_name="root"), key


ROOT, ROOT_KEY = _root()
_inter_key = generate_private_key()
INTER = build_ca_certificate(trust_domain=TD, public_key=_inter_key.public_key(), issuer=ROOT, issuer_key=ROOT_KEY,
                             not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(days=1),
                             path_length=0, common_name="signing")
INTER_KEY: PrivateKey = _inter_key
ANCHORS = {TD: [ROOT]}


def _leaf(issuer: x509.Certificate, issuer_key: PrivateKey, dns: tuple[str, ...] = ()) -> x509.Certificate:
    return build_leaf_certificate(spiffe_id=LEDGER, public_key=generate_private_key().public_key(), issuer=issuer,
                                  issuer_key=issuer_key, not_before=NOW - timedelta(minutes=1),
                                  not_after=NOW + timedelta(hours=1), dns_names=dns)


def _refused(chain: list[x509.Certificate], match: str,
             anchors: dict[TrustDomain, list[x509.Certificate]] | None = None, now: datetime = NOW) -> None:
    with pytest.raises(VerificationError, match=match):
        verify_x509_svid(chain, anchors if anchors is not None else ANCHORS, now=now)


def _usage(*, sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=sign, crl_sign=sign,
                         encipher_only=False, decipher_only=False)


def _self_signed_root(
    name: str, usage: x509.KeyUsage | None, extra: list[tuple[x509.ExtensionType, bool]] | None = None
) -> tuple[x509.Certificate, PrivateKey]:
    key = generate_private_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(TD.id))]), critical=False))
    if usage is not None:
        b = b.add_extension(usage, critical=True)
    for ext, critical in extra or []:
        b = b.add_extension(ext, critical=critical)
    return b.sign(key, hashes.SHA256()), key


# --- malformed DER that loads ------------------------------------------------------------------


def _leaf_with_two_san_extensions() -> x509.Certificate:
    """A leaf carrying a second SAN under an unassigned OID of the same length, renamed in the
    DER afterwards. The signature breaks, but the duplicate must be caught before that."""
    second = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/other")])
    key = generate_private_key()
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(INTER.subject)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(NOW - timedelta(minutes=1)).not_valid_after(NOW + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(LEDGER))]), critical=True)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), second.public_bytes()),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(INTER_KEY, hashes.SHA256()))
    der = _der(cert)
    assert der.count(_SPARE_OID) == 1
    return x509.load_der_x509_certificate(der.replace(_SPARE_OID, _SAN_OID))


def test_a_duplicated_extension_is_our_error_at_every_entry_point() -> None:
    twice = _leaf_with_two_san_extensions()
    with pytest.raises(VerificationError, match="malformed extensions"):
        spiffe_id_from_certificate(twice)
    _refused([twice, INTER], "malformed extensions")
    with pytest.raises(SvidError, match="malformed extensions"):
        X509Svid.from_der_chain(_der(twice) + _der(INTER))


def _with_unknown_key_algorithm(cert: x509.Certificate) -> x509.Certificate:
    der = _der(cert)
    assert der.count(_EC_KEY_OID) == 1
    return x509.load_der_x509_certificate(der.replace(_EC_KEY_OID, _UNKNOWN_KEY_OID))


def test_issuers_whose_key_algorithm_is_unknown_are_refused() -> None:
    leaf = _leaf(INTER, INTER_KEY)
    assert verify_x509_svid([leaf, INTER], ANCHORS, now=NOW) == LEDGER  # control
    _refused([leaf, _with_unknown_key_algorithm(INTER)], "broken")
    direct = _leaf(ROOT, ROOT_KEY)
    _refused([direct], "does not lead to a root", anchors={TD: [_with_unknown_key_algorithm(ROOT)]})
    _refused([_with_unknown_key_algorithm(leaf), INTER], "broken|does not lead")


# --- signing certificates ------------------------------------------------------------------------


@pytest.mark.parametrize("usage", [None, _usage(sign=False)], ids=["no-key-usage", "no-keyCertSign"])
def test_a_root_must_be_allowed_to_sign_certificates(usage: x509.KeyUsage | None) -> None:
    root, key = _self_signed_root("root", usage)
    _refused([_leaf(root, key)], "root certificate may not sign", anchors={TD: [root]})
    control, control_key = _self_signed_root("root", _usage(sign=True))
    assert verify_x509_svid([_leaf(control, control_key)], {TD: [control]}, now=NOW) == LEDGER


def test_an_unknown_critical_extension_on_a_root_is_refused_and_non_critical_ignored() -> None:
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    root, key = _self_signed_root("root", _usage(sign=True), [(unknown, True)])
    _refused([_leaf(root, key)], "root certificate has a critical extension .*1.3.6.1.4.1.55555.1",
             anchors={TD: [root]})
    fine, fine_key = _self_signed_root("root", _usage(sign=True), [(unknown, False)])
    assert verify_x509_svid([_leaf(fine, fine_key)], {TD: [fine]}, now=NOW) == LEDGER


# --- name constraints are enforced, never ignored -------------------------------------------------


def _constrained(permitted: list[x509.GeneralName] | None,
                 excluded: list[x509.GeneralName] | None) -> tuple[x509.Certificate, PrivateKey]:
    nc = x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)
    return _self_signed_root("constrained root", _usage(sign=True), [(nc, True)])


def test_name_constraints_that_permit_the_trust_domain_and_dns_names() -> None:
    root, key = _constrained([x509.UniformResourceIdentifier("example.org"), x509.DNSName("internal")], None)
    assert verify_x509_svid([_leaf(root, key, dns=("ledger.internal",))], {TD: [root]}, now=NOW) == LEDGER
    _refused([_leaf(root, key, dns=("ledger.example.com",))], "do not allow DNS name ledger.example.com",
             anchors={TD: [root]})


def test_name_constraints_that_permit_only_another_trust_domain() -> None:
    root, key = _constrained([x509.UniformResourceIdentifier("partner.example")], None)
    _refused([_leaf(root, key)], "name constraints do not allow spiffe://example.org/ledger", anchors={TD: [root]})


def test_excluded_subtrees_refuse_hosts_below_them() -> None:
    # ".org" (leading dot) is every host below org, example.org included.
    root, key = _constrained(None, [x509.UniformResourceIdentifier(".org")])
    _refused([_leaf(root, key)], "do not allow", anchors={TD: [root]})
    other, other_key = _constrained(None, [x509.UniformResourceIdentifier(".com")])
    assert verify_x509_svid([_leaf(other, other_key)], {TD: [other]}, now=NOW) == LEDGER


def test_name_constraints_on_an_intermediate_apply_too() -> None:
    key = generate_private_key()
    nc = x509.NameConstraints(permitted_subtrees=[x509.UniformResourceIdentifier("partner.example")],
                              excluded_subtrees=None)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "constrained signing")])
    inter = (x509.CertificateBuilder().subject_name(subject).issuer_name(ROOT.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(_usage(sign=True), critical=True)
             .add_extension(nc, critical=True)
             .sign(ROOT_KEY, hashes.SHA256()))
    _refused([_leaf(inter, key), inter], "intermediate certificate name constraints do not allow")


def test_a_constraint_type_it_cannot_evaluate_fails_closed() -> None:
    directory = x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    root, key = _constrained([directory], None)
    _refused([_leaf(root, key)], "DirectoryName name constraint, which is not supported", anchors={TD: [root]})


# --- weak signatures ------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to sign with sha1")
def test_a_sha1_signed_leaf_is_refused_by_name(tmp_path: Path) -> None:
    # cryptography refuses to sign with sha1, so openssl signs a leaf with the real
    # intermediate's key. cryptography would not verify it either, but the refusal must
    # say why ("sha1, too weak") rather than "chain is broken".
    (tmp_path / "ca.pem").write_bytes(INTER.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(INTER_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    leaf_key = generate_private_key()
    (tmp_path / "leaf.csr").write_bytes(
        x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        .sign(leaf_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ext.cnf").write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                      f"subjectAltName=critical,URI:{LEDGER}\n")
    subprocess.run(["openssl", "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-set_serial", "42", "-days", "30", "-sha1", "-extfile", "ext.cnf", "-out", "leaf.pem"],
                   cwd=tmp_path, check=True, capture_output=True)
    leaf = x509.load_pem_x509_certificate((tmp_path / "leaf.pem").read_bytes())
    hash_algorithm = leaf.signature_hash_algorithm
    assert hash_algorithm is not None and hash_algorithm.name == "sha1"
    # openssl starts the leaf at the real clock's now, so check at that time.
    at = leaf.not_valid_before_utc + timedelta(seconds=1)
    _refused([leaf, INTER], "leaf certificate is signed with sha1, which is too weak", now=at)


# --- path validation by cryptography.x509.verification ---------------------------------------------


def _inter_with_key(key: object, name: str = "weak signing") -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(ROOT.subject)
            .public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(sign=True), critical=True)
            .sign(ROOT_KEY, hashes.SHA256()))


def test_the_library_refuses_what_no_spiffe_rule_names_a_weak_rsa_intermediate() -> None:
    # Every SPIFFE rule holds, but a 1024-bit RSA key signs the leaf: the walk alone
    # accepted this; the library's key-size rule refuses it, and its reason is given.
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = _inter_with_key(weak_key)
    _refused([_leaf(weak, weak_key), weak], "failed path validation: .*RSA key is too weak")
    strong_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    strong = _inter_with_key(strong_key, "strong signing")
    assert verify_x509_svid([_leaf(strong, strong_key), strong], ANCHORS, now=NOW) == LEDGER  # control


def test_path_building_passes_over_a_root_that_breaks_a_spiffe_rule() -> None:
    # Two roots with one name and one key (a rotation): the first may not sign certificates,
    # the second may. Whichever order the bundle lists them in, the good one is found.
    key = generate_private_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rotating root")])

    def root(usage: x509.KeyUsage) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(usage, critical=True)
                .sign(key, hashes.SHA256()))

    bad, good = root(_usage(sign=False)), root(_usage(sign=True))
    leaf = _leaf(good, key)
    assert verify_x509_svid([leaf], {TD: [bad, good]}, now=NOW) == LEDGER
    assert verify_x509_svid([leaf], {TD: [good, bad]}, now=NOW) == LEDGER
    _refused([leaf], "root certificate may not sign", anchors={TD: [bad]})



def test_a_leaf_listed_in_the_bundle_is_no_trust_anchor_for_itself() -> None:
    # The library ends a path at any certificate of its store; a leaf pinned in the bundle
    # must still be issued by a signing certificate.
    key = generate_private_key()
    pinned = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pinned")]))
              .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pinned")]))
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(NOW - timedelta(minutes=1)).not_valid_after(NOW + timedelta(hours=1))
              .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(LEDGER))]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(_usage(sign=False), critical=True)
              .sign(key, hashes.SHA256()))
    _refused([pinned], "root certificate is not a CA", anchors={TD: [pinned]})
    _refused([pinned], "root certificate is not a CA", anchors={TD: [ROOT, pinned]})
