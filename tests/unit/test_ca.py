"""The CA over the real store (SQLite, and etcd): load or create, refusals, issuance rules."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from controlplane.ca.authority import CAConfig, CertificateAuthority, needs_rotation
from controlplane.ca.kek import KeyEncryptionKey
from controlplane.store import Store, open_store
from trustmesh.bundle import Bundle
from trustmesh.errors import CAError, KeyEncryptionError, SvidError
from trustmesh.jwtsvid import validate_jwt_svid
from trustmesh.keys import generate_private_key, private_key_to_pkcs8_der
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_csr, spiffe_id_from_certificate, verify_x509_svid

TD = TrustDomain("example.org")
LEDGER = SpiffeId.parse("spiffe://example.org/ledger")
KEK = KeyEncryptionKey(bytes(range(32)))


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def _config(**kw: object) -> CAConfig:
    return CAConfig(trust_domain=kw.pop("td", TD), replica_id=str(kw.pop("replica", "r1")), **kw)  # type: ignore[arg-type]




async def test_reload_keeps_root_and_jwt_key_but_makes_a_new_signing_ca(store: Store) -> None:
    first = await CertificateAuthority.load_or_create(_config(), store, KEK)
    second = await CertificateAuthority.load_or_create(_config(replica="r2"), store, KEK)
    assert first.root == second.root
    assert first.jwt_authorities().keys() == second.jwt_authorities().keys()
    assert first.signing_ca.public_key() != second.signing_ca.public_key()
    assert first.signing_ca.issuer == second.signing_ca.issuer == first.root.subject


async def test_wrong_kek_is_refused_and_nothing_is_overwritten(store: Store) -> None:
    await CertificateAuthority.load_or_create(_config(), store, KEK)
    before = await store.load_ca_state()
    with pytest.raises(KeyEncryptionError, match="does not match"):
        await CertificateAuthority.load_or_create(_config(), store, KeyEncryptionKey(bytes(32)))
    assert await store.load_ca_state() == before


async def _edit_journal(store: Store, edit: object) -> None:
    data, version = await store.load_ca_state()
    assert data is not None
    doc = json.loads(data)
    edit(doc)  # type: ignore[operator]
    await store.save_ca_state(json.dumps(doc).encode(), version)


async def test_tampered_root_key_is_refused(store: Store) -> None:
    await CertificateAuthority.load_or_create(_config(), store, KEK)

    def flip(doc: dict) -> None:  # type: ignore[type-arg]
        blob = bytearray(base64.b64decode(doc["roots"][0]["sealed_key"]))
        blob[-5] ^= 1
        doc["roots"][0]["sealed_key"] = base64.b64encode(bytes(blob)).decode()

    await _edit_journal(store, flip)
    with pytest.raises(KeyEncryptionError, match="failed authentication"):
        await CertificateAuthority.load_or_create(_config(), store, KEK)


async def test_a_sealed_key_moved_to_another_slot_is_refused(store: Store) -> None:
    await CertificateAuthority.load_or_create(_config(), store, KEK)

    def swap(doc: dict) -> None:  # type: ignore[type-arg]
        doc["roots"][0]["sealed_key"], doc["jwt_keys"][0]["sealed_key"] = (
            doc["jwt_keys"][0]["sealed_key"], doc["roots"][0]["sealed_key"])

    await _edit_journal(store, swap)
    with pytest.raises(KeyEncryptionError):
        await CertificateAuthority.load_or_create(_config(), store, KEK)


async def test_a_journal_of_another_trust_domain_is_refused(store: Store) -> None:
    await CertificateAuthority.load_or_create(_config(), store, KEK)
    with pytest.raises(CAError, match="--trust-domain example.org"):
        await CertificateAuthority.load_or_create(_config(td=TrustDomain("other.org")), store, KEK)


async def test_racing_replicas_end_with_one_root(store: Store) -> None:
    cas = await asyncio.gather(*(CertificateAuthority.load_or_create(_config(replica=f"r{i}"), store, KEK)
                                 for i in range(4)))
    assert len({ca.root.fingerprint(ca.root.signature_hash_algorithm) for ca in cas}) == 1  # type: ignore[arg-type]


async def test_the_stored_journal_holds_no_private_key(store: Store) -> None:
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK)
    data, _ = await store.load_ca_state()
    assert data is not None and b"PRIVATE KEY" not in data
    for key in list(ca._root_keys.values()) + list(ca._jwt_keys.values()):  # noqa: SLF001
        der = private_key_to_pkcs8_der(key)
        assert der not in data and base64.b64encode(der) not in data


async def test_leaf_takes_only_the_public_key_from_the_csr(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK, clock=clock)
    key = generate_private_key()
    csr = build_csr(key, SpiffeId.parse("spiffe://example.org/admin"))  # asks for another ID
    svid = await ca.sign_x509_svid(csr, LEDGER, timedelta(minutes=10), dns_names=["ledger.internal"])
    assert svid.spiffe_id == LEDGER and spiffe_id_from_certificate(svid.leaf) == LEDGER
    assert svid.leaf.public_key() == key.public_key()
    assert svid.leaf.not_valid_before_utc == clock.now - timedelta(seconds=30)
    assert svid.leaf.not_valid_after_utc == clock.now + timedelta(minutes=10)
    assert verify_x509_svid(svid.cert_chain, {TD: ca.x509_authorities()}, now=clock.now) == LEDGER
    await store.close()


async def test_lifetimes_are_clamped_to_the_issuer(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(
        _config(ca_ttl=timedelta(hours=2), root_ttl=timedelta(hours=1)), store, KEK, clock=clock)
    assert ca.signing_ca.not_valid_after_utc == ca.root.not_valid_after_utc
    svid = await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(days=3))
    assert svid.leaf.not_valid_after_utc == ca.signing_ca.not_valid_after_utc
    await store.close()


async def test_refusals(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK)
    csr = build_csr(generate_private_key())
    with pytest.raises(CAError, match="outside trust domain"):
        await ca.sign_x509_svid(csr, SpiffeId.parse("spiffe://partner.example/x"), timedelta(minutes=5))
    with pytest.raises(CAError, match="no path"):
        await ca.sign_x509_svid(csr, TD.id, timedelta(minutes=5))
    with pytest.raises(CAError, match="positive"):
        await ca.sign_x509_svid(csr, LEDGER, timedelta(0))
    with pytest.raises(SvidError):
        await ca.sign_x509_svid(b"garbage", LEDGER, timedelta(minutes=5))
    rsa_csr = build_csr(rsa.generate_private_key(65537, 2048))  # type: ignore[arg-type]
    with pytest.raises(SvidError, match="not allowed"):
        await ca.sign_x509_svid(rsa_csr, LEDGER, timedelta(minutes=5))
    results = await ca.sign_x509_svids([(csr, LEDGER, timedelta(minutes=5), ()),
                                        (b"bad", LEDGER, timedelta(minutes=5), ()),
                                        (csr, SpiffeId.parse("spiffe://example.org/b"), timedelta(minutes=5), ())])
    assert [type(r).__name__ for r in results] == ["X509Svid", "SvidError", "X509Svid"]
    await store.close()


async def test_jwt_svids_and_the_bundle(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK, clock=clock)
    token, expires = ca.sign_jwt_svid(LEDGER, ["payments", "audit"], timedelta(minutes=5))
    assert expires == clock.now + timedelta(minutes=5)
    jwt = validate_jwt_svid(token, audience="audit", jwt_authorities={TD: ca.jwt_authorities()}, now=clock.now)
    assert jwt.spiffe_id == LEDGER and set(jwt.audience) == {"payments", "audit"}
    bundle = ca.bundle()
    again = Bundle.from_jwks(bundle.to_jwks(), TD)
    assert again.x509_authorities == (ca.root,)
    assert set(again.jwt_keys()) == set(ca.jwt_authorities())
    path = tmp_path / "out" / "bundle.pem"
    ca.write_bundle_pem(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert x509.load_pem_x509_certificates(path.read_bytes()) == [ca.root]
    await store.close()


def test_rotation_threshold_is_half_life() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    end = start + timedelta(hours=10)
    assert not needs_rotation(start, end, start + timedelta(hours=4, minutes=59))
    assert needs_rotation(start, end, start + timedelta(hours=5))


async def test_signing_ca_rotation_with_an_injected_clock(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(ca_ttl=timedelta(hours=4)), store, KEK, clock=clock)
    assert not ca.needs_signing_ca_rotation()
    clock.now += timedelta(hours=2, minutes=1)
    assert ca.needs_signing_ca_rotation()
    old = ca.signing_ca
    await ca.rotate_signing_ca()
    assert ca.signing_ca != old and not ca.needs_signing_ca_rotation()
    await store.close()
