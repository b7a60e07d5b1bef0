"""Private keys: generation, PKCS#8 encoding and stable identifiers.

Leaf keys are made on the node that uses them and never leave it; the server only ever
sees public keys (in CSRs). Key kinds are named the way operators type them.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from trustmesh.errors import SvidError

PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey]
PublicKey = Union[ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, rsa.RSAPublicKey]

KEY_KINDS = ("ec-p256", "ec-p384", "ed25519")


def generate_private_key(kind: str = "ec-p256") -> PrivateKey:
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}; use one of {', '.join(KEY_KINDS)}")


def private_key_to_pkcs8_der(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key_pkcs8_der(data: bytes) -> PrivateKey:
    try:
        key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        # UnsupportedAlgorithm: a well-formed PKCS#8 whose algorithm OID is unknown.
        raise SvidError("private key is not a valid unencrypted PKCS#8 DER key") from err
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        raise SvidError(f"unsupported private key type {type(key).__name__}")
    return key


def spki_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_fingerprint(public_key: PublicKey) -> str:
    """sha256 (hex) of the SubjectPublicKeyInfo DER."""
    return hashlib.sha256(spki_der(public_key)).hexdigest()


def key_id(public_key: PublicKey) -> str:
    """A short stable id (JWT ``kid``): base64url of the first 20 bytes of the SPKI sha256."""
    digest = hashlib.sha256(spki_der(public_key)).digest()[:20]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
