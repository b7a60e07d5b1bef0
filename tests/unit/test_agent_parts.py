"""Agent parts on their own: backoff and rotation timing, the workload attestor, identity
files, and the SVID cache against a fake signer (a fake of the server, which is fine here:
the integration tests run the real one)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import stat
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh._proto.trustmesh.v1 import node_pb2
from trustmesh.agent.attestation import AgentIdentity, load_identity, save_identity
from trustmesh.agent.convert import AgentEntry
from trustmesh.agent.svid_cache import SvidCache
from trustmesh.agent.workload_attestor import PeerCredentials, WorkloadAttestationError, WorkloadAttestor
from trustmesh.backoff import backoff_delay, renew_at
from trustmesh.keys import generate_private_key
from trustmesh.metrics import Registry
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_ca_certificate, build_leaf_certificate

TD = TrustDomain("example.org")
NOW = datetime.now(timezone.utc)


def test_backoff_is_capped_full_jitter() -> None:
    rand = random.Random(1)
    for attempt in range(50):
        delay = backoff_delay(attempt, base=0.5, cap=30, rand=rand)
        assert 0 <= delay <= min(30, 0.5 * 2 ** attempt)
    assert max(backoff_delay(40, rand=rand) for _ in range(200)) > 15  # it does reach towards the cap


def test_renewal_lands_around_half_life() -> None:
    start, end = NOW, NOW + timedelta(hours=1)
    rand = random.Random(2)
    times = [renew_at(start, end, rand=rand) for _ in range(500)]
    assert all(start + timedelta(minutes=27) <= t <= start + timedelta(minutes=33) for t in times)
    assert len({t for t in times}) > 100  # jittered, so a fleet does not renew in step


async def test_the_attestor_reads_the_kernel_not_the_caller() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    calls: list[str] = []

    def hasher(path: str) -> str:
        calls.append(path)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    attestor = WorkloadAttestor(hasher=hasher)
    try:
        selectors = await attestor.attest(a)
        again = await attestor.attest(a)
    finally:
        a.close()
        b.close()
    assert f"unix:uid:{os.getuid()}" in selectors and f"unix:gid:{os.getgid()}" in selectors
    exe = os.path.realpath(f"/proc/{os.getpid()}/exe")
    assert f"unix:path:{exe}" in selectors
    digest = hashlib.sha256(Path(exe).read_bytes()).hexdigest()
    assert f"unix:sha256:{digest}" in selectors
    assert selectors == again and len(calls) == 1, "the binary is hashed once per inode and mtime"


async def test_a_gone_or_replaced_process_fails_attestation(tmp_path: Path) -> None:
    with pytest.raises(WorkloadAttestationError, match="gone"):
        await WorkloadAttestor().selectors_for(PeerCredentials(pid=2**22 + 7, uid=0, gid=0))
    # A fake /proc whose start time changes between the two reads: pid reuse.
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    stat_file = proc / "42" / "stat"
    fields = " ".join(["S"] + ["0"] * 18 + ["100"] + ["0"] * 10)
    stat_file.write_text(f"42 (python) {fields}")

    class Flipping(WorkloadAttestor):
        async def _sha256(self, path: str) -> str | None:
            stat_file.write_text(f"42 (python) {fields.replace(' 100 ', ' 999 ')}")
            return None

    (proc / "42" / "exe").symlink_to(sys.executable)
    with pytest.raises(WorkloadAttestationError, match="pid reuse"):
        await Flipping(proc=str(proc)).selectors_for(PeerCredentials(pid=42, uid=0, gid=0))


def _ca() -> tuple[x509.Certificate, object]:
    key = generate_private_key()
    cert = build_ca_certificate(trust_domain=TD, public_key=key.public_key(), issuer=None, issuer_key=key,
                                not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(days=1),
                                path_length=1, common_name="root")
    return cert, key


def test_identity_files_are_private_and_reloaded(tmp_path: Path) -> None:
    root, root_key = _ca()
    key = generate_private_key()
    agent_id = SpiffeId.parse("spiffe://example.org/agent/n1")
    leaf = build_leaf_certificate(spiffe_id=agent_id, public_key=key.public_key(), issuer=root, issuer_key=root_key,  # type: ignore[arg-type]
                                  not_before=NOW - timedelta(minutes=1), not_after=NOW + timedelta(hours=1))
    save_identity(tmp_path, AgentIdentity(agent_id, key, (leaf,)))
    assert stat.S_IMODE((tmp_path / "agent_key.pem").stat().st_mode) == 0o600
    loaded = load_identity(tmp_path, [root], TD)
    assert loaded is not None and loaded.spiffe_id == agent_id and loaded.key.public_key() == key.public_key()
    other_root, _ = _ca()
    assert load_identity(tmp_path, [other_root], TD) is None, "an identity of another CA is not reused"
    assert load_identity(tmp_path, [root], TD, now=NOW + timedelta(hours=2)) is None, "expired is not reused"
    (tmp_path / "agent_key.pem").write_bytes(generate_private_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert load_identity(tmp_path, [root], TD) is None, "a key that does not match the SVID is not used"


class FakeSigner:
    """Signs like the server would, from a local CA; can be told to refuse."""

    def __init__(self) -> None:
        self.root, self.key = _ca()
        self.calls = 0
        self.refuse: set[str] = set()
        self.ttl = timedelta(minutes=10)

    async def batch_sign(self, items: list[tuple[str, bytes]]) -> list[node_pb2.X509SignResult]:
        self.calls += 1
        out = []
        for entry_id, csr_der in items:
            if entry_id in self.refuse:
                out.append(node_pb2.X509SignResult(entry_id=entry_id, error=node_pb2.ItemError(code=7, message="no")))
                continue
            csr = x509.load_der_x509_csr(csr_der)
            sid = SpiffeId.parse(f"spiffe://example.org/{entry_id}")
            leaf = build_leaf_certificate(spiffe_id=sid, public_key=csr.public_key(), issuer=self.root,  # type: ignore[arg-type]
                                          issuer_key=self.key, not_before=datetime.now(timezone.utc),  # type: ignore[arg-type]
                                          not_after=datetime.now(timezone.utc) + self.ttl)
            out.append(node_pb2.X509SignResult(entry_id=entry_id, svid=node_pb2.X509Svid(
                spiffe_id=str(sid), cert_chain=[leaf.public_bytes(serialization.Encoding.DER)])))
        return out

    async def sign_jwt(self, entry_id: str, audiences: list[str]) -> node_pb2.SignJWTResponse:
        raise NotImplementedError


def _entry(name: str, uid: int = 1000) -> AgentEntry:
    return AgentEntry(id=name, spiffe_id=f"spiffe://example.org/{name}", selectors=(f"unix:uid:{uid}",),
                      x509_ttl=0, jwt_ttl=0, dns_names=(), federates_with=(), revision=1)


async def test_cache_issues_in_one_batch_serves_by_selector_and_withdraws() -> None:
    signer = FakeSigner()
    cache = SvidCache(TD, signer, Registry())
    v0 = cache.version
    cache.set_entries({"a": _entry("a"), "b": _entry("b"), "c": _entry("c", uid=2000)})
    assert cache.version > v0 and cache.entries_match(["unix:uid:1000"])
    assert cache.x509_svids_for(["unix:uid:1000"]) == []  # known, but no SVID yet
    assert await cache.refresh_once() == 3 and signer.calls == 1
    mine = cache.x509_svids_for(["unix:uid:1000", "unix:gid:5"])
    assert [str(s.svid.spiffe_id) for s in mine] == ["spiffe://example.org/a", "spiffe://example.org/b"]
    assert all(s.svid.private_key is not None for s in mine)
    assert not cache.entries_match(["unix:uid:3000"])
    before = cache.version
    waiter = asyncio.create_task(cache.wait_for_change(before))
    cache.set_entries({"a": _entry("a")})
    assert await asyncio.wait_for(waiter, 1) > before
    assert [str(s.svid.spiffe_id) for s in cache.x509_svids_for(["unix:uid:1000"])] == ["spiffe://example.org/a"]
    assert await cache.refresh_once() == 0, "nothing is due right after issuance"


async def test_refused_items_wait_before_asking_again() -> None:
    signer = FakeSigner()
    signer.refuse = {"b"}
    cache = SvidCache(TD, signer, Registry())
    cache.set_entries({"a": _entry("a"), "b": _entry("b")})
    assert await cache.refresh_once() == 1
    calls = signer.calls
    assert await cache.refresh_once() == 0 and signer.calls == calls, "no hammering of the server"
