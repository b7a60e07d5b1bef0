"""X.509-SVIDs: building and verifying them as the X509-SVID standard says, and CSR helpers.

Leaf rules: exactly one URI SAN (the SPIFFE ID, with a path); when the subject is empty
the SAN extension is critical; BasicConstraints CA=false; keyUsage critical with
digitalSignature and never keyCertSign/cRLSign; EKU serverAuth+clientAuth.
Signing (CA) certificates: CA=true with keyCertSign; a SPIFFE ID on one has no path.

Verification never trusts a mixed trust store: a chain is checked only against the roots
of the trust domain named in its leaf, so a partner's CA can never vouch for our IDs.

Path validation (chain building, signatures, validity, basic constraints and path length,
unknown critical extensions, DNS name constraints) runs on ``cryptography.x509.verification``
wherever its profile fits; the SPIFFE rules sit on top, before it (the leaf) and after it
(every signing certificate of the path it found). Two SPIFFE forms lie outside that profile
and keep the verifier's own walk (``_walk``): Ed25519 keys and signatures (its algorithm set
is the CA/Browser Forum's, with no EdDSA, and our CA issues to Ed25519 workload keys), and
URI name constraints (it refuses every URI constraint against a URI SAN, and the SPIFFE ID
is a URI SAN). The same walk explains a refusal of the library in SPIFFE terms.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification as libverify
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, PublicKeyAlgorithmOID

from trustmesh.clock import utc_now
from trustmesh.der import load_der_certificates
from trustmesh.dnsname import InvalidDnsNameError, normalize_dns_name
from trustmesh.errors import InvalidSpiffeIdError, SvidError, VerificationError
from trustmesh.keys import PrivateKey, PublicKey, spki_der
from trustmesh.spiffeid import SpiffeId, TrustDomain

MAX_CSR_BYTES = 16 * 1024
MAX_CHAIN_DEPTH = 8
ORGANIZATION = "trustmesh"
MAX_COMMON_NAME = 64  # ub-common-name in RFC 5280; longer DNS names stay in the SAN only

# Critical extensions this verifier acts on. RFC 5280 says a certificate with any other
# critical extension must be refused, since its issuer meant it to restrict something we
# would silently ignore.
_UNDERSTOOD_CRITICAL = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.NAME_CONSTRAINTS,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
})
# Hashes too weak to accept in a signature anywhere in a chain.
_WEAK_HASHES = ("md5", "sha1")

# Admin rights belong to a registration entry, not to a SPIFFE ID: the same ID may be
# registered, without --admin, on another node. So the SVID of an entry marked admin names
# that entry in this private, non-critical extension (its value: a DER UTF8String with the
# entry id), and the remote admin listener checks it against the registry at every call.
# Chosen over recording issued serials per entry: it needs no store writes at issuance
# (issuance stays one hop to the signing processes), is the same answer on every replica
# and after restarts, and the CA's signature makes it unforgeable. Only admin entries' SVIDs
# carry it, so ordinary SVIDs reveal nothing new to the peers they are shown to.
# The OID is under 2.25 (X.667: a UUID as an OID, no registration needed).
ADMIN_ENTRY_OID: Final = x509.ObjectIdentifier("2.25.81686435213080646658136956642639316499")
MAX_ADMIN_ENTRY_ID = 256


_E = TypeVar("_E", bound=x509.ExtensionType)


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _serial() -> int:
    # 128 random bits, top bit cleared so the DER integer stays positive and 16 bytes.
    return secrets.randbits(127) | 1


def build_leaf_certificate(
    *,
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
    dns_names: Sequence[str] = (),
    serial: int | None = None,
    admin_entry: str = "",
) -> x509.Certificate:
    """`admin_entry`: the id of the admin registration entry the SVID is issued from
    (ADMIN_ENTRY_OID); empty for every other SVID."""
    if spiffe_id.is_trust_domain_id:
        raise SvidError(f"a leaf X509-SVID needs a SPIFFE ID with a path, not {spiffe_id}")
    if isinstance(dns_names, str):
        raise SvidError("dns_names must be a sequence of names, not one string")
    try:
        dns_names = [normalize_dns_name(name) for name in dns_names]
    except InvalidDnsNameError as err:
        raise SvidError(str(err)) from err
    _check_window(not_before, not_after)
    # The first DNS name doubles as the CN (for old clients), when it fits a CN at all.
    if dns_names and len(dns_names[0]) <= MAX_COMMON_NAME:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    else:
        subject = x509.Name([])
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(str(spiffe_id))] + [x509.DNSName(d) for d in dns_names]
    )
    key_agreement = isinstance(public_key, ec.EllipticCurvePublicKey)
    key_encipherment = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(serial or _serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # The standard requires the SAN to be critical when the subject is empty.
        .add_extension(san, critical=len(subject) == 0)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=key_encipherment,
                data_encipherment=False, key_agreement=key_agreement, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    if admin_entry:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ADMIN_ENTRY_OID, _der_utf8(admin_entry)), critical=False)
    return builder.sign(issuer_key, _hash_for(issuer_key))


def _der_utf8(text: str) -> bytes:
    data = text.encode()
    if not 0 < len(data) <= MAX_ADMIN_ENTRY_ID:
        raise SvidError(f"an admin entry id must be 1 to {MAX_ADMIN_ENTRY_ID} bytes, got {len(data)}")
    length = bytes([len(data)]) if len(data) < 0x80 else bytes([0x81 if len(data) < 0x100 else 0x82]) + \
        len(data).to_bytes(1 if len(data) < 0x100 else 2, "big")
    return b"\x0c" + length + data


def admin_entry_of(cert: x509.Certificate) -> str:
    """The admin entry id a leaf was issued from (ADMIN_ENTRY_OID), or "" when it names none
    or the extension is malformed (which gives no admin rights, never an error)."""
    try:
        value = cert.extensions.get_extension_for_oid(ADMIN_ENTRY_OID).value
    except (x509.ExtensionNotFound, ValueError):
        return ""
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    if len(raw) < 2 or raw[0] != 0x0C:
        return ""
    first, header = raw[1], 2
    if first & 0x80:
        count = first & 0x7F
        if count not in (1, 2) or len(raw) < 2 + count:
            return ""
        first, header = int.from_bytes(raw[2:2 + count], "big"), 2 + count
    if len(raw) != header + first or not 0 < first <= MAX_ADMIN_ENTRY_ID:
        return ""
    try:
        return raw[header:].decode()
    except UnicodeDecodeError:
        return ""


def _check_window(not_before: datetime, not_after: datetime) -> None:
    if not_after <= not_before:
        raise SvidError(
            f"certificate would end ({not_after.isoformat()}) before it starts ({not_before.isoformat()})"
        )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


def build_ca_certificate(
    *,
    trust_domain: TrustDomain,
    public_key: PublicKey,
    issuer: x509.Certificate | None,
    issuer_key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None,
    common_name: str,
    serial: int | None = None,
) -> x509.Certificate:
    """A root (issuer None: self-signed) or intermediate signing certificate."""
    if not 1 <= len(common_name) <= MAX_COMMON_NAME:
        raise SvidError(f"a CA common name has 1 to {MAX_COMMON_NAME} characters, got {len(common_name)}")
    _check_window(not_before, not_after)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public_key)
        .serial_number(serial or _serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        # A signing certificate may carry the trust domain's ID, never one with a path.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]), critical=False
        )
        .add_extension(ski, critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(_aki(issuer), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    return builder.sign(issuer_key, _hash_for(issuer_key))


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    """The certificate's extensions; a malformed or duplicated one is a verification failure.

    cryptography parses extensions lazily, so a hostile certificate that loaded fine can
    still raise here; callers must never see that as anything but VerificationError.
    """
    try:
        return cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as err:
        raise VerificationError(f"certificate has malformed extensions: {err}") from err


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return _extensions(cert).get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _uri_sans(cert: x509.Certificate) -> list[str]:
    san = _extension(cert, x509.SubjectAlternativeName)
    return [] if san is None else list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _dns_sans(cert: x509.Certificate) -> list[str]:
    san = _extension(cert, x509.SubjectAlternativeName)
    return [] if san is None else list(san.get_values_for_type(x509.DNSName))


def spiffe_id_from_certificate(cert: x509.Certificate) -> SpiffeId:
    """The certificate's SPIFFE ID: exactly one URI SAN that is a SPIFFE ID."""
    uris = _uri_sans(cert)
    if len(uris) != 1:
        raise VerificationError(f"certificate has {len(uris)} URI SANs; an X509-SVID has exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeIdError as err:
        raise VerificationError(f"certificate URI SAN is not a SPIFFE ID: {err.reason}") from err


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise VerificationError(f"{what} is not valid until {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise VerificationError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def _check_critical_extensions(cert: x509.Certificate, what: str) -> None:
    for ext in _extensions(cert):
        if ext.critical and ext.oid not in _UNDERSTOOD_CRITICAL:
            raise VerificationError(
                f"{what} has a critical extension this verifier does not understand ({ext.oid.dotted_string})"
            )


def _check_signature_hash(cert: x509.Certificate, what: str) -> None:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as err:
        raise VerificationError(f"{what} is signed with an unsupported algorithm") from err
    if algorithm is not None and algorithm.name in _WEAK_HASHES:
        raise VerificationError(f"{what} is signed with {algorithm.name}, which is too weak to trust")


def _check_leaf(leaf: x509.Certificate) -> SpiffeId:
    _check_critical_extensions(leaf, "leaf certificate")
    bc = _extension(leaf, x509.BasicConstraints)
    if bc is None:
        raise VerificationError("leaf certificate has no basic constraints extension")
    if bc.ca:
        raise VerificationError("leaf certificate is a CA; an X509-SVID leaf must have CA=false")
    ku = _extension(leaf, x509.KeyUsage)
    if ku is None:
        raise VerificationError("leaf certificate has no key usage extension")
    if not ku.digital_signature:
        raise VerificationError("leaf certificate key usage lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise VerificationError("leaf certificate may not have keyCertSign or cRLSign key usage")
    spiffe_id = spiffe_id_from_certificate(leaf)
    if spiffe_id.is_trust_domain_id:
        raise VerificationError(f"leaf SPIFFE ID {spiffe_id} has no path")
    return spiffe_id


def _check_ca(cert: x509.Certificate, trust_domain: TrustDomain, depth: int, what: str) -> None:
    _check_critical_extensions(cert, what)
    bc = _extension(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        raise VerificationError(f"{what} is not a CA certificate")
    # The X509-SVID standard requires keyCertSign on every signing certificate.
    ku = _extension(cert, x509.KeyUsage)
    if ku is None or not ku.key_cert_sign:
        raise VerificationError(f"{what} may not sign certificates (no keyCertSign key usage)")
    # depth = number of CA certificates below this one in the chain.
    if bc.path_length is not None and depth > bc.path_length:
        raise VerificationError(f"{what} path length constraint {bc.path_length} exceeded")
    for uri in _uri_sans(cert):
        try:
            sid = SpiffeId.parse(uri)
        except InvalidSpiffeIdError as err:
            raise VerificationError(f"{what} has a URI SAN that is not a SPIFFE ID") from err
        if sid.trust_domain != trust_domain:
            raise VerificationError(f"{what} belongs to trust domain {sid.trust_domain}, not {trust_domain}")
        # X509-SVID 3.2: the SPIFFE ID of a signing certificate MUST NOT have a path.
        if not sid.is_trust_domain_id:
            raise VerificationError(f"{what} has SPIFFE ID {sid}; a signing certificate's ID has no path")


def _uri_host_matches(host: str, constraint: str) -> bool:
    # RFC 5280 4.2.1.10: ".example.com" is any host below it; otherwise the host exactly.
    constraint = constraint.lower()
    return host.endswith(constraint) if constraint.startswith(".") else host == constraint


def _dns_matches(name: str, constraint: str) -> bool:
    name, constraint = name.lower().rstrip("."), constraint.lower().rstrip(".")
    if not constraint:
        return True
    if constraint.startswith("."):
        return name.endswith(constraint)
    return name == constraint or name.endswith("." + constraint)


def _subtree_values(subtrees: Sequence[x509.GeneralName] | None, what: str) -> tuple[list[str], list[str]]:
    uris: list[str] = []
    dns: list[str] = []
    for name in subtrees or ():
        if isinstance(name, x509.UniformResourceIdentifier):
            uris.append(name.value)
        elif isinstance(name, x509.DNSName):
            dns.append(name.value)
        else:
            # Failing closed: a constraint we cannot evaluate must not be ignored.
            raise VerificationError(f"{what} has a {type(name).__name__} name constraint, which is not supported")
    return uris, dns


def _check_name_constraints(ca: x509.Certificate, spiffe_id: SpiffeId, dns_names: Sequence[str], what: str) -> None:
    nc = _extension(ca, x509.NameConstraints)
    if nc is None:
        return
    permitted_uris, permitted_dns = _subtree_values(nc.permitted_subtrees, what)
    excluded_uris, excluded_dns = _subtree_values(nc.excluded_subtrees, what)
    host = spiffe_id.trust_domain.name
    if any(_uri_host_matches(host, c) for c in excluded_uris) or (
        permitted_uris and not any(_uri_host_matches(host, c) for c in permitted_uris)
    ):
        raise VerificationError(f"{what} name constraints do not allow {spiffe_id}")
    for name in dns_names:
        if any(_dns_matches(name, c) for c in excluded_dns) or (
            permitted_dns and not any(_dns_matches(name, c) for c in permitted_dns)
        ):
            raise VerificationError(f"{what} name constraints do not allow DNS name {name}")


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when `issuer`'s subject names and its key signed `cert`."""
    try:
        # Names are parsed lazily: a malformed one raises here, and is no match.
        if cert.issuer != issuer.subject:
            return False
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        # UnsupportedAlgorithm: a key or signature type we cannot check is not a signature.
        return False
    return True


def verify_x509_svid(
    chain: Sequence[x509.Certificate],
    trust_anchors: Mapping[TrustDomain, Sequence[x509.Certificate]],
    *,
    now: datetime | None = None,
) -> SpiffeId:
    """Verify an X509-SVID chain (leaf first) and return its SPIFFE ID.

    The chain is checked only against the anchors of the leaf's own trust domain.
    """
    if now is None:
        now = utc_now()
    elif now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    if not chain:
        raise VerificationError("no certificate presented")
    if len(chain) > MAX_CHAIN_DEPTH:
        raise VerificationError(f"certificate chain longer than {MAX_CHAIN_DEPTH}")
    try:
        return _verify_chain(chain, trust_anchors, now)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as err:
        # cryptography parses names and fields lazily, so a hostile certificate that
        # loaded can still raise deep inside the checks; that is a refusal, not a crash.
        raise VerificationError(f"certificate chain could not be parsed: {err}") from err


def _verify_chain(
    chain: Sequence[x509.Certificate],
    trust_anchors: Mapping[TrustDomain, Sequence[x509.Certificate]],
    now: datetime,
) -> SpiffeId:
    leaf = chain[0]
    spiffe_id = _check_leaf(leaf)
    td = spiffe_id.trust_domain
    roots = trust_anchors.get(td)
    if not roots:
        raise VerificationError(f"no trust bundle for trust domain {td}")
    _check_validity(leaf, now, "leaf certificate")
    _check_signature_hash(leaf, "leaf certificate")
    leaf_dns = _dns_sans(leaf)
    anchors = _library_anchors(tuple(roots))
    if anchors is None:
        _walk(chain, roots, spiffe_id, leaf_dns, now)
        return spiffe_id
    try:
        path = _library_verifier(anchors, td, now).verify(leaf, list(chain[1:])).chain
    except libverify.VerificationError as err:
        if not _fits_library(chain):
            # Refused for a form SPIFFE allows and the library does not know: the walk decides.
            _walk(chain, roots, spiffe_id, leaf_dns, now)
            return spiffe_id
        # The walk names the broken rule in SPIFFE terms ("intermediate certificate
        # expired"); when it finds none, the library was stricter, and its reason stands.
        _walk(chain, roots, spiffe_id, leaf_dns, now)
        raise VerificationError(f"certificate chain failed path validation: {err}") from err
    # The library ends a path at any certificate of the store, the leaf included: a leaf
    # listed in the bundle would need no issuer at all. An X509-SVID is issued by a signing
    # certificate of its trust domain, always.
    if len(path) < 2:
        _walk(chain, roots, spiffe_id, leaf_dns, now)
        raise VerificationError("leaf certificate is itself a trust anchor; it must be issued by a signing certificate")
    # The library takes the intermediates as a pool, in any order; an X509-SVID chain is
    # presented leaf first, each certificate followed by its issuer (extra ones may trail).
    if list(path[:-1]) != list(chain[: len(path) - 1]):
        _walk(chain, roots, spiffe_id, leaf_dns, now)
        raise VerificationError("certificate chain is out of order: each certificate must be followed by its issuer")
    # What _ca_policy cannot say: validity to the microsecond (the library compares whole
    # seconds) and name constraints on the SPIFFE ID, which the library does not evaluate.
    last = len(path) - 1
    for index, cert in enumerate(path[1:], start=1):
        role = "root certificate" if index == last else "intermediate certificate"
        _check_validity(cert, now, role)
        _check_name_constraints(cert, spiffe_id, leaf_dns, role)
    return spiffe_id


def _check_signing_certificate(
    cert: x509.Certificate, spiffe_id: SpiffeId, leaf_dns: Sequence[str], depth: int, now: datetime, role: str
) -> None:
    _check_ca(cert, spiffe_id.trust_domain, depth, role)
    _check_validity(cert, now, role)
    if role != "root certificate":  # a root is trusted as it is, not for its signature
        _check_signature_hash(cert, role)
    _check_name_constraints(cert, spiffe_id, leaf_dns, role)


# --- path validation by cryptography.x509.verification ---------------------------------

# Key and signature algorithms outside the library's (CA/Browser Forum) set that SPIFFE
# allows; when the library refuses a chain that uses them, _walk decides. Ed25519 and Ed448
# use one OID each for the key and the signature. Asked only after a refusal, so the common
# chain pays nothing for it; the library refuses such a chain before any signature check.
_OUTSIDE_LIBRARY_ALGORITHMS: Final = frozenset({PublicKeyAlgorithmOID.ED25519, PublicKeyAlgorithmOID.ED448})

# A leaf is checked by _check_leaf before the library sees it, and has exactly one path;
# the library adds nothing to its extension rules but would refuse leaves without an
# authority key identifier, which the X509-SVID standard does not require.
_EE_POLICY: Final = libverify.ExtensionPolicy.permit_all()


def _fits_library(chain: Sequence[x509.Certificate]) -> bool:
    try:
        for cert in chain:
            if (cert.public_key_algorithm_oid in _OUTSIDE_LIBRARY_ALGORITHMS
                    or cert.signature_algorithm_oid in _OUTSIDE_LIBRARY_ALGORITHMS):
                return False
        return not any(_has_uri_name_constraints(cert) for cert in chain[1:])
    except (ValueError, VerificationError):
        return False  # malformed: the walk refuses it with a reason


def _has_uri_name_constraints(cert: x509.Certificate) -> bool:
    nc = _extension(cert, x509.NameConstraints)
    if nc is None:
        return False
    subtrees = (*(nc.permitted_subtrees or ()), *(nc.excluded_subtrees or ()))
    return any(isinstance(name, x509.UniformResourceIdentifier) for name in subtrees)


@functools.lru_cache(maxsize=64)
def _library_anchors(roots: tuple[x509.Certificate, ...]) -> libverify.Store | None:
    """The trust store of one bundle's roots; None when a root needs the walk.

    Cached: bundles change rarely, and handshakes ask for the same roots again and again.
    """
    try:
        if any(_has_uri_name_constraints(root) for root in roots):
            return None
    except VerificationError:
        return None
    return libverify.Store(list(roots))


def _library_verifier(anchors: libverify.Store, td: TrustDomain, now: datetime) -> libverify.ClientVerifier:
    # A client verifier: it asks for no DNS or IP subject, which an X509-SVID need not have.
    return (
        libverify.PolicyBuilder()
        .store(anchors)
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=_ca_policy(td), ee_policy=_EE_POLICY)
        .build_client_verifier()
    )


@functools.lru_cache(maxsize=256)
def _ca_policy(td: TrustDomain) -> libverify.ExtensionPolicy:
    """The X509-SVID rules for signing certificates, as the library's extension policy.

    Rules inside the policy steer its path building: a candidate root that breaks one is
    passed over for the next, as during a root rotation. Failures carry no role name
    ("intermediate" or "root"); the walk supplies it when it explains a refusal.
    """

    def key_usage(_policy: libverify.Policy, _cert: x509.Certificate, usage: x509.KeyUsage) -> None:
        if not usage.key_cert_sign:
            raise ValueError("a signing certificate needs the keyCertSign key usage")

    def san(_policy: libverify.Policy, _cert: x509.Certificate, names: x509.SubjectAlternativeName | None) -> None:
        for uri in [] if names is None else names.get_values_for_type(x509.UniformResourceIdentifier):
            sid = SpiffeId.parse(uri)  # InvalidSpiffeIdError is a ValueError: a refusal
            if sid.trust_domain != td or not sid.is_trust_domain_id:
                raise ValueError(f"signing certificate has SPIFFE ID {sid}, not {td.id}")

    return (
        libverify.ExtensionPolicy.permit_all()
        # Not required critical: the X509-SVID standard only requires cA=true, which the
        # library checks together with pathLenConstraint for every signing certificate.
        .require_present(x509.BasicConstraints, libverify.Criticality.AGNOSTIC, None)
        .require_present(x509.KeyUsage, libverify.Criticality.AGNOSTIC, key_usage)
        .may_be_present(x509.SubjectAlternativeName, libverify.Criticality.AGNOSTIC, san)
    )


# --- the verifier's own walk ------------------------------------------------------------


def _walk(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    spiffe_id: SpiffeId,
    leaf_dns: Sequence[str],
    now: datetime,
) -> None:
    """Follow the chain from the leaf to a root of its trust domain, checking each link."""
    td = spiffe_id.trust_domain
    current, depth = chain[0], 0
    intermediates = list(chain[1:])
    for _ in range(MAX_CHAIN_DEPTH):
        # Several roots may match (a root re-issued with the same key and name sits in the
        # bundle beside the old one during a rotation): any one that passes every check
        # is enough; only when none does is the first failure reported.
        refusal: VerificationError | None = None
        for root in roots:
            if issued_by(current, root):
                try:
                    _check_signing_certificate(root, spiffe_id, leaf_dns, depth, now, "root certificate")
                except VerificationError as err:
                    refusal = refusal or err
                    continue
                return
        if refusal is not None:
            raise refusal
        # Not yet at a root: the next certificate presented must have issued this one.
        if not intermediates:
            raise VerificationError(f"chain does not lead to a root of trust domain {td}")
        issuer = intermediates.pop(0)
        if not issued_by(current, issuer):
            raise VerificationError("certificate chain is broken: a certificate was not signed by the next one")
        _check_signing_certificate(issuer, spiffe_id, leaf_dns, depth, now, "intermediate certificate")
        current, depth = issuer, depth + 1
    raise VerificationError(f"certificate chain longer than {MAX_CHAIN_DEPTH}")


# --- CSRs -----------------------------------------------------------------------------


def build_csr(private_key: PrivateKey, spiffe_id: SpiffeId | None = None) -> bytes:
    """A DER CSR. The server ignores everything in it but the public key; the SAN is a hint."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=False
        )
    return builder.sign(private_key, _hash_for(private_key)).public_bytes(serialization.Encoding.DER)


def parse_csr(der: bytes) -> x509.CertificateSigningRequest:
    """Parse a CSR, check its self-signature and that its key is EC P-256/P-384 or Ed25519."""
    if not isinstance(der, (bytes, bytearray)) or not der:
        raise SvidError("CSR is empty")
    if len(der) > MAX_CSR_BYTES:
        raise SvidError(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_der_x509_csr(bytes(der))
    except (ValueError, TypeError, x509.InvalidVersion) as err:
        raise SvidError("CSR is not a valid DER PKCS#10 request") from err
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as err:
        raise SvidError("CSR key type is not allowed; use EC P-256, EC P-384 or Ed25519") from err
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
            raise SvidError(f"CSR key curve {key.curve.name} is not allowed; use EC P-256, EC P-384 or Ed25519")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise SvidError(f"CSR key type {type(key).__name__} is not allowed; use EC P-256, EC P-384 or Ed25519")
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SvidError("CSR signature cannot be checked") from err
    if not valid:
        raise SvidError("CSR signature is invalid: it was not signed by the key it carries")
    return csr


# --- the SVID value -------------------------------------------------------------------


@dataclass(frozen=True)
class X509Svid:
    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    # Kept out of repr so that logging an SVID can never print its key object.
    private_key: PrivateKey | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.cert_chain:
            raise SvidError("an X509-SVID needs at least its leaf certificate")
        # The value must be what it claims: an ID or key paired with the wrong leaf would
        # otherwise be served to workloads and fail only at the peer's handshake.
        try:
            leaf_id = spiffe_id_from_certificate(self.cert_chain[0])
        except VerificationError as err:
            raise SvidError(f"leaf certificate is not an X509-SVID: {err}") from err
        if leaf_id != self.spiffe_id:
            raise SvidError(f"SPIFFE ID {self.spiffe_id} does not match the leaf certificate's {leaf_id}")
        if self.private_key is not None:
            try:
                leaf_spki = spki_der(self.cert_chain[0].public_key())  # type: ignore[arg-type]
            except (ValueError, UnsupportedAlgorithm) as err:
                raise SvidError("leaf certificate public key cannot be read") from err
            if spki_der(self.private_key.public_key()) != leaf_spki:
                raise SvidError("private key does not belong to the leaf certificate")

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def expires_at(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def issued_at(self) -> datetime:
        return self.leaf.not_valid_before_utc

    def chain_der(self) -> bytes:
        """Concatenated DER, leaf first: the Workload API's `x509_svid` field."""
        return b"".join(self.chain_ders())

    def chain_ders(self) -> tuple[bytes, ...]:
        """Each certificate's DER, leaf first; encoded once per SVID (the CA fills it in when
        it has the bytes already), since re-encoding a parsed certificate is not free."""
        ders: tuple[bytes, ...] | None = self.__dict__.get("_ders")
        if ders is None:
            ders = tuple(c.public_bytes(serialization.Encoding.DER) for c in self.cert_chain)
            object.__setattr__(self, "_ders", ders)
        return ders

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.cert_chain)

    @classmethod
    def from_der_chain(cls, data: bytes, private_key: PrivateKey | None = None) -> X509Svid:
        try:
            certs = load_der_certificates(data)
        except (ValueError, x509.InvalidVersion) as err:
            raise SvidError(f"certificate chain is not valid concatenated DER: {err}") from err
        if not certs:
            raise SvidError("certificate chain is empty")
        try:
            spiffe_id = spiffe_id_from_certificate(certs[0])
        except VerificationError as err:
            raise SvidError(str(err)) from err
        return cls(spiffe_id, tuple(certs), private_key)

    def to_pem(self) -> bytes:
        """The chain as PEM, leaf first. Never includes the private key; write that apart."""
        return self.chain_pem()
