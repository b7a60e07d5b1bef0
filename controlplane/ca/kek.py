"""The key-encryption key (KEK): CA private keys are only ever stored sealed under it.

A KEK is 32 random bytes from a file (raw, hex or base64) or an environment variable.
Sealing is AES-256-GCM with a fresh nonce and associated data that names the slot, so a
sealed key cannot be moved to another slot. A blob names the fingerprint of the KEK that
sealed it, so starting with the wrong KEK is a precise error and never a silent new CA.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustmesh.errors import KeyEncryptionError
from trustmesh.files import PrivateFileError, atomic_write, read_private_file

KEK_BYTES = 32
_MAGIC = b"TMK1"
_FP_BYTES = 8
_NONCE_BYTES = 12
_MAX_FILE_BYTES = 4096


def _decode(text: bytes, source: str) -> bytes:
    if len(text) == KEK_BYTES:
        return text
    stripped = text.strip()
    if len(stripped) == 2 * KEK_BYTES:
        try:
            return bytes.fromhex(stripped.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        decoded = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == KEK_BYTES:
        return decoded
    raise KeyEncryptionError(
        f"{source} does not hold a {KEK_BYTES}-byte key (raw, 64 hex digits or base64); "
        "create one with `head -c 32 /dev/urandom > kek.bin && chmod 600 kek.bin`"
    )


class KeyEncryptionKey:
    __slots__ = ("_key", "fingerprint")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEK_BYTES:
            raise KeyEncryptionError(f"a key-encryption key is {KEK_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)
        # An identifier derived one-way from the key, safe to store and log.
        self.fingerprint = hmac.new(self._key, b"trustmesh kek fingerprint", hashlib.sha256).hexdigest()[
            : 2 * _FP_BYTES
        ]

    def __repr__(self) -> str:
        return f"KeyEncryptionKey(fingerprint={self.fingerprint})"

    @classmethod
    def from_file(cls, path: Path | str) -> KeyEncryptionKey:
        path = Path(path)
        try:
            # A key file is tens of bytes; the bound keeps a wrong path (a log) from being read whole.
            data = read_private_file(path, "key-encryption key file", limit=_MAX_FILE_BYTES, group_may_read=False)
        except PrivateFileError as err:
            raise KeyEncryptionError(str(err)) from err
        return cls(_decode(data, f"key-encryption key file {path}"))

    @classmethod
    def from_env(cls, var: str = "TRUSTMESH_KEK") -> KeyEncryptionKey:
        value = os.environ.get(var)
        if not value:
            raise KeyEncryptionError(f"environment variable {var} is not set")
        return cls(_decode(value.encode(), f"environment variable {var}"))

    @classmethod
    def generate_into(cls, path: Path | str) -> KeyEncryptionKey:
        """Create a new random KEK file with mode 0600; never overwrites an existing file."""
        key = os.urandom(KEK_BYTES)
        try:
            atomic_write(path, key.hex().encode() + b"\n", 0o600, overwrite=False)
        except FileExistsError as err:
            raise KeyEncryptionError(f"key-encryption key file {path} already exists; not overwriting it") from err
        except (FileNotFoundError, NotADirectoryError, PermissionError) as err:
            raise KeyEncryptionError(f"cannot create key-encryption key file {path}: {err.strerror}") from err
        return cls(key)

    def derive(self, label: str) -> bytes:
        """An independent 32-byte key for another purpose (e.g. the audit chain)."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"trustmesh:" + label.encode()).derive(
            self._key
        )

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        ct = AESGCM(self._key).encrypt(nonce, plaintext, aad)
        return _MAGIC + bytes.fromhex(self.fingerprint) + nonce + ct

    def open(self, blob: bytes, aad: bytes) -> bytes:
        header = len(_MAGIC) + _FP_BYTES + _NONCE_BYTES
        if len(blob) < header + 16 or not blob.startswith(_MAGIC):
            raise KeyEncryptionError("sealed key blob is malformed (wrong format or truncated)")
        blob_fp = blob[len(_MAGIC) : len(_MAGIC) + _FP_BYTES].hex()
        if blob_fp != self.fingerprint:
            raise KeyEncryptionError(
                f"the key-encryption key does not match (blob sealed under KEK {blob_fp}, "
                f"given KEK {self.fingerprint}); start with the KEK the CA was created with"
            )
        nonce = blob[len(_MAGIC) + _FP_BYTES : header]
        try:
            return AESGCM(self._key).decrypt(nonce, blob[header:], aad)
        except InvalidTag as err:
            raise KeyEncryptionError(
                "CA key blob failed authentication: it was modified, corrupted or moved to another slot"
            ) from err
