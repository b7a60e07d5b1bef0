"""Root rotation (prepare -> activate -> retire) across two replicas sharing one store.

Every step is checked the way a peer sees it: which roots the bundle carries, what a new
leaf chains to, and that a leaf issued before a step still verifies after it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_ca import KEK, LEDGER, TD, Clock, _config, _der
from trustmesh.controlplane.ca.authority import CertificateAuthority
from trustmesh.controlplane.ca.journal import CAJournal
from trustmesh.controlplane.config import MAX_JWT_TTL
from trustmesh.controlplane.store import Store
from trustmesh.errors import CAError, VerificationError
from trustmesh.jwtsvid import validate_jwt_svid
from trustmesh.keys import generate_private_key
from trustmesh.x509svid import build_csr, verify_x509_svid

JWT_GRACE = MAX_JWT_TTL.total_seconds()


async def _leaf(ca: CertificateAuthority, ttl: timedelta = timedelta(minutes=30)):  # type: ignore[no-untyped-def]
    return await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, ttl)


def _root_ids(ca: CertificateAuthority) -> dict[str, str]:
    return {r.id: r.status for r in ca.journal.roots}


async def test_a_full_root_rotation_across_two_replicas(store: Store) -> None:
    clock = Clock()
    config = _config(ca_ttl=timedelta(hours=2))
    a = await CertificateAuthority.load_or_create(config, store, KEK, clock=clock)
    b = await CertificateAuthority.load_or_create(replace(config, replica_id="r2"), store, KEK, clock=clock)
    old_root = a.journal.active_root()
    old_kid = a.journal.active_jwt_key().kid
    before = await b.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(hours=1))

    # prepare: both replicas publish the new root; neither signs with it yet.
    new_slot = await a.prepare_root()
    await b.reload()
    assert _root_ids(b) == {old_root.id: "active", new_slot.id: "prepared"}
    assert len(a.x509_authorities()) == len(b.x509_authorities()) == 2
    assert len(b.bundle().jwt_authorities) == 2, "the next JWT key is published before it signs"
    assert b.signing_root_id == old_root.id
    with pytest.raises(CAError, match="already under way"):
        await b.prepare_root()

    # activate (on A): A's signing CA moves at once; B notices on reload and must follow.
    clock.now += timedelta(minutes=1)
    await a.activate_root()
    assert a.signing_root_id == new_slot.id
    await b.reload()
    assert _root_ids(b) == {old_root.id: "old", new_slot.id: "active"}
    assert b.signing_root_id == old_root.id != b.journal.active_root().id
    await b.rotate_signing_ca()
    after = await _leaf(b)
    a_leaf = await _leaf(a)
    for svid in (before, after, a_leaf):
        # Peers that hold the bundle (both roots) accept leaves from either side of the step.
        verify_x509_svid(svid.cert_chain, {TD: b.x509_authorities()}, now=clock.now)
    new_root_only = [c for c in b.x509_authorities() if _der(c) == new_slot.cert_der]
    verify_x509_svid(after.cert_chain, {TD: new_root_only}, now=clock.now)
    with pytest.raises(VerificationError):
        verify_x509_svid(before.cert_chain, {TD: new_root_only}, now=clock.now)
    token, _ = b.sign_jwt_svid(LEDGER, ["x"], timedelta(minutes=5))
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["kid"] == b.journal.active_jwt_key().kid != old_kid
    validate_jwt_svid(token, audience="x", jwt_authorities={TD: a.jwt_authorities()}, now=clock.now)

    # retire: refused (nothing dropped) while a signing CA under the old root is unexpired.
    assert await a.retire_old(MAX_JWT_TTL) == ([], [])
    assert old_root.id in _root_ids(a)
    # Two hours on, every signing CA made under the old root has expired, so has every leaf.
    clock.now += timedelta(hours=2)
    roots, kids = await a.retire_old(MAX_JWT_TTL)
    assert roots == [old_root.id] and kids == [], "the old JWT key stays for the longest JWT lifetime"
    await b.reload()
    assert _root_ids(b) == {new_slot.id: "active"} and len(b.x509_authorities()) == 1
    clock.now += MAX_JWT_TTL
    roots, kids = await b.retire_old(MAX_JWT_TTL)
    assert roots == [] and len(kids) == 1
    assert len(b.bundle().jwt_authorities) == 1
    # A restarted replica loads the rotated journal and signs under the new root.
    c = await CertificateAuthority.load_or_create(replace(config, replica_id="r3"), store, KEK, clock=clock)
    assert c.signing_root_id == new_slot.id
    verify_x509_svid((await _leaf(c)).cert_chain, {TD: c.x509_authorities()}, now=clock.now)


async def test_activate_without_a_prepared_root_is_refused(store: Store) -> None:
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK, clock=Clock())
    before = await store.load_ca_state()
    with pytest.raises(CAError, match="no root is prepared"):
        await ca.activate_root()
    assert await store.load_ca_state() == before


async def test_a_prepared_root_survives_a_restart_and_is_checked_like_any_root(store: Store) -> None:
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(_config(), store, KEK, clock=clock)
    slot = await ca.prepare_root()
    again = await CertificateAuthority.load_or_create(_config(replica="r2"), store, KEK, clock=clock)
    assert again.journal.prepared_root() == slot
    # A prepared root's certificate swapped for another is tampering, refused at start.
    data, version = await store.load_ca_state()
    assert data is not None
    doc = json.loads(data)
    doc["roots"][1]["cert"] = doc["roots"][0]["cert"]
    await store.save_ca_state(json.dumps(doc).encode(), version)
    with pytest.raises(CAError, match="tampered"):
        await CertificateAuthority.load_or_create(_config(replica="r3"), store, KEK, clock=clock)


# --- the automatic schedule (pure) ----------------------------------------------------------


async def test_the_schedule_prepares_at_half_life_activates_at_two_thirds_then_retires(store: Store) -> None:
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(
        _config(root_ttl=timedelta(days=30), ca_ttl=timedelta(hours=24)), store, KEK, clock=clock)
    start = clock.now

    def step_at(days: float) -> str | None:
        return ca.journal.next_root_step((start + timedelta(days=days)).timestamp(), JWT_GRACE)

    assert step_at(0) is None and step_at(14.9) is None
    assert step_at(15.01) == "prepare"
    clock.now = start + timedelta(days=15.01)
    await ca.prepare_root()
    assert step_at(15.02) is None and step_at(19.9) is None
    assert step_at(20.01) == "activate"
    clock.now = start + timedelta(days=20.01)
    await ca.rotate_signing_ca()  # what the rotation loop keeps doing at each half-life
    await ca.activate_root()
    # The old root still has signing CAs (this replica's previous one) for up to a day.
    assert step_at(20.02) is None
    assert step_at(21.0) is None
    assert step_at(21.02) == "retire"
    # Never a second rotation while an old root is still trusted.
    journal = ca.journal
    assert journal.next_root_step((start + timedelta(days=60)).timestamp(), JWT_GRACE) == "retire"


def _empty_journal() -> CAJournal:
    return CAJournal.from_bytes(json.dumps({"v": 1, "trust_domain": "example.org", "roots": [], "jwt_keys": [],
                                            "signing_cas": []}).encode())


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_an_empty_journal_has_no_step_but_says_why(now: float) -> None:
    journal = _empty_journal()
    with pytest.raises(CAError, match="0 active roots"):
        journal.next_root_step(now, JWT_GRACE)


def test_journals_written_before_rotation_fields_existed_still_load() -> None:
    doc = {"v": 1, "trust_domain": "example.org", "signing_cas": [],
           "roots": [{"id": "r", "status": "active", "cert": "", "sealed_key": "", "created_at": 1.0,
                      "not_after": 2.0}],
           "jwt_keys": [{"kid": "k", "status": "active", "public_key": "", "sealed_key": "", "created_at": 1.0,
                         "not_after": 2.0}]}
    journal = CAJournal.from_bytes(json.dumps(doc).encode())
    assert journal.roots[0].activated_at == 0.0 and journal.roots[0].demoted_at == 0.0
    assert CAJournal.from_bytes(journal.to_bytes()) == journal
