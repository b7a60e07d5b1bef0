"""An upstream authority: the bank's CA signs the mesh's root, so the trust bundle is its root.

The operator gives the issuing CA's certificate chain (issuing CA first, up to and including
the self-signed root) and its key (a PEM file, or an object in the HSM token). Each new mesh
root is then an intermediate signed by that CA, and its journal slot keeps the chain above
it. The chain in the store is never trusted for being there: a slot's chain must end at a
root of the chain given at start (the operator's file), or the CA refuses to load, so a
store writer cannot put a root of their own in every workload's bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from trustmesh.controlplane.ca.pkcs11 import Pkcs11Token
from trustmesh.der import load_der_certificates
from trustmesh.errors import CAError
from trustmesh.files import PrivateFileError, read_private_file
from trustmesh.keys import PrivateKey, PublicKey, spki_der
from trustmesh.spiffeid import TrustDomain
from trustmesh.x509svid import build_ca_certificate, issued_by

# Below the issuing CA: the mesh root and each replica's signing CA.
_CA_LEVELS_BELOW = 2


@dataclass(frozen=True)
class UpstreamAuthority:
    chain: tuple[x509.Certificate, ...]  # the issuing CA first, its root last
    key: PrivateKey

    @property
    def issuing(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1]

    @property
    def chain_der(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain)

    @classmethod
    def load(cls, cert_path: Path, key_spec: str, token: Pkcs11Token | None, now: datetime) -> UpstreamAuthority:
        try:
            chain = tuple(x509.load_pem_x509_certificates(cert_path.read_bytes()))
        except OSError as err:
            raise CAError(f"cannot read --upstream-ca-cert {cert_path}: {err.strerror}") from err
        except ValueError as err:
            raise CAError(f"--upstream-ca-cert {cert_path} is not a PEM certificate chain: {err}") from err
        check_chain(chain, f"--upstream-ca-cert {cert_path}")
        issuing = chain[0]
        bc = issuing.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.path_length is not None and bc.path_length < _CA_LEVELS_BELOW:
            raise CAError(f"the upstream CA {issuing.subject.rfc4514_string()} allows {bc.path_length} CA "
                          f"level(s) below it (pathLenConstraint); the mesh needs {_CA_LEVELS_BELOW} (its root "
                          "and a signing CA per replica): use an issuing CA with a larger or no path length")
        if issuing.not_valid_after_utc <= now:
            raise CAError(f"the upstream CA {issuing.subject.rfc4514_string()} expired at "
                          f"{issuing.not_valid_after_utc.isoformat()}")
        key = _load_key(key_spec, token)
        if spki_der(key.public_key()) != spki_der(issuing.public_key()):  # type: ignore[arg-type]
            raise CAError(f"--upstream-ca-key {key_spec} is not the key of the first certificate in "
                          f"--upstream-ca-cert {cert_path}")
        return cls(chain, key)

    def sign_root(self, *, trust_domain: TrustDomain, public_key: PublicKey, not_before: datetime,
                  not_after: datetime, common_name: str) -> x509.Certificate:
        """The mesh's root, as an intermediate under the issuing CA (and never outliving it)."""
        return build_ca_certificate(
            trust_domain=trust_domain, public_key=public_key, issuer=self.issuing, issuer_key=self.key,
            not_before=not_before, not_after=min(not_after, self.issuing.not_valid_after_utc), path_length=1,
            common_name=common_name)

    def vouches_for(self, cert: x509.Certificate, stored_chain: bytes) -> tuple[x509.Certificate, ...] | None:
        """The chain above a stored mesh root, when it is sound and ends at our root; else None."""
        try:
            chain = tuple(load_der_certificates(stored_chain))
            check_chain(chain, "stored upstream chain")
        except (ValueError, CAError):
            return None
        if not issued_by(cert, chain[0]):
            return None
        ours = self.root.public_bytes(serialization.Encoding.DER)
        return chain if chain[-1].public_bytes(serialization.Encoding.DER) == ours else None


def check_chain(chain: Sequence[x509.Certificate], what: str) -> None:
    """Each certificate issued by the next, all CAs, the last self-signed."""
    if not chain:
        raise CAError(f"{what} holds no certificate")
    for index, cert in enumerate(chain):
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            ca = bc.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise CAError(f"{what}: certificate {index + 1} ({cert.subject.rfc4514_string()}) is not a CA")
        issuer = chain[index + 1] if index + 1 < len(chain) else cert
        if not issued_by(cert, issuer):
            where = "is not self-signed; end the chain with the bank's root" if issuer is cert else \
                "is not signed by the certificate after it; list the chain from the issuing CA up to the root"
            raise CAError(f"{what}: certificate {index + 1} ({cert.subject.rfc4514_string()}) {where}")


def _load_key(spec: str, token: Pkcs11Token | None) -> PrivateKey:
    if spec.startswith("pkcs11:"):
        if token is None:
            raise CAError("--upstream-ca-key names a PKCS#11 object; give --pkcs11-module, --pkcs11-token-label "
                          "and --pkcs11-pin-file")
        return token.find_by_uri(spec)
    path = Path(spec)
    try:
        data = read_private_file(path, "--upstream-ca-key", limit=1 << 16, group_may_read=False)
        key = serialization.load_pem_private_key(data, password=None)
    except PrivateFileError as err:
        raise CAError(str(err)) from err
    except (ValueError, TypeError) as err:
        raise CAError(f"--upstream-ca-key {path} is not an unencrypted PEM private key") from err
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise CAError(f"--upstream-ca-key {path}: {type(key).__name__} keys are not supported")
    return key


__all__ = ["UpstreamAuthority", "check_chain"]
