"""The CA over the real store (SQLite, and etcd): load or create, refusals, issuance rules."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from trustmesh.bundle import Bundle
from trustmesh.controlplane.ca.authority import CAConfig, CertificateAuthority, needs_rotation
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.store import Store, open_store
from trustmesh.errors import CAError, KeyEncryptionError, SvidError, TrustmeshError, VerificationError
from trustmesh.jwtsvid import validate_jwt_svid
from trustmesh.keys import generate_private_key, key_id, private_key_to_pkcs8_der, spki_der
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_ca_certificate, build_csr, spiffe_id_from_certificate, verify_x509_svid

TD = TrustDomain("example.org")
LEDGER = SpiffeId.parse("spiffe://example.org/ledger")
KEK = KeyEncryptionKey(bytes(range(32)))
OTHER_KEK = KeyEncryptionKey(bytes(range(1, 33)))

Doc = dict[str, Any]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def _config(**kw: Any) -> CAConfig:
    return CAConfig(trust_domain=kw.pop("td", TD), replica_id=str(kw.pop("replica", "r1")), **kw)


async def _sqlite(tmp_path: Path, name: str) -> Store:
    (tmp_path / name).mkdir()
    return await open_store("sqlite", tmp_path / name)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


async def _edit_journal(store: Store, edit: Callable[[Doc], None]) -> bytes:
    """Rewrite the stored journal as someone with write access to the store could; returns the new bytes."""
    data, version = await store.load_ca_state()
    assert data is not None
    doc = json.loads(data)
    edit(doc)
    new = json.dumps(doc).encode()
    await store.save_ca_state(new, version)
    return new


async def _assert_refused_and_untouched(store: Store, config: CAConfig, kek: KeyEncryptionKey,
                                        error: type[Exception], match: str) -> None:
    before = await store.load_ca_state()
    with pytest.raises(error, match=match):
        await CertificateAuthority.load_or_create(config, store, kek)
    assert await store.load_ca_state() == before, "a refused start must not write anything"


def _evil_root() -> x509.Certificate:
    key = generate_private_key()
    now = datetime.now(timezone.utc)
    return build_ca_certificate(trust_domain=TD, public_key=key.public_key(), issuer=None, issuer_key=key,
                                not_before=now - timedelta(hours=1), not_after=now + timedelta(days=30),
                                path_length=1, common_name="trustmesh root CA example.org")


# --- load or create -----------------------------------------------------------------------------


async def test_reload_keeps_root_and_jwt_key_but_makes_a_new_signing_ca(store: Store) -> None:
    first = await CertificateAuthority.load_or_create(_config(), store, KEK)
    second = await CertificateAuthority.load_or_create(_config(replica="r2"), store, KEK)
    assert _der(first.root) == _der(second.root)
    assert list(first.jwt_authorities()) == list(second.jwt_authorities())
    assert len(first.jwt_authorities()) == 1
    assert spki_der(first.signing_ca.public_key()) != spki_der(second.signing_ca.public_key())  # type: ignore[arg-type]
    for ca in (first, second):
        ca.signing_ca.verify_directly_issued_by(first.root)
    data, _ = await store.load_ca_state()
    assert data is not None
    journal = json.loads(data)
    assert len(journal["roots"]) == 1 and len(journal["jwt_keys"]) == 1
    assert [s["replica_id"] for s in journal["signing_cas"]] == ["r1", "r2"]


async def test_a_signing_ca_key_never_leaves_its_process(store: Store) -> None:
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK)
    again = await CertificateAuthority.load_or_create(_config(), store, KEK)
    # The same replica id restarting does not get its old signing key back.
    assert spki_der(ca.signing_ca.public_key()) != spki_der(again.signing_ca.public_key())  # type: ignore[arg-type]


async def test_wrong_kek_is_refused_and_nothing_is_overwritten(store: Store) -> None:
    first = await CertificateAuthority.load_or_create(_config(), store, KEK)
    await _assert_refused_and_untouched(store, _config(), OTHER_KEK, KeyEncryptionError, "does not match")
    with pytest.raises(KeyEncryptionError) as info:
        await CertificateAuthority.load_or_create(_config(), store, OTHER_KEK)
    assert KEK.fingerprint in str(info.value) and OTHER_KEK.fingerprint in str(info.value)
    # The right KEK still opens the original CA afterwards.
    again = await CertificateAuthority.load_or_create(_config(), store, KEK)
    assert _der(again.root) == _der(first.root)


def _flip_sealed(slot: str) -> Callable[[Doc], None]:
    def flip(doc: Doc) -> None:
        blob = bytearray(base64.b64decode(doc[slot][0]["sealed_key"]))
        blob[len(blob) // 2] ^= 1
        doc[slot][0]["sealed_key"] = base64.b64encode(bytes(blob)).decode()
    return flip


@pytest.mark.parametrize("slot", ["roots", "jwt_keys"])
async def test_tampered_sealed_key_is_refused(store: Store, slot: str) -> None:
    await CertificateAuthority.load_or_create(_config(), store, KEK)
    await _edit_journal(store, _flip_sealed(slot))
    await _assert_refused_and_untouched(store, _config(), KEK, KeyEncryptionError, "failed authentication")


async def test_a_sealed_key_moved_to_another_slot_is_refused(store: Store) -> None:
    await CertificateAuthority.load_or_create(_config(), store, KEK)

    def swap(doc: Doc) -> None:
        doc["roots"][0]["sealed_key"], doc["jwt_keys"][0]["sealed_key"] = (
            doc["jwt_keys"][0]["sealed_key"], doc["roots"][0]["sealed_key"])

    await _edit_journal(store, swap)
    await _assert_refused_and_untouched(store, _config(), KEK, KeyEncryptionError, "failed authentication")


async def test_a_renamed_root_slot_is_refused(store: Store) -> None:
    # The slot id is in the AAD: the same sealed key under another id does not open.
    await CertificateAuthority.load_or_create(_config(), store, KEK)
    await _edit_journal(store, lambda doc: doc["roots"][0].update(id="0123456789abcdef"))
    await _assert_refused_and_untouched(store, _config(), KEK, KeyEncryptionError, "failed authentication")


async def test_a_substituted_root_certificate_is_refused(store: Store) -> None:
    # Store write access without the KEK must not put a root of one's own in the bundle.
    await CertificateAuthority.load_or_create(_config(), store, KEK)
    evil = base64.b64encode(_der(_evil_root())).decode()
    await _edit_journal(store, lambda doc: doc["roots"][0].update(cert=evil))
    await _assert_refused_and_untouched(store, _config(), KEK, CAError, "tampered")


async def test_an_extra_root_slot_with_a_copied_sealed_key_is_refused(store: Store) -> None:
    await CertificateAuthority.load_or_create(_config(), store, KEK)
    evil = base64.b64encode(_der(_evil_root())).decode()

    def add(doc: Doc) -> None:
        doc["roots"].append(dict(doc["roots"][0], status="old", cert=evil))

    await _edit_journal(store, add)
    await _assert_refused_and_untouched(store, _config(), KEK, CAError, "tampered")


async def test_a_substituted_jwt_public_key_is_refused(store: Store) -> None:
    await CertificateAuthority.load_or_create(_config(), store, KEK)
    evil = base64.b64encode(spki_der(generate_private_key().public_key())).decode()
    await _edit_journal(store, lambda doc: doc["jwt_keys"][0].update(public_key=evil))
    await _assert_refused_and_untouched(store, _config(), KEK, CAError, "tampered")


async def test_a_corrupt_journal_is_refused_not_replaced(store: Store) -> None:
    await CertificateAuthority.load_or_create(_config(), store, KEK)
    _, version = await store.load_ca_state()
    await store.save_ca_state(b"{not json", version)
    await _assert_refused_and_untouched(store, _config(), KEK, CAError, "corrupt")


async def test_a_journal_of_another_trust_domain_is_refused(store: Store) -> None:
    await CertificateAuthority.load_or_create(_config(), store, KEK)
    await _assert_refused_and_untouched(store, _config(td=TrustDomain("other.org")), KEK, CAError,
                                        "--trust-domain example.org")


async def test_racing_replicas_end_with_one_root(store: Store) -> None:
    cas = await asyncio.gather(*(CertificateAuthority.load_or_create(_config(replica=f"r{i}"), store, KEK)
                                 for i in range(4)))
    assert len({_der(ca.root) for ca in cas}) == 1
    assert len({tuple(ca.jwt_authorities()) for ca in cas}) == 1
    data, _ = await store.load_ca_state()
    assert data is not None
    journal = json.loads(data)
    assert len(journal["roots"]) == 1 and len(journal["jwt_keys"]) == 1
    # Every replica's signing CA was recorded although they saved at the same time.
    assert sorted(s["replica_id"] for s in journal["signing_cas"]) == ["r0", "r1", "r2", "r3"]
    for ca in cas:
        ca.signing_ca.verify_directly_issued_by(cas[0].root)


async def test_the_stored_journal_holds_no_private_key(store: Store) -> None:
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK)
    await ca.rotate_signing_ca()
    data, _ = await store.load_ca_state()
    assert data is not None and b"PRIVATE KEY" not in data
    keys = list(ca._root_keys.values()) + list(ca._jwt_keys.values())  # noqa: SLF001
    assert ca._signing is not None  # noqa: SLF001
    keys.append(ca._signing.key)  # noqa: SLF001
    assert len(keys) == 3
    for key in keys:
        der = private_key_to_pkcs8_der(key)
        assert der not in data and base64.b64encode(der) not in data
        scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
        assert scalar not in data and base64.b64encode(scalar)[:40] not in data


# --- issuance ---------------------------------------------------------------------------------------


async def test_leaf_takes_only_the_public_key_from_the_csr(store: Store) -> None:
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(backdate=timedelta(seconds=90)), store, KEK, clock=clock)
    key = generate_private_key()
    csr = build_csr(key, SpiffeId.parse("spiffe://example.org/admin"))  # asks for another ID
    svid = await ca.sign_x509_svid(csr, LEDGER, timedelta(minutes=10), dns_names=["ledger.internal"])
    assert svid.spiffe_id == LEDGER and spiffe_id_from_certificate(svid.leaf) == LEDGER
    san = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(LEDGER)]
    assert san.get_values_for_type(x509.DNSName) == ["ledger.internal"]
    assert spki_der(svid.leaf.public_key()) == spki_der(key.public_key())  # type: ignore[arg-type]
    assert svid.leaf.not_valid_before_utc == clock.now - timedelta(seconds=90)
    assert svid.leaf.not_valid_after_utc == clock.now + timedelta(minutes=10)
    assert svid.cert_chain[1] == ca.signing_ca
    assert verify_x509_svid(svid.cert_chain, {TD: ca.x509_authorities()}, now=clock.now) == LEDGER


async def test_a_leaf_does_not_verify_against_another_ca(tmp_path: Path) -> None:
    ours = await _sqlite(tmp_path, "a")
    theirs = await _sqlite(tmp_path, "b")
    clock = Clock()
    a = await CertificateAuthority.load_or_create(_config(), ours, KEK, clock=clock)
    b = await CertificateAuthority.load_or_create(_config(), theirs, KEK, clock=clock)
    svid = await b.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5))
    with pytest.raises(VerificationError):
        verify_x509_svid(svid.cert_chain, {TD: a.x509_authorities()}, now=clock.now)
    await ours.close()
    await theirs.close()


async def test_lifetimes_are_clamped_to_the_issuer(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(
        _config(ca_ttl=timedelta(hours=2), root_ttl=timedelta(hours=1)), store, KEK, clock=clock)
    assert ca.root.not_valid_after_utc == clock.now + timedelta(hours=1)
    assert ca.signing_ca.not_valid_after_utc == ca.root.not_valid_after_utc
    svid = await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(days=3))
    assert svid.leaf.not_valid_after_utc == ca.signing_ca.not_valid_after_utc
    await store.close()


async def test_leaf_ttl_longer_than_the_signing_ca_is_clamped(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(ca_ttl=timedelta(hours=1)), store, KEK, clock=clock)
    clock.now += timedelta(minutes=40)
    svid = await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(hours=1))
    assert svid.leaf.not_valid_after_utc == ca.signing_ca.not_valid_after_utc == clock.now + timedelta(minutes=20)
    await store.close()


async def test_an_expired_signing_ca_issues_nothing(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(ca_ttl=timedelta(hours=1)), store, KEK, clock=clock)
    clock.now += timedelta(hours=1)
    with pytest.raises(CAError, match="expired"):
        await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5))
    await ca.rotate_signing_ca()
    svid = await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5))
    assert verify_x509_svid(svid.cert_chain, {TD: ca.x509_authorities()}, now=clock.now) == LEDGER
    await store.close()


async def test_refusals(store: Store) -> None:
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK)
    csr = build_csr(generate_private_key())
    with pytest.raises(CAError, match="outside trust domain"):
        await ca.sign_x509_svid(csr, SpiffeId.parse("spiffe://partner.example/x"), timedelta(minutes=5))
    with pytest.raises(CAError, match="no path"):
        await ca.sign_x509_svid(csr, TD.id, timedelta(minutes=5))
    for ttl in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(CAError, match="positive"):
            await ca.sign_x509_svid(csr, LEDGER, ttl)
    for bad in (b"", b"garbage", csr[:-10]):
        with pytest.raises(SvidError):
            await ca.sign_x509_svid(bad, LEDGER, timedelta(minutes=5))
    rsa_csr = build_csr(rsa.generate_private_key(65537, 2048))  # type: ignore[arg-type]
    with pytest.raises(SvidError, match="not allowed"):
        await ca.sign_x509_svid(rsa_csr, LEDGER, timedelta(minutes=5))


async def test_a_bad_item_fails_alone_in_a_batch(store: Store) -> None:
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK)
    keys = [generate_private_key() for _ in range(3)]
    other = SpiffeId.parse("spiffe://example.org/b")
    results = await ca.sign_x509_svids([
        (build_csr(keys[0]), LEDGER, timedelta(minutes=5), ()),
        (b"bad", LEDGER, timedelta(minutes=5), ()),
        (build_csr(keys[1]), other, timedelta(minutes=5), ("b.internal",)),
        (build_csr(keys[2]), SpiffeId.parse("spiffe://partner.example/x"), timedelta(minutes=5), ()),
    ])
    assert [type(r).__name__ for r in results] == ["X509Svid", "SvidError", "X509Svid", "CAError"]
    ok0, _, ok2, _ = results
    assert not isinstance(ok0, TrustmeshError) and not isinstance(ok2, TrustmeshError)
    assert ok0.spiffe_id == LEDGER and ok2.spiffe_id == other
    assert spki_der(ok0.leaf.public_key()) == spki_der(keys[0].public_key())  # type: ignore[arg-type]
    assert spki_der(ok2.leaf.public_key()) == spki_der(keys[1].public_key())  # type: ignore[arg-type]


# --- JWT-SVIDs and the bundle --------------------------------------------------------------------


async def test_jwt_svids(store: Store) -> None:
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK, clock=clock)
    token, expires = ca.sign_jwt_svid(LEDGER, ["payments", "audit"], timedelta(minutes=5))
    assert expires == clock.now + timedelta(minutes=5)
    jwt = validate_jwt_svid(token, audience="audit", jwt_authorities={TD: ca.jwt_authorities()}, now=clock.now)
    assert jwt.spiffe_id == LEDGER and set(jwt.audience) == {"payments", "audit"}
    with pytest.raises(VerificationError):
        validate_jwt_svid(token, audience="ledger", jwt_authorities={TD: ca.jwt_authorities()}, now=clock.now)
    with pytest.raises(VerificationError):
        validate_jwt_svid(token, audience="audit", jwt_authorities={TD: ca.jwt_authorities()},
                          now=clock.now + timedelta(minutes=6))
    # A token of the same CA after a restart still validates: the JWT key lives in the journal.
    again = await CertificateAuthority.load_or_create(_config(replica="r2"), store, KEK, clock=clock)
    validate_jwt_svid(token, audience="audit", jwt_authorities={TD: again.jwt_authorities()}, now=clock.now)


async def test_jwt_refusals(tmp_path: Path) -> None:
    ours = await _sqlite(tmp_path, "a")
    theirs = await _sqlite(tmp_path, "b")
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(), ours, KEK, clock=clock)
    other = await CertificateAuthority.load_or_create(_config(), theirs, KEK, clock=clock)
    forged, _ = other.sign_jwt_svid(LEDGER, ["audit"], timedelta(minutes=5))
    with pytest.raises(VerificationError):
        validate_jwt_svid(forged, audience="audit", jwt_authorities={TD: ca.jwt_authorities()}, now=clock.now)
    with pytest.raises(CAError, match="outside trust domain"):
        ca.sign_jwt_svid(SpiffeId.parse("spiffe://partner.example/x"), ["audit"], timedelta(minutes=5))
    with pytest.raises(CAError, match="no path"):
        ca.sign_jwt_svid(TD.id, ["audit"], timedelta(minutes=5))
    with pytest.raises(SvidError):
        ca.sign_jwt_svid(LEDGER, ["audit"], timedelta(0))
    with pytest.raises(SvidError, match="audience"):
        ca.sign_jwt_svid(LEDGER, [], timedelta(minutes=5))
    await ours.close()
    await theirs.close()


async def test_the_bundle(store: Store, tmp_path: Path) -> None:
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK, clock=clock)
    bundle = ca.bundle()
    assert bundle.trust_domain == TD
    assert [_der(c) for c in bundle.x509_authorities] == [_der(ca.root)]
    assert _der(ca.signing_ca) not in {_der(c) for c in bundle.x509_authorities}, "only roots are anchors"
    assert set(bundle.jwt_keys()) == set(ca.jwt_authorities()) and len(bundle.jwt_keys()) == 1
    (kid, public), = bundle.jwt_keys().items()
    assert kid == key_id(public)  # type: ignore[arg-type]
    again = Bundle.from_jwks(bundle.to_jwks(), TD)
    assert [_der(c) for c in again.x509_authorities] == [_der(ca.root)]
    assert {k: spki_der(v) for k, v in again.jwt_keys().items()} == {  # type: ignore[arg-type]
        k: spki_der(v) for k, v in ca.jwt_authorities().items()}  # type: ignore[arg-type]
    assert again.to_jwks() == Bundle.from_jwks(again.to_jwks(), TD).to_jwks()


async def test_write_bundle_pem(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK)
    out = tmp_path / "out" / "deeper"
    path = out / "bundle.pem"
    old_umask = os.umask(0o077)  # a strict umask must not make the public bundle unreadable
    try:
        ca.write_bundle_pem(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [_der(c) for c in x509.load_pem_x509_certificates(path.read_bytes())] == [_der(ca.root)]
    assert b"PRIVATE" not in path.read_bytes()
    # Rewriting replaces the file in one step and leaves no temporary file behind.
    path.write_bytes(b"stale")
    inode_before = path.stat().st_ino
    ca.write_bundle_pem(path)
    assert path.stat().st_ino != inode_before, "written by rename, not in place"
    assert [_der(c) for c in x509.load_pem_x509_certificates(path.read_bytes())] == [_der(ca.root)]
    assert sorted(p.name for p in out.iterdir()) == ["bundle.pem"]
    await store.close()


async def test_write_bundle_pem_failure_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await open_store("sqlite", tmp_path)
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK)
    path = tmp_path / "bundle.pem"
    path.write_bytes(b"old bundle")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        ca.write_bundle_pem(path)
    monkeypatch.undo()
    assert path.read_bytes() == b"old bundle"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")) == []
    await store.close()


# --- rotation ----------------------------------------------------------------------------------------


def test_rotation_threshold_is_half_life() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    end = start + timedelta(hours=10)
    assert not needs_rotation(start, end, start - timedelta(hours=1))
    assert not needs_rotation(start, end, start)
    assert not needs_rotation(start, end, start + timedelta(hours=4, minutes=59, seconds=59))
    assert needs_rotation(start, end, start + timedelta(hours=5))
    assert needs_rotation(start, end, end + timedelta(days=1))
    assert not needs_rotation(start, end, start + timedelta(hours=7), fraction=0.8)
    assert needs_rotation(start, end, start + timedelta(hours=8), fraction=0.8)


async def test_signing_ca_rotation_with_an_injected_clock(store: Store) -> None:
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(ca_ttl=timedelta(hours=4)), store, KEK, clock=clock)
    # Half-life counts from issue (2 h), not from the NotBefore back-dated by 30 s.
    clock.now += timedelta(hours=1, minutes=59)
    assert not ca.needs_signing_ca_rotation()
    assert ca.needs_signing_ca_rotation(clock.now + timedelta(minutes=1))
    clock.now += timedelta(minutes=1)
    assert ca.needs_signing_ca_rotation()
    old = ca.signing_ca
    new = await ca.rotate_signing_ca()
    assert new == ca.signing_ca and _der(new) != _der(old)
    assert not ca.needs_signing_ca_rotation()
    assert ca.signing_ca.not_valid_after_utc == clock.now + timedelta(hours=4)
    # Leaves from before the rotation still verify: both signing CAs chain to the same root.
    # A lifetime shorter than the back-dating still rotates at its half, not at once.
    short = await CertificateAuthority.load_or_create(_config(ca_ttl=timedelta(seconds=20), replica="r9"),
                                                      store, KEK, clock=clock)
    assert not short.needs_signing_ca_rotation()
    assert short.needs_signing_ca_rotation(clock.now + timedelta(seconds=10))
    new.verify_directly_issued_by(ca.root)
    old.verify_directly_issued_by(ca.root)


async def test_an_absurd_lifetime_fails_alone_in_a_batch(tmp_path: Path) -> None:
    s = await open_store("sqlite", tmp_path)
    ca = await CertificateAuthority.load_or_create(CAConfig(trust_domain=TrustDomain("example.org"), replica_id="r"),
                                                   s, KeyEncryptionKey(bytes(range(32))))
    csr = build_csr(generate_private_key())
    sid = SpiffeId.parse("spiffe://example.org/ledger")
    results = await ca.sign_x509_svids([(csr, sid, timedelta.max, ()), (csr, sid, timedelta(minutes=5), ())])
    assert isinstance(results[0], CAError) and "longer than" in str(results[0])
    assert not isinstance(results[1], Exception)
    await s.close()


# --- configuration, names and an expired root ------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"key_kind": "rsa-2048"}, "key kind 'rsa-2048' is not supported"),
        ({"replica": ""}, "replica id is empty"),
        ({"ca_ttl": timedelta(0)}, "ca_ttl must be positive"),
        ({"root_ttl": timedelta(hours=-1)}, "root_ttl must be positive"),
        ({"backdate": timedelta(seconds=-1)}, "backdate must not be negative"),
    ],
)
def test_a_bad_config_is_one_clear_error(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(CAError, match=match):
        _config(**kw)


async def test_long_replica_ids_and_trust_domains_still_start(tmp_path: Path) -> None:
    # Host names of 60+ characters are common in Kubernetes; a CN holds at most 64.
    long_td = TrustDomain("a" * 60 + ".example.org")
    store = await _sqlite(tmp_path, "s")
    pod = "payments-control-plane-statefulset-with-a-very-long-name-0123456789"
    a = await CertificateAuthority.load_or_create(_config(td=long_td, replica=pod + "-1"), store, KEK)
    b = await CertificateAuthority.load_or_create(_config(td=long_td, replica=pod + "-2"), store, KEK)
    names = [ca.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
             for ca in (a.root, a.signing_ca, b.signing_ca)]
    assert all(len(str(n)) <= 64 for n in names)
    assert names[1] != names[2], "two replicas whose names share a long prefix keep distinct CAs"
    sid = SpiffeId.from_parts(long_td, "ledger")
    svid = await b.sign_x509_svid(build_csr(generate_private_key()), sid, timedelta(minutes=5))
    assert verify_x509_svid(svid.cert_chain, {long_td: a.x509_authorities()}) == sid
    await store.close()


async def test_an_expired_root_is_a_clear_error_not_a_broken_signing_ca(tmp_path: Path) -> None:
    store = await _sqlite(tmp_path, "s")
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(root_ttl=timedelta(hours=1)), store, KEK, clock=clock)
    clock.now += timedelta(hours=2)
    with pytest.raises(CAError, match="root CA .* expired at .*rotated"):
        await ca.rotate_signing_ca()
    before = await store.load_ca_state()
    with pytest.raises(CAError, match="expired"):
        await CertificateAuthority.load_or_create(_config(replica="r2"), store, KEK, clock=clock)
    assert await store.load_ca_state() == before
    await store.close()


async def test_hostile_batch_items_fail_alone(store: Store) -> None:
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK)
    good = build_csr(generate_private_key())
    ec_key_oid = bytes.fromhex("06072a8648ce3d0201")
    unknown_key = good.replace(ec_key_oid, bytes.fromhex("06072a8648ce3d0209"))
    long_dns = ".".join(["b" * 60] * 3)
    results = await ca.sign_x509_svids([
        (unknown_key, LEDGER, timedelta(minutes=5), ()),
        (good, LEDGER, timedelta(minutes=5), ("not a dns name",)),
        (good, LEDGER, timedelta(minutes=5), (long_dns,)),
        (b"\x30" * (20 * 1024), LEDGER, timedelta(minutes=5), ()),
    ])
    assert isinstance(results[0], SvidError) and "key type is not allowed" in str(results[0])
    assert isinstance(results[1], SvidError) and "invalid DNS name" in str(results[1])
    assert isinstance(results[3], SvidError) and "larger than" in str(results[3])
    ok = results[2]
    assert not isinstance(ok, TrustmeshError)
    assert ok.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [long_dns]
    assert verify_x509_svid(ok.cert_chain, {TD: ca.x509_authorities()}) == LEDGER


class _LosingRaceStore:
    """An in-memory CAStateStore where another replica creates the CA between our first
    read (empty) and our first write, so the create path must lose and adopt theirs."""

    def __init__(self, rival_journal: bytes) -> None:
        self.data: bytes | None = None
        self.version = 0
        self._rival = rival_journal
        self.conflicts = 0

    async def load_ca_state(self) -> tuple[bytes | None, int]:
        seen = (self.data, self.version)
        if self._rival:
            self.data, self.version, self._rival = self._rival, 1, b""
        return seen

    async def save_ca_state(self, data: bytes, expected_version: int) -> int:
        from trustmesh.errors import ConflictError

        if expected_version != self.version:
            self.conflicts += 1
            raise ConflictError(f"version is {self.version}, not {expected_version}")
        self.data, self.version = data, self.version + 1
        return self.version


async def test_losing_the_create_race_adopts_the_winners_ca(tmp_path: Path) -> None:
    winner_store = await _sqlite(tmp_path, "w")
    winner = await CertificateAuthority.load_or_create(_config(replica="winner"), winner_store, KEK)
    winner_bytes, _ = await winner_store.load_ca_state()
    assert winner_bytes is not None
    racing = _LosingRaceStore(winner_bytes)
    loser = await CertificateAuthority.load_or_create(_config(replica="loser"), racing, KEK)
    assert racing.conflicts == 1, "the loser tried to create, was refused, and did not retry creating"
    assert _der(loser.root) == _der(winner.root)
    assert list(loser.jwt_authorities()) == list(winner.jwt_authorities())
    assert racing.data is not None
    assert [s["replica_id"] for s in json.loads(racing.data)["signing_cas"]] == ["winner", "loser"]
    loser.signing_ca.verify_directly_issued_by(winner.root)
    await winner_store.close()


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b"\xff\xfe",
        b"[]",
        b'{"v": 1}',
        b'{"v": 1, "trust_domain": "example.org", "roots": {"id": 1}, "jwt_keys": []}',
        b'{"v": 2}',
    ],
)
def test_journal_parsing_only_ever_raises_ca_error(data: bytes) -> None:
    from trustmesh.controlplane.ca.journal import CAJournal

    with pytest.raises(CAError, match="corrupt|not supported"):
        CAJournal.from_bytes(data)
