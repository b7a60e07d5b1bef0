"""X.509-SVIDs: building and verifying them as the X509-SVID standard says, and CSR helpers.

Leaf rules: exactly one URI SAN (the SPIFFE ID, with a path); when the subject is empty
the SAN extension is critical; BasicConstraints CA=false; keyUsage critical with
digitalSignature and never keyCertSign/cRLSign; EKU serverAuth+clientAuth.
Signing (CA) certificates: CA=true with keyCertSign; a SPIFFE ID on one has no path.

Verification never trusts a mixed trust store: a chain is checked only against the roots
of the trust domain named in its leaf, so a partner's CA can never vouch for our IDs.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.der import load_der_certificates
from trustmesh.errors import InvalidSpiffeIdError, SvidError, VerificationError
from trustmesh.keys import PrivateKey, PublicKey
from trustmesh.spiffeid import SpiffeId, TrustDomain

MAX_CSR_BYTES = 16 * 1024
MAX_CHAIN_DEPTH = 8
ORGANIZATION = "trustmesh"


def _now() -> datetime:
    return datetime.now(timezone.utc)


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
) -> x509.Certificate:
    if spiffe_id.is_trust_domain_id:
        raise SvidError(f"a leaf X509-SVID needs a SPIFFE ID with a path, not {spiffe_id}")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]) if dns_names else x509.Name([])
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
        .add_extension(san, critical=not dns_names)
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
    return builder.sign(issuer_key, _hash_for(issuer_key))


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
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]), critical=False)
        .add_extension(ski, critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(_aki(issuer), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    return builder.sign(issuer_key, _hash_for(issuer_key))


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_from_certificate(cert: x509.Certificate) -> SpiffeId:
    """The certificate's SPIFFE ID: exactly one URI SAN that is a SPIFFE ID."""
    uris = _uri_sans(cert)
    if len(uris) != 1:
        raise VerificationError(f"certificate has {len(uris)} URI SANs; an X509-SVID has exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeIdError as err:
        raise VerificationError(f"certificate URI SAN is not a SPIFFE ID: {err.reason}") from err


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise VerificationError(f"{what} is not valid until {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise VerificationError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def _check_leaf(leaf: x509.Certificate) -> SpiffeId:
    bc = _basic_constraints(leaf)
    if bc is None:
        raise VerificationError("leaf certificate has no basic constraints extension")
    if bc.ca:
        raise VerificationError("leaf certificate is a CA; an X509-SVID leaf must have CA=false")
    ku = _key_usage(leaf)
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
    bc = _basic_constraints(cert)
    if bc is None or not bc.ca:
        raise VerificationError(f"{what} is not a CA certificate")
    ku = _key_usage(cert)
    if ku is not None and not ku.key_cert_sign:
        raise VerificationError(f"{what} may not sign certificates (no keyCertSign)")
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


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when `issuer`'s subject names and its key signed `cert`."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def verify_x509_svid(
    chain: Sequence[x509.Certificate],
    trust_anchors: Mapping[TrustDomain, Sequence[x509.Certificate]],
    *,
    now: datetime | None = None,
) -> SpiffeId:
    """Verify an X509-SVID chain (leaf first) and return its SPIFFE ID."""
    if not chain:
        raise VerificationError("no certificate presented")
    if len(chain) > MAX_CHAIN_DEPTH:
        raise VerificationError(f"certificate chain longer than {MAX_CHAIN_DEPTH}")
    now = now or _now()
    leaf = chain[0]
    spiffe_id = _check_leaf(leaf)
    td = spiffe_id.trust_domain
    roots = trust_anchors.get(td)
    if not roots:
        raise VerificationError(f"no trust bundle for trust domain {td}")
    _check_validity(leaf, now, "leaf certificate")

    current, depth = leaf, 0
    intermediates = list(chain[1:])
    for _ in range(MAX_CHAIN_DEPTH):
        for root in roots:
            if issued_by(current, root):
                _check_ca(root, td, depth, "root certificate")
                _check_validity(root, now, "root certificate")
                return spiffe_id
        # Not yet at a root: the next certificate presented must have issued this one.
        if not intermediates:
            raise VerificationError(f"chain does not lead to a root of trust domain {td}")
        issuer = intermediates.pop(0)
        if not issued_by(current, issuer):
            raise VerificationError("certificate chain is broken: a certificate was not signed by the next one")
        _check_ca(issuer, td, depth, "intermediate certificate")
        _check_validity(issuer, now, "intermediate certificate")
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
        key = csr.public_key()
    except (ValueError, TypeError) as err:
        raise SvidError("CSR is not a valid DER PKCS#10 request") from err
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
            raise SvidError(f"CSR key curve {key.curve.name} is not allowed; use EC P-256, EC P-384 or Ed25519")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise SvidError(f"CSR key type {type(key).__name__} is not allowed; use EC P-256, EC P-384 or Ed25519")
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError) as err:
        raise SvidError("CSR signature cannot be checked") from err
    if not valid:
        raise SvidError("CSR signature is invalid: it was not signed by the key it carries")
    return csr


# --- the SVID value -------------------------------------------------------------------


@dataclass(frozen=True)
class X509Svid:
    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey | None = None

    def __post_init__(self) -> None:
        if not self.cert_chain:
            raise SvidError("an X509-SVID needs at least its leaf certificate")

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
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.cert_chain)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.cert_chain)

    @classmethod
    def from_der_chain(cls, data: bytes, private_key: PrivateKey | None = None) -> X509Svid:
        try:
            certs = load_der_certificates(data)
        except ValueError as err:
            raise SvidError(f"certificate chain is not valid concatenated DER: {err}") from err
        if not certs:
            raise SvidError("certificate chain is empty")
        try:
            spiffe_id = spiffe_id_from_certificate(certs[0])
        except VerificationError as err:
            raise SvidError(str(err)) from err
        return cls(spiffe_id, tuple(certs), private_key)
