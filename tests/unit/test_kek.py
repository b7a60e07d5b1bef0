"""The key-encryption key: loading, permissions, sealing, and every way opening must fail."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from controlplane.ca.kek import KeyEncryptionKey
from trustmesh.errors import KeyEncryptionError

KEY = bytes(range(32))


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("encoded", [KEY, KEY.hex().encode() + b"\n", base64.b64encode(KEY) + b"\n"])
def test_file_forms(tmp_path: Path, encoded: bytes) -> None:
    kek = KeyEncryptionKey.from_file(_write(tmp_path / "k", encoded))
    assert kek.fingerprint == KeyEncryptionKey(KEY).fingerprint


@pytest.mark.parametrize("data", [b"", b"short", KEY + b"x" * 3, b"zz" * 32])
def test_wrong_length_or_encoding(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(KeyEncryptionError, match="32-byte key"):
        KeyEncryptionKey.from_file(_write(tmp_path / "k", data))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyEncryptionError, match="does not exist"):
        KeyEncryptionKey.from_file(tmp_path / "nope")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path / "k", KEY, mode)
    with pytest.raises(KeyEncryptionError, match=f"chmod 600 {path}"):
        KeyEncryptionKey.from_file(path)


def test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTMESH_KEK", KEY.hex())
    assert KeyEncryptionKey.from_env().fingerprint == KeyEncryptionKey(KEY).fingerprint
    monkeypatch.setenv("TRUSTMESH_KEK", base64.b64encode(KEY).decode())
    assert KeyEncryptionKey.from_env().fingerprint == KeyEncryptionKey(KEY).fingerprint
    monkeypatch.setenv("TRUSTMESH_KEK", "abc")
    with pytest.raises(KeyEncryptionError, match="environment variable TRUSTMESH_KEK"):
        KeyEncryptionKey.from_env()
    monkeypatch.delenv("TRUSTMESH_KEK")
    with pytest.raises(KeyEncryptionError, match="not set"):
        KeyEncryptionKey.from_env()


def test_generate_into_is_private_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "kek.bin"
    kek = KeyEncryptionKey.generate_into(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KeyEncryptionKey.from_file(path).fingerprint == kek.fingerprint
    before = path.read_bytes()
    with pytest.raises(KeyEncryptionError, match="already exists"):
        KeyEncryptionKey.generate_into(path)
    assert path.read_bytes() == before


def test_seal_open_round_trip_and_aad_binding() -> None:
    kek = KeyEncryptionKey(KEY)
    blob = kek.seal(b"secret key bytes", b"slot-1")
    assert b"secret key bytes" not in blob
    assert kek.open(blob, b"slot-1") == b"secret key bytes"
    assert kek.seal(b"x", b"a") != kek.seal(b"x", b"a"), "nonces must be fresh"
    with pytest.raises(KeyEncryptionError, match="failed authentication"):
        kek.open(blob, b"slot-2")


def test_wrong_kek_names_both_fingerprints() -> None:
    right, wrong = KeyEncryptionKey(KEY), KeyEncryptionKey(bytes(32))
    blob = right.seal(b"k", b"a")
    with pytest.raises(KeyEncryptionError) as info:
        wrong.open(blob, b"a")
    assert right.fingerprint in str(info.value) and wrong.fingerprint in str(info.value)


@pytest.mark.parametrize("where", [4 + 8, 4 + 8 + 12, -1])  # nonce, ciphertext, tag
def test_any_flipped_byte_is_detected(where: int) -> None:
    kek = KeyEncryptionKey(KEY)
    blob = bytearray(kek.seal(b"private key", b"a"))
    blob[where] ^= 0x40
    with pytest.raises(KeyEncryptionError, match="failed authentication"):
        kek.open(bytes(blob), b"a")


@pytest.mark.parametrize("blob", [b"", b"TMK1", b"XXXX" + bytes(60)])
def test_malformed_blobs(blob: bytes) -> None:
    with pytest.raises(KeyEncryptionError, match="malformed"):
        KeyEncryptionKey(KEY).open(blob, b"a")


def test_the_key_never_shows() -> None:
    kek = KeyEncryptionKey(KEY)
    for text in (repr(kek), str(kek), kek.fingerprint):
        assert KEY.hex() not in text and KEY.hex()[:16] not in text


def test_derived_keys_are_stable_and_separate() -> None:
    kek = KeyEncryptionKey(KEY)
    assert kek.derive("audit-chain") == KeyEncryptionKey(KEY).derive("audit-chain")
    assert kek.derive("audit-chain") != kek.derive("other")
    assert kek.derive("audit-chain") != KEY
