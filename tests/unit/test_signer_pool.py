"""X509-SVID batches signed on worker processes: same rules as in-process, rotation, dead workers, shutdown."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.controlplane.ca.authority import CAConfig, CertificateAuthority
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.store import open_store
from trustmesh.errors import CAError, SvidError, TrustmeshError, UnavailableError
from trustmesh.keys import generate_private_key, spki_der
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import X509Svid, build_csr, verify_x509_svid

TD = TrustDomain("example.org")
LEDGER = SpiffeId.parse("spiffe://example.org/ledger")
KEK = KeyEncryptionKey(bytes(range(32)))


@pytest.fixture
async def ca(tmp_path: Path) -> AsyncIterator[CertificateAuthority]:
    store = await open_store("sqlite", tmp_path)
    authority = await CertificateAuthority.load_or_create(
        CAConfig(trust_domain=TD, replica_id="r1", signing_workers=2), store, KEK)
    try:
        yield authority
    finally:
        authority.close()
        await store.close()


def _workers(authority: CertificateAuthority) -> list[int]:
    pool = authority._pool  # noqa: SLF001 - the test looks at the processes themselves
    assert pool is not None and pool._executor is not None  # noqa: SLF001
    return list(pool._executor._processes)  # noqa: SLF001


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_batch_on_workers_follows_the_same_rules(ca: CertificateAuthority) -> None:
    keys = [generate_private_key() for _ in range(5)]
    other = SpiffeId.parse("spiffe://example.org/b")
    results = await ca.sign_x509_svids([
        (build_csr(keys[0]), LEDGER, timedelta(minutes=5), ()),
        (b"bad", LEDGER, timedelta(minutes=5), ()),
        (build_csr(keys[1]), other, timedelta(minutes=5), ("b.internal",)),
        (build_csr(keys[2]), SpiffeId.parse("spiffe://partner.example/x"), timedelta(minutes=5), ()),
        (build_csr(keys[3]), LEDGER, timedelta.max, ()),
        (build_csr(keys[4]), LEDGER, timedelta(minutes=5), ("not a dns name",)),
    ])
    assert [type(r).__name__ for r in results] == ["X509Svid", "SvidError", "X509Svid", "CAError", "CAError",
                                                   "SvidError"]
    ok0, ok2 = results[0], results[2]
    assert isinstance(ok0, X509Svid) and isinstance(ok2, X509Svid)
    assert spki_der(ok0.leaf.public_key()) == spki_der(keys[0].public_key())  # type: ignore[arg-type]
    assert ok2.spiffe_id == other and ok2.leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["b.internal"]
    assert verify_x509_svid(ok0.cert_chain, {TD: ca.x509_authorities()}) == LEDGER
    # The DER handed out is exactly the certificates' own encoding.
    assert ok0.chain_ders() == tuple(c.public_bytes(serialization.Encoding.DER) for c in ok0.cert_chain)
    assert ok0.chain_der() == b"".join(ok0.chain_ders())
    assert "invalid DNS name" in str(results[5])
    single = await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5))
    assert single.cert_chain[1] == ca.signing_ca
    with pytest.raises(SvidError, match="not a valid DER"):
        await ca.sign_x509_svid(b"junk", LEDGER, timedelta(minutes=5))


async def test_workers_sign_with_the_rotated_signing_ca(ca: CertificateAuthority) -> None:
    csr = build_csr(generate_private_key())
    before = await ca.sign_x509_svids([(csr, LEDGER, timedelta(minutes=5), ())] * 4)
    old = ca.signing_ca
    new = await ca.rotate_signing_ca()
    after = await ca.sign_x509_svids([(csr, LEDGER, timedelta(minutes=5), ())] * 4)
    for svid in before:
        assert isinstance(svid, X509Svid) and svid.cert_chain[1] == old
        svid.leaf.verify_directly_issued_by(old)
    for svid in after:
        assert isinstance(svid, X509Svid) and svid.cert_chain[1] == new
        svid.leaf.verify_directly_issued_by(new)


async def test_a_dead_worker_does_not_hang_the_batch(ca: CertificateAuthority) -> None:
    csr = build_csr(generate_private_key())
    await ca.sign_x509_svids([(csr, LEDGER, timedelta(minutes=5), ())] * 2)
    for pid in _workers(ca):
        os.kill(pid, signal.SIGKILL)
    results = await ca.sign_x509_svids([(csr, LEDGER, timedelta(minutes=5), ())] * 3)
    assert all(isinstance(r, X509Svid) for r in results)


async def test_workers_that_keep_dying_fail_the_batch_as_unavailable(ca: CertificateAuthority,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from trustmesh.controlplane.ca import signer_pool

    monkeypatch.setattr(signer_pool, "_sign_chunk", _die)
    with pytest.raises(UnavailableError, match="died twice"):
        await ca.sign_x509_svids([(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5), ())])


def _die(*_: object) -> None:
    os._exit(3)


async def test_close_leaves_no_process_behind(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path)
    authority = await CertificateAuthority.load_or_create(
        CAConfig(trust_domain=TD, replica_id="r1", signing_workers=2), store, KEK)
    results = await authority.sign_x509_svids([(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5), ())])
    assert not isinstance(results[0], TrustmeshError)
    pids = _workers(authority)
    assert pids
    authority.close()
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(UnavailableError, match="shut down"):
        await authority.sign_x509_svids([(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5), ())])
    await store.close()


def test_a_negative_worker_count_is_refused() -> None:
    with pytest.raises(CAError, match="signing_workers must be 0"):
        CAConfig(trust_domain=TD, replica_id="r1", signing_workers=-1)
