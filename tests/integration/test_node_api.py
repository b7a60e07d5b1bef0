"""The Node API against the real server process: attestation, issuance, sync, bans."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.etcd_process import running_etcd
from tests.integration.harness import ServerProcess, seal_as_replica
from tests.integration.node_client import NodeClient, SyncReader, pem_chain
from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.bundle import Bundle
from trustmesh.controlplane.store import Store, open_store
from trustmesh.controlplane.store.records import BundleRecord, JoinToken, RegistrationEntry
from trustmesh.keys import generate_private_key
from trustmesh.selectors import Selector
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_csr, spiffe_id_from_certificate, verify_x509_svid

TD = TrustDomain("example.org")
KEK_ENV = {"TRUSTMESH_KEK": "22" * 32}


def token(server: ServerProcess, node: str) -> str:
    return server.cli("token", "create", "--node", node, check=True).stdout.strip()


def entry(server: ServerProcess, spiffe_id: str, node: str, *extra: str) -> str:
    return server.cli("entry", "create", "--spiffe-id", spiffe_id, "--node", node, "--selector", "unix:uid:1000",
                      *extra, check=True).stdout.strip()


def roots(server: ServerProcess) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(server.bundle_path.read_bytes())


async def attested(server: ServerProcess, node: str) -> NodeClient:
    agent = NodeClient(server)
    await agent.attest(token(server, node))
    return agent


async def test_join_token_attestation_gives_a_verifiable_agent_svid(server: ServerProcess) -> None:
    agent = NodeClient(server)
    result = await agent.attest(token(server, "node-1"))
    assert result.spiffe_id == "spiffe://example.org/agent/node-1"
    chain = [x509.load_der_x509_certificate(d) for d in result.svid_chain]
    assert verify_x509_svid(chain, {TD: roots(server)}) == SpiffeId.parse(result.spiffe_id)
    assert chain[0].public_key() == agent.key.public_key()
    assert result.bundle.trust_domain == "example.org" and result.bundle.x509_authorities
    listed = server.cli("agent", "list", "--json", check=True).stdout
    assert "spiffe://example.org/agent/node-1" in listed and '"join_token"' in listed


async def _attest_fails(server: ServerProcess, tok: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await NodeClient(server).attest(tok)
    return info.value


async def test_token_reuse_and_unknown_tokens_are_denied(server: ServerProcess) -> None:
    tok = token(server, "node-1")
    await NodeClient(server).attest(tok)
    err = await _attest_fails(server, tok)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "unknown or already used" in err.details()
    assert "trustmesh token create" in err.details()
    err = await _attest_fails(server, "tmjt_not-a-real-token")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "unknown or already used" in err.details()
    audit = server.cli("audit", "show", "--kind", "node.attest", "--json", check=True).stdout
    # The first failure from a source is audited at once; the next within a minute is summed
    # into that source's next event (attest_failures.py).
    assert audit.count('"denied"') == 1 and audit.count('"ok"') == 1


async def test_a_node_name_attested_twice_is_denied_and_the_token_survives(server: ServerProcess) -> None:
    # Two tokens for one name, both minted before the node attested (e.g. a retried script).
    first, second = token(server, "node-1"), token(server, "node-1")
    await NodeClient(server).attest(first)
    err = await _attest_fails(server, second)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already attested by another agent" in err.details() and "agent evict" in err.details()
    # Minting yet another token for an attested node is refused up front.
    result = server.cli("token", "create", "--node", "node-1")
    assert result.returncode == 1 and "already attested" in result.stderr
    # The refused token was not spent: once the old agent is evicted it admits the new host.
    server.cli("agent", "evict", "spiffe://example.org/agent/node-1", check=True)
    replacement = NodeClient(server)
    assert (await replacement.attest(second)).spiffe_id == "spiffe://example.org/agent/node-1"


async def test_calls_need_the_agent_svid(server: ServerProcess) -> None:
    request = node_pb2.BatchSignX509Request(items=[node_pb2.X509SignItem(entry_id="x", csr=b"")])
    # The Node API listener requires a client certificate: the handshake fails without one.
    async with server.node_channel(address=server.bind) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node_pb2_grpc.NodeStub(channel).BatchSignX509(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The attestation listener serves nothing but Attest.
    async with server.node_channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node_pb2_grpc.NodeStub(channel).BatchSignX509(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_workload_svid_cannot_call_the_node_api(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    eid = entry(server, "spiffe://example.org/ledger", "node-1")
    key = generate_private_key()
    reply = await agent.batch_sign([(eid, build_csr(key))])
    workload_chain = list(reply.results[0].svid.cert_chain)
    async with server.node_channel(key, pem_chain(workload_chain)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node_pb2_grpc.NodeStub(channel).BatchSignX509(
                node_pb2.BatchSignX509Request(items=[node_pb2.X509SignItem(entry_id=eid, csr=build_csr(key))]),
                timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "only agents" in info.value.details()


async def test_a_certificate_from_another_ca_is_refused(server: ServerProcess, make_server: object) -> None:
    other = make_server("other")  # type: ignore[operator]
    foreign = await attested(other, "node-x")
    # Present the other CA's agent SVID to our server: the TLS handshake refuses it.
    async with server.node_channel(foreign.key, pem_chain(foreign.chain_der)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node_pb2_grpc.NodeStub(channel).BatchSignX509(
                node_pb2.BatchSignX509Request(items=[node_pb2.X509SignItem(entry_id="x", csr=b"")]), timeout=10)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


async def test_issuance_uses_the_entry_id_not_the_csr(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    eid = entry(server, "spiffe://example.org/ledger", "node-1", "--x509-ttl", "10m")
    key = generate_private_key()
    csr = build_csr(key, SpiffeId.parse("spiffe://example.org/admin"))
    reply = await agent.batch_sign([(eid, csr)])
    result = reply.results[0]
    assert result.WhichOneof("outcome") == "svid", result
    chain = [x509.load_der_x509_certificate(d) for d in result.svid.cert_chain]
    assert spiffe_id_from_certificate(chain[0]) == SpiffeId.parse("spiffe://example.org/ledger")
    assert chain[0].public_key() == key.public_key()
    life = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert 600 <= life.total_seconds() <= 660
    assert verify_x509_svid(chain, {TD: roots(server)}) == SpiffeId.parse("spiffe://example.org/ledger")


async def test_a_compromised_agent_cannot_get_another_nodes_svid(server: ServerProcess) -> None:
    mallory = await attested(server, "node-1")
    await attested(server, "node-2")
    victim_entry = entry(server, "spiffe://example.org/ledger", "node-2")
    own_entry = entry(server, "spiffe://example.org/payments", "node-1")
    csr = build_csr(generate_private_key())
    reply = await mallory.batch_sign([(victim_entry, csr), (own_entry, csr), ("no-such-entry", csr),
                                      (own_entry, b"garbage"),
                                      (own_entry, build_csr(rsa.generate_private_key(65537, 2048)))])
    outcomes = [(r.WhichOneof("outcome"), r.error.code) for r in reply.results]
    assert outcomes[0] == ("error", grpc.StatusCode.PERMISSION_DENIED.value[0])
    assert outcomes[1][0] == "svid"
    assert outcomes[2] == ("error", grpc.StatusCode.PERMISSION_DENIED.value[0])
    assert outcomes[3] == ("error", grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert outcomes[4] == ("error", grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "not allowed" in reply.results[4].error.message
    audit = server.cli("audit", "show", "--kind", "svid.issue", "--json", check=True).stdout
    assert victim_entry in audit and '"denied"' in audit


async def test_oversized_and_empty_batches_are_refused(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.batch_sign([])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.batch_sign([("e", b"x" * (5 * 1024 * 1024))])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def _next(call: object, timeout: float = 10) -> node_pb2.SyncResponse:
    return await asyncio.wait_for(call.read(), timeout)  # type: ignore[attr-defined]


async def test_sync_sends_a_snapshot_then_deltas(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    first = entry(server, "spiffe://example.org/ledger", "node-1")
    entry(server, "spiffe://example.org/elsewhere", "node-2")
    async with agent.channel() as channel:
        call = node_pb2_grpc.NodeStub(channel).Sync(node_pb2.SyncRequest())
        snap = await _next(call)
        assert snap.WhichOneof("body") == "snapshot" and snap.snapshot.last
        assert [e.id for e in snap.snapshot.entries] == [first]
        assert snap.snapshot.bundles[0].trust_domain == "example.org"
        second = entry(server, "spiffe://example.org/payments", "node-1")
        delta = await _next(call)
        assert [e.id for e in delta.delta.upserted_entries] == [second]
        assert delta.revision > snap.revision
        server.cli("entry", "delete", first, check=True)
        delta = await _next(call)
        assert list(delta.delta.deleted_entry_ids) == [first]
        call.cancel()


async def test_a_banned_agent_is_cut_off_within_a_second(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    eid = entry(server, "spiffe://example.org/ledger", "node-1")
    async with agent.channel() as channel:
        call = node_pb2_grpc.NodeStub(channel).Sync(node_pb2.SyncRequest())
        await _next(call)
        reader = asyncio.create_task(_next(call, timeout=10))
        server.cli("agent", "ban", "node-1", check=True)
        banned_at = time.monotonic()  # the ban is in force once the CLI call returns
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reader
        cut_after = time.monotonic() - banned_at
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "banned" in info.value.details()
    assert cut_after < 1.0, f"the banned agent's stream lived {cut_after:.2f}s after the ban"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.batch_sign([(eid, build_csr(generate_private_key()))])
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A banned node cannot come back with a new token either.
    assert server.cli("token", "create", "--node", "node-1").returncode == 1


async def test_an_evicted_agent_is_refused_and_can_rejoin(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    server.cli("agent", "evict", "node-1", check=True)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.batch_sign([("e", build_csr(generate_private_key()))])
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "was evicted" in info.value.details()
    again = await attested(server, "node-1")
    assert again.spiffe_id == "spiffe://example.org/agent/node-1"
    # The old agent's SVID names the same node but belongs to the evicted attestation.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.batch_sign([("e", build_csr(generate_private_key()))])
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "superseded" in info.value.details()


async def test_an_eviction_ends_the_sync_stream_at_once(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    async with agent.channel() as channel:
        sync = SyncReader(channel)
        await sync.snapshot()
        reader = asyncio.create_task(sync.next())
        server.cli("agent", "evict", "node-1", check=True)
        evicted_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reader
    assert time.monotonic() - evicted_at < 1.0
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "evicted" in info.value.details()


async def test_renewal_replaces_the_agent_svid(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    eid = entry(server, "spiffe://example.org/ledger", "node-1")
    old = NodeClient(server, agent.key, list(agent.chain_der), agent.spiffe_id)
    async with old.channel() as old_channel:
        sync = SyncReader(old_channel)
        await sync.snapshot()
        await agent.renew()
        new_leaf = x509.load_der_x509_certificate(agent.chain_der[0])
        assert new_leaf.serial_number != old.serial and new_leaf.public_key() == agent.key.public_key()
        assert spiffe_id_from_certificate(new_leaf) == SpiffeId.parse("spiffe://example.org/agent/node-1")
        assert verify_x509_svid([x509.load_der_x509_certificate(d) for d in agent.chain_der],
                                {TD: roots(server)}) == SpiffeId.parse(agent.spiffe_id)
        csr = build_csr(generate_private_key())
        assert (await agent.batch_sign([(eid, csr)])).results[0].HasField("svid")
        # The agent switches over while the previous SVID still works for a short grace ...
        assert (await old.batch_sign([(eid, csr)])).results[0].HasField("svid")
        # ... and a renewal is no revocation: the sync stream opened with it goes on.
        second = entry(server, "spiffe://example.org/payments", "node-1")
        delta = await sync.next()
        assert [e.id for e in delta.delta.upserted_entries] == [second]
        sync.cancel()
    audit = server.cli("audit", "show", "--kind", "agent.renew", "--json", check=True).stdout
    assert format(old.serial, "x") in audit


async def test_sync_resumes_from_the_revision_the_agent_applied(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    first = entry(server, "spiffe://example.org/ledger", "node-1")
    async with agent.channel() as channel:
        sync = SyncReader(channel)
        _, revision = await sync.snapshot()
        sync.cancel()
    # While the agent is away: one entry comes, one goes, another node's entry changes.
    second = entry(server, "spiffe://example.org/payments", "node-1")
    server.cli("entry", "delete", first, check=True)
    entry(server, "spiffe://example.org/elsewhere", "node-2")
    async with agent.channel() as channel:
        sync = SyncReader(channel, since_revision=revision)
        resumed = await sync.next()
        assert resumed.WhichOneof("body") == "delta", "a reconnect within the server's memory resumes"
        assert [e.id for e in resumed.delta.upserted_entries] == [second]
        assert list(resumed.delta.deleted_entry_ids) == [first]
        assert resumed.revision > revision
        sync.cancel()
        # Resuming from where it now is: an empty delta that only confirms the revision.
        sync = SyncReader(channel, since_revision=resumed.revision)
        again = await sync.next()
        assert again.WhichOneof("body") == "delta" and not again.delta.upserted_entries
        assert not again.delta.deleted_entry_ids and again.revision == resumed.revision
        sync.cancel()
        # A revision the server never reached (another store, a restored backup): snapshot.
        sync = SyncReader(channel, since_revision=resumed.revision + 10_000)
        pages, _ = await sync.snapshot()
        assert [e.id for e in pages[-1].snapshot.entries] == [second]
        sync.cancel()
    # After a restart the server's memory starts afresh: the agent gets a snapshot.
    server.stop()
    server.start()
    async with agent.channel() as channel:
        sync = SyncReader(channel, since_revision=resumed.revision)
        pages, _ = await sync.snapshot()
        assert pages[-1].WhichOneof("body") == "snapshot"
        assert [e.id for e in pages[-1].snapshot.entries] == [second]
        sync.cancel()


async def test_jwt_svids_for_authorized_entries_only(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    own = entry(server, "spiffe://example.org/ledger", "node-1")
    other = entry(server, "spiffe://example.org/other", "node-2")
    async with agent.channel() as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        reply = await stub.SignJWT(node_pb2.SignJWTRequest(entry_id=own, audiences=["a", "b"]), timeout=10)
        assert reply.token.count(".") == 2 and reply.expires_at > time.time()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SignJWT(node_pb2.SignJWTRequest(entry_id=other, audiences=["a"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SignJWT(node_pb2.SignJWTRequest(entry_id=own), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- on etcd, with the test writing to the store directly and several server replicas ----------


@pytest.fixture
async def etcd_store(etcd_server: str, tmp_path: Path) -> AsyncIterator[tuple[str, Store]]:
    """A fresh etcd namespace, and the test's own handle on it (as another writer would have)."""
    url = f"{etcd_server}/t{uuid.uuid4().hex[:12]}"
    store = await seal_as_replica(await open_store(url, tmp_path / "direct"), KEK_ENV["TRUSTMESH_KEK"])
    yield url, store
    await store.close()


def _replica(make_server: Callable[..., ServerProcess], url: str, name: str) -> ServerProcess:
    return make_server(name, store=url, env=KEK_ENV)


def _partner_bundle(sequence: int) -> tuple[BundleRecord, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"partner root {sequence}")])
    root = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    jwks = Bundle(TrustDomain("partner.example"), (root,), sequence_number=sequence).to_jwks()
    return BundleRecord(TrustDomain("partner.example"), jwks, sequence, time.time()), root


@pytest.mark.etcd
async def test_an_expired_join_token_is_denied_and_removed(
        make_server: Callable[..., ServerProcess], etcd_store: tuple[str, Store]) -> None:
    url, store = etcd_store
    server = _replica(make_server, url, "server")
    secret = "tmjt_expired-token-for-the-test"
    digest = hashlib.sha256(secret.encode()).hexdigest()
    # Valid when written, expired when presented: the leader's first round (whenever it comes)
    # prunes only tokens already expired, so it cannot delete this one before it is presented.
    await store.create_join_token(JoinToken(token_hash=digest, node_name="node-1",
                                            expires_at=time.time() + 2, created_at=time.time() - 600))
    await asyncio.sleep(3)
    err = await _attest_fails(server, secret)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "join token expired" in err.details() and "--node node-1" in err.details()
    assert await store.list_join_tokens() == [], "an expired token is deleted when presented"
    assert await store.list_attested_nodes() == []


@pytest.mark.etcd
async def test_sync_carries_the_bundles_of_federated_trust_domains(
        make_server: Callable[..., ServerProcess], etcd_store: tuple[str, Store]) -> None:
    url, store = etcd_store
    record, root = _partner_bundle(1)
    await store.put_bundle(record)
    server = _replica(make_server, url, "server")
    federating = await attested(server, "node-1")
    other = await attested(server, "node-2")
    entry(server, "spiffe://example.org/settlement", "node-1", "--federates-with", "partner.example")
    entry(server, "spiffe://example.org/ledger", "node-2")
    async with federating.channel() as channel, other.channel() as other_channel:
        sync, other_sync = SyncReader(channel), SyncReader(other_channel)
        pages, _ = await sync.snapshot()
        bundles = {b.trust_domain: b for b in pages[-1].snapshot.bundles}
        assert set(bundles) == {"example.org", "partner.example"}
        assert bundles["partner.example"].sequence_number == 1
        assert list(bundles["partner.example"].x509_authorities) == [root.public_bytes(serialization.Encoding.DER)]
        other_pages, _ = await other_sync.snapshot()
        assert {b.trust_domain for b in other_pages[-1].snapshot.bundles} == {"example.org"}
        # A node that does not federate is told to drop a partner bundle it may hold from before.
        assert list((await other_sync.next()).delta.deleted_bundles) == ["partner.example"]
        # The partner rotates its root: only the federating node hears of it.
        rotated, new_root = _partner_bundle(2)
        await store.put_bundle(rotated)
        delta = await sync.next()
        assert [(b.trust_domain, b.sequence_number) for b in delta.delta.bundles] == [("partner.example", 2)]
        assert list(delta.delta.bundles[0].x509_authorities) == [new_root.public_bytes(serialization.Encoding.DER)]
        await store.delete_bundle("partner.example")
        delta = await sync.next()
        assert list(delta.delta.deleted_bundles) == ["partner.example"] and not delta.delta.bundles
        with pytest.raises(asyncio.TimeoutError):
            await other_sync.next(timeout=0.5)
        sync.cancel()
        other_sync.cancel()


@pytest.mark.etcd
async def test_a_large_snapshot_is_paged(make_server: Callable[..., ServerProcess],
                                         etcd_store: tuple[str, Store]) -> None:
    url, store = etcd_store
    server = _replica(make_server, url, "server")
    agent = await attested(server, "node-1")
    now = time.time()
    # Entries as large as validation allows (32 long selectors each): 1,100 of them is far
    # more than one 4 MB message could hold.
    selectors = tuple(Selector.parse(s) for s in sorted(f"unix:path:/opt/{'x' * 200}/{j}" for j in range(32)))

    async def create(i: int) -> None:
        await store.create_entry(RegistrationEntry(
            id=f"bulk-{i:05d}", spiffe_id=SpiffeId.parse(f"spiffe://example.org/bulk/{i}"),
            parent_id=SpiffeId.parse(str(agent.spiffe_id)),
            selectors=selectors, x509_ttl=0, jwt_ttl=0, dns_names=(), federates_with=(), admin=False,
            created_at=now, updated_at=now))

    for start in range(0, 1100, 100):
        await asyncio.gather(*(create(i) for i in range(start, start + 100)))
    deadline = time.monotonic() + 10
    async with agent.channel() as channel:
        while True:
            sync = SyncReader(channel)
            pages, _ = await sync.snapshot()
            sync.cancel()
            if sum(len(p.snapshot.entries) for p in pages) == 1100 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)  # the server's change feed is still catching up
    assert sum(len(p.snapshot.entries) for p in pages) == 1100
    assert len(pages) >= 3 and [p.snapshot.page for p in pages] == list(range(len(pages)))
    assert [p.snapshot.last for p in pages] == [False] * (len(pages) - 1) + [True]
    assert all(p.ByteSize() < 2 * 1024 * 1024 for p in pages), "every page stays far below 4 MB"
    assert not pages[0].snapshot.bundles and pages[-1].snapshot.bundles


@pytest.mark.etcd
async def test_replicas_share_bans_and_renewals(make_server: Callable[..., ServerProcess],
                                                etcd_store: tuple[str, Store]) -> None:
    url, _ = etcd_store
    a = _replica(make_server, url, "a")
    b = _replica(make_server, url, "b")
    agent = await attested(a, "node-1")
    eid = entry(a, "spiffe://example.org/ledger", "node-1")
    csr = build_csr(generate_private_key())
    # Attested on A, served on B; renewed on A, the previous SVID still works on B meanwhile.
    assert (await agent.batch_sign([(eid, csr)], server=b)).results[0].HasField("svid")
    old = NodeClient(a, agent.key, list(agent.chain_der), agent.spiffe_id)
    async with old.channel(b) as old_channel:
        sync = SyncReader(old_channel)
        await sync.snapshot()
        await agent.renew()
        deadline = time.monotonic() + 5
        while True:  # B learns of the renewal from the store's change feed
            try:
                assert (await agent.batch_sign([(eid, csr)], server=b)).results[0].HasField("svid")
                break
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.PERMISSION_DENIED or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert (await old.batch_sign([(eid, csr)], server=b)).results[0].HasField("svid")
        # Banned through A: the stream on B ends within a second, and B refuses every call.
        reader = asyncio.create_task(sync.next())
        a.cli("agent", "ban", "node-1", check=True)
        banned_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reader
        assert time.monotonic() - banned_at < 1.0
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "banned" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.batch_sign([(eid, csr)], server=b)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.etcd
@pytest.mark.slow
async def test_the_change_feed_survives_an_etcd_restart(make_server: Callable[..., ServerProcess]) -> None:
    """etcd goes away and comes back: the server keeps its agents' streams, resumes the watch
    where it stopped, and a ban made afterwards still cuts the agent off."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not on PATH; install etcd 3.4+ (scripts/test does)")
    with running_etcd() as etcd:  # our own etcd: this test stops and restarts it
        server = _replica(make_server, f"{etcd.url}/outage", "server")
        agent = await attested(server, "node-1")
        eid = entry(server, "spiffe://example.org/ledger", "node-1")
        async with agent.channel() as channel:
            sync = SyncReader(channel)
            await sync.snapshot()
            etcd.stop()
            # Without the store nothing can be audited, so nothing is issued: a clean UNAVAILABLE.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.batch_sign([(eid, build_csr(generate_private_key()))])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            restarted = subprocess.Popen(etcd.process.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 30
                while True:  # until etcd answers the server again
                    created = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/payments",
                                         "--node", "node-1", "--selector", "unix:uid:1000")
                    if created.returncode == 0:
                        break
                    assert restarted.poll() is None and time.monotonic() < deadline, created.stderr
                    await asyncio.sleep(0.2)
                delta = await sync.next(timeout=20)
                assert [e.id for e in delta.delta.upserted_entries] == [created.stdout.strip()], \
                    "the same stream lives on and the watch picks up where it stopped"
                assert "change_feed_unavailable" in server.log() and "change_feed_resumed" in server.log()
                reader = asyncio.create_task(sync.next())
                server.cli("agent", "ban", "node-1", check=True)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await reader
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            finally:
                server.stop()
                restarted.terminate()
                restarted.wait(10)


async def test_forged_flow_reports_cannot_flood_or_author_the_audit_log(server: ServerProcess) -> None:
    """A compromised agent reporting 10,000 invented denials and refusals gets one aggregated
    event, labelled as its claim, not one event per counter with the content it chose."""
    agent = await attested(server, "node-1")
    before = len(_audit_events(server))
    now = int(time.time())
    async with agent.channel() as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        for batch in range(5):
            await stub.ReportFlows(node_pb2.ReportFlowsRequest(
                counters=[node_pb2.FlowCounter(
                    source_id=f"spiffe://example.org/intruder-{batch}-{i}", destination_id="spiffe://example.org/vault",
                    port=443, decision=node_pb2.FLOW_DECISION_DENY, rule="x" * 500, count=1,
                    first_seen=now, last_seen=now) for i in range(1_900)],
                refusals=[node_pb2.RefusalCounter(kind="handshake", subject="spiffe://example.org/vault",
                                                  peer=f"10.0.0.{i}:4000", reason="unknown CA", count=2,
                                                  first_seen=now, last_seen=now) for i in range(100)]),
                timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as info:  # a report past the limit is refused whole
            await stub.ReportFlows(node_pb2.ReportFlowsRequest(
                counters=[node_pb2.FlowCounter(count=1, decision=node_pb2.FLOW_DECISION_DENY)] * 9_999,
                refusals=[node_pb2.RefusalCounter(kind="handshake", count=1)] * 2), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    events = _audit_events(server)[before:]
    reported = [e for e in events if e["kind"] == "flows.reported"]
    # Within one interval (a minute by default): the first report, audited at once, and nothing else.
    assert len(events) == 1 and len(reported) == 1, [e["kind"] for e in events]
    event = reported[0]
    assert event["actor"] == "spiffe://example.org/agent/node-1" and event["outcome"] == "denied"
    details = event["details"]
    assert details["claim"].startswith("reported by the agent")
    assert details["denied"] == 1_900 and details["refused"] == 200
    assert len(details["flows"]) == 20 and len(details["refusals"]) == 20
    assert details["unlisted"] == 1_900 - 20 + 200 - 40
    assert all(len(f["rule"]) <= 256 for f in details["flows"])


def _audit_events(server: ServerProcess) -> list[dict[str, Any]]:
    return list(json.loads(server.cli("audit", "show", "--json", "--limit", "100000", check=True).stdout))
