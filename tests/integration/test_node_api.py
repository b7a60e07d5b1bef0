"""The Node API against the real server process: attestation, issuance, sync, bans."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.harness import ServerProcess
from tests.integration.node_client import NodeClient, pem_chain
from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.keys import generate_private_key
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_csr, spiffe_id_from_certificate, verify_x509_svid

TD = TrustDomain("example.org")


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


async def test_token_reuse_unknown_and_expired_are_denied(server: ServerProcess) -> None:
    tok = token(server, "node-1")
    await NodeClient(server).attest(tok)
    err = await _attest_fails(server, tok)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "unknown or already used" in err.details()
    err = await _attest_fails(server, "not-a-real-token")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    short = server.cli("token", "create", "--node", "node-2", "--ttl", "1m", check=True).stdout.strip()
    assert short
    audit = server.cli("audit", "show", "--kind", "node.attest", "--json", check=True).stdout
    assert audit.count('"denied"') >= 2


async def test_a_node_name_attested_twice_is_denied_and_the_token_survives(server: ServerProcess) -> None:
    await attested(server, "node-1")
    # Minting a second token for an attested node is refused up front ...
    result = server.cli("token", "create", "--node", "node-1")
    assert result.returncode == 1 and "already attested" in result.stderr


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
                                      (own_entry, build_csr(rsa.generate_private_key(65537, 2048)))])  # type: ignore[arg-type]
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
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not attested" in info.value.details()
    again = await attested(server, "node-1")
    assert again.spiffe_id == "spiffe://example.org/agent/node-1"


async def test_renewal_replaces_the_agent_svid(server: ServerProcess) -> None:
    agent = await attested(server, "node-1")
    new_key = generate_private_key()
    async with agent.channel() as channel:
        reply = await node_pb2_grpc.NodeStub(channel).RenewAgent(
            node_pb2.RenewAgentRequest(csr=build_csr(new_key)), timeout=10)
    old_serial = x509.load_der_x509_certificate(agent.chain_der[0]).serial_number
    new_leaf = x509.load_der_x509_certificate(reply.svid_chain[0])
    assert new_leaf.serial_number != old_serial and new_leaf.public_key() == new_key.public_key()
    agent.key, agent.chain_der = new_key, list(reply.svid_chain)
    eid = entry(server, "spiffe://example.org/ledger", "node-1")
    assert (await agent.batch_sign([(eid, build_csr(generate_private_key()))])).results[0].HasField("svid")


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
