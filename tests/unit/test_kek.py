"""The key-encryption key: loading, permissions, sealing, and every way opening must fail."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.errors import KeyEncryptionError

KEY = bytes(range(32))
OTHER = bytes(range(100, 132))
HEADER = 4 + 8 + 12  # magic, KEK fingerprint, nonce


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


# --- loading ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoded",
    [
        KEY,
        KEY.hex().encode(),
        KEY.hex().encode() + b"\n",
        KEY.hex().upper().encode() + b"\r\n",
        base64.b64encode(KEY),
        base64.b64encode(KEY) + b"\n",
    ],
    ids=["raw", "hex", "hex-newline", "HEX-crlf", "base64", "base64-newline"],
)
def test_file_forms(tmp_path: Path, encoded: bytes) -> None:
    kek = KeyEncryptionKey.from_file(_write(tmp_path / "k", encoded))
    assert kek.fingerprint == KeyEncryptionKey(KEY).fingerprint
    blob = KeyEncryptionKey(KEY).seal(b"p", b"a")
    assert kek.open(blob, b"a") == b"p", "the loaded key is the same key, not just the same fingerprint"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"short",
        KEY[:31],
        KEY + b"x" * 3,
        KEY[:31].hex().encode() + b"\n",  # 62 hex digits
        (KEY + b"!").hex().encode(),  # 66 hex digits
        b"zz" * 32,  # 64 characters that are not hex
        base64.b64encode(KEY[:16]) + b"\n",
        base64.b64encode(KEY + b"!") + b"\n",
    ],
)
def test_wrong_length_or_encoding(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(KeyEncryptionError, match="32-byte key") as info:
        KeyEncryptionKey.from_file(_write(tmp_path / "k", data))
    assert str(tmp_path / "k") in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyEncryptionError, match="does not exist"):
        KeyEncryptionKey.from_file(tmp_path / "nope")


def test_a_directory_is_not_a_key_file(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    with pytest.raises(KeyEncryptionError, match="cannot read"):
        KeyEncryptionKey.from_file(d)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o602, 0o660])
def test_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path / "k", KEY.hex().encode(), mode)
    with pytest.raises(KeyEncryptionError, match=f"chmod 600 {path}"):
        KeyEncryptionKey.from_file(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    assert (
        KeyEncryptionKey.from_file(_write(tmp_path / "k", KEY, mode)).fingerprint == KeyEncryptionKey(KEY).fingerprint
    )


def test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    want = KeyEncryptionKey(KEY).fingerprint
    monkeypatch.setenv("TRUSTMESH_KEK", KEY.hex())
    assert KeyEncryptionKey.from_env().fingerprint == want
    monkeypatch.setenv("TRUSTMESH_KEK", KEY.hex() + "\n")
    assert KeyEncryptionKey.from_env().fingerprint == want
    monkeypatch.setenv("TRUSTMESH_KEK", base64.b64encode(KEY).decode())
    assert KeyEncryptionKey.from_env().fingerprint == want
    monkeypatch.setenv("MY_KEK", KEY.hex())
    assert KeyEncryptionKey.from_env("MY_KEK").fingerprint == want


@pytest.mark.parametrize("value", ["abc", KEY[:31].hex(), "   "])
def test_env_with_a_bad_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TRUSTMESH_KEK", value)
    with pytest.raises(KeyEncryptionError, match="environment variable TRUSTMESH_KEK") as info:
        KeyEncryptionKey.from_env()
    if value.strip():
        assert value not in str(info.value), "the message must not echo (part of) a secret"


@pytest.mark.parametrize("value", [None, ""])
def test_env_missing(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("TRUSTMESH_KEK", raising=False)
    else:
        monkeypatch.setenv("TRUSTMESH_KEK", value)
    with pytest.raises(KeyEncryptionError, match="TRUSTMESH_KEK is not set"):
        KeyEncryptionKey.from_env()


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_constructor_needs_32_bytes(size: int) -> None:
    with pytest.raises(KeyEncryptionError, match="32 bytes"):
        KeyEncryptionKey(bytes(size))


# --- generate_into ----------------------------------------------------------------------------


def test_generate_into_is_private_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "kek.bin"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        kek = KeyEncryptionKey.generate_into(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KeyEncryptionKey.from_file(path).fingerprint == kek.fingerprint
    before = path.read_bytes()
    with pytest.raises(KeyEncryptionError, match="already exists"):
        KeyEncryptionKey.generate_into(path)
    assert path.read_bytes() == before
    assert KeyEncryptionKey.from_file(path).fingerprint == kek.fingerprint


def test_generate_into_makes_a_new_key_each_time(tmp_path: Path) -> None:
    a = KeyEncryptionKey.generate_into(tmp_path / "a")
    b = KeyEncryptionKey.generate_into(tmp_path / "b")
    assert a.fingerprint != b.fingerprint


def test_generate_into_refuses_an_existing_file_it_did_not_write(tmp_path: Path) -> None:
    path = _write(tmp_path / "kek", b"something else", 0o644)
    with pytest.raises(KeyEncryptionError, match="already exists"):
        KeyEncryptionKey.generate_into(path)
    assert path.read_bytes() == b"something else"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_generate_into_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeyEncryptionError, match="cannot create"):
        KeyEncryptionKey.generate_into(tmp_path / "no" / "kek")


def test_generate_into_leaves_no_half_written_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    path = tmp_path / "kek"
    with pytest.raises(OSError, match="No space"):
        KeyEncryptionKey.generate_into(path)
    assert not path.exists()
    monkeypatch.undo()
    assert KeyEncryptionKey.generate_into(path).fingerprint == KeyEncryptionKey.from_file(path).fingerprint


# --- sealing -----------------------------------------------------------------------------------


def test_seal_open_round_trip_and_aad_binding() -> None:
    kek = KeyEncryptionKey(KEY)
    blob = kek.seal(b"secret key bytes", b"slot-1")
    assert b"secret key bytes" not in blob
    assert kek.open(blob, b"slot-1") == b"secret key bytes"
    assert kek.open(kek.seal(b"", b"x"), b"x") == b""
    assert kek.seal(b"x", b"a") != kek.seal(b"x", b"a"), "nonces must be fresh"


@pytest.mark.parametrize("aad", [b"slot-2", b"", b"slot-1 ", b"SLOT-1"])
def test_wrong_aad_is_refused(aad: bytes) -> None:
    kek = KeyEncryptionKey(KEY)
    blob = kek.seal(b"secret", b"slot-1")
    with pytest.raises(KeyEncryptionError, match="failed authentication"):
        kek.open(blob, aad)


def test_wrong_kek_names_both_fingerprints() -> None:
    right, wrong = KeyEncryptionKey(KEY), KeyEncryptionKey(OTHER)
    blob = right.seal(b"k", b"a")
    with pytest.raises(KeyEncryptionError, match="does not match") as info:
        wrong.open(blob, b"a")
    assert right.fingerprint in str(info.value) and wrong.fingerprint in str(info.value)


def test_a_blob_relabelled_with_another_fingerprint_still_fails() -> None:
    # Someone rewrites the fingerprint in the header to the given KEK's: GCM still refuses.
    right, wrong = KeyEncryptionKey(KEY), KeyEncryptionKey(OTHER)
    blob = bytearray(right.seal(b"k", b"a"))
    blob[4:12] = bytes.fromhex(wrong.fingerprint)
    with pytest.raises(KeyEncryptionError, match="failed authentication"):
        wrong.open(bytes(blob), b"a")


@pytest.mark.parametrize(
    "where",
    [HEADER - 12, HEADER - 1, HEADER, HEADER + 5, -16, -1],
    ids=["nonce-first", "nonce-last", "ct-first", "ct-mid", "tag-first", "tag-last"],
)
def test_any_flipped_byte_is_detected(where: int) -> None:
    kek = KeyEncryptionKey(KEY)
    blob = bytearray(kek.seal(b"private key material", b"a"))
    blob[where] ^= 0x40
    with pytest.raises(KeyEncryptionError, match="failed authentication"):
        kek.open(bytes(blob), b"a")


def test_a_flipped_fingerprint_byte_is_a_kek_mismatch() -> None:
    kek = KeyEncryptionKey(KEY)
    blob = bytearray(kek.seal(b"k", b"a"))
    blob[4] ^= 1
    with pytest.raises(KeyEncryptionError, match="does not match"):
        kek.open(bytes(blob), b"a")


@given(plaintext=st.binary(max_size=200), aad=st.binary(max_size=40), data=st.data())
@settings(max_examples=60, deadline=None)
def test_round_trip_and_every_single_flip_fails(plaintext: bytes, aad: bytes, data: st.DataObject) -> None:
    kek = KeyEncryptionKey(KEY)
    blob = kek.seal(plaintext, aad)
    assert kek.open(blob, aad) == plaintext
    where = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    tampered = bytearray(blob)
    tampered[where] ^= 1 << bit
    with pytest.raises(KeyEncryptionError):
        kek.open(bytes(tampered), aad)


def test_truncated_blobs() -> None:
    kek = KeyEncryptionKey(KEY)
    blob = kek.seal(b"private key", b"a")
    with pytest.raises(KeyEncryptionError, match="malformed"):
        kek.open(blob[: HEADER + 15], b"a")  # not even room for the tag
    with pytest.raises(KeyEncryptionError, match="failed authentication"):
        kek.open(blob[:-1], b"a")
    with pytest.raises(KeyEncryptionError, match="failed authentication"):
        kek.open(blob + b"\x00", b"a")


@pytest.mark.parametrize("blob", [b"", b"TMK1", b"XXXX" + bytes(60), b"tmk1" + bytes(60), bytes(100)])
def test_malformed_blobs(blob: bytes) -> None:
    with pytest.raises(KeyEncryptionError, match="malformed"):
        KeyEncryptionKey(KEY).open(blob, b"a")


# --- the key never shows --------------------------------------------------------------------------


def test_the_key_never_shows() -> None:
    kek = KeyEncryptionKey(KEY)
    forms = [KEY.hex(), KEY.hex()[:16], base64.b64encode(KEY).decode(), base64.b64encode(KEY).decode()[:12]]
    for text in (repr(kek), str(kek), f"{kek!r}", kek.fingerprint):
        assert not any(f in text for f in forms)
        assert KEY not in text.encode("latin-1") and KEY[:8] not in text.encode("latin-1")
    assert kek.fingerprint in repr(kek)
    assert not hasattr(kek, "__dict__"), "no stray attribute may hold a copy"


def test_fingerprint_is_stable_and_distinguishes_keys() -> None:
    assert KeyEncryptionKey(KEY).fingerprint == KeyEncryptionKey(KEY).fingerprint
    assert KeyEncryptionKey(KEY).fingerprint != KeyEncryptionKey(OTHER).fingerprint
    assert len(KeyEncryptionKey(KEY).fingerprint) == 16


def test_derived_keys_are_stable_and_separate() -> None:
    kek = KeyEncryptionKey(KEY)
    audit = kek.derive("audit-chain")
    assert len(audit) == 32
    assert audit == KeyEncryptionKey(KEY).derive("audit-chain")
    assert audit != kek.derive("other") != kek.derive("")
    assert audit != KeyEncryptionKey(OTHER).derive("audit-chain")
    assert audit != KEY and audit.hex()[:16] != kek.fingerprint
