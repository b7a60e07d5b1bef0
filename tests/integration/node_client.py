"""A small test-side agent speaking the real Node protocol over real mTLS.

It keeps its key and agent SVID like a real agent, so tests can attest, renew, sync and
sign as one node would, and then misbehave on purpose.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.harness import ServerProcess
from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.keys import PrivateKey, generate_private_key
from trustmesh.x509svid import build_csr


def pem_chain(chain_der: list[bytes]) -> bytes:
    return b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in chain_der)


@dataclass
class NodeClient:
    __test__ = False  # not a test class, despite the name
    server: ServerProcess
    key: PrivateKey = field(default_factory=generate_private_key)
    chain_der: list[bytes] = field(default_factory=list)
    spiffe_id: str = ""

    async def attest(self, token: str) -> node_pb2.AttestResult:
        async with self.server.node_channel() as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            call = stub.Attest(timeout=20)
            await call.write(node_pb2.AttestRequest(csr=build_csr(self.key), join_token=token))
            await call.done_writing()
            reply = await call.read()
        self.chain_der = list(reply.result.svid_chain)
        self.spiffe_id = reply.result.spiffe_id
        return reply.result

    @property
    def serial(self) -> int:
        return x509.load_der_x509_certificate(self.chain_der[0]).serial_number

    def channel(self, server: ServerProcess | None = None) -> grpc.aio.Channel:
        """An mTLS channel with the current agent SVID (to `server`, default the attesting one)."""
        return (server or self.server).node_channel(self.key, pem_chain(self.chain_der))

    async def renew(self) -> None:
        """Renew the agent SVID with a new key, as an agent does at half-life."""
        new_key = generate_private_key()
        async with self.channel() as channel:
            reply = await node_pb2_grpc.NodeStub(channel).RenewAgent(
                node_pb2.RenewAgentRequest(csr=build_csr(new_key)), timeout=20)
        self.key, self.chain_der = new_key, list(reply.svid_chain)

    async def batch_sign(self, items: list[tuple[str, bytes]],
                         server: ServerProcess | None = None) -> node_pb2.BatchSignX509Response:
        async with self.channel(server) as channel:
            req = node_pb2.BatchSignX509Request(items=[node_pb2.X509SignItem(entry_id=e, csr=c) for e, c in items])
            return await node_pb2_grpc.NodeStub(channel).BatchSignX509(req, timeout=20)


class SyncReader:
    """One Sync stream: read messages with a bound, and fold snapshot pages into one."""

    def __init__(self, channel: grpc.aio.Channel, since_revision: int = 0) -> None:
        self.call = node_pb2_grpc.NodeStub(channel).Sync(node_pb2.SyncRequest(since_revision=since_revision))

    async def next(self, timeout: float = 10) -> node_pb2.SyncResponse:
        message: node_pb2.SyncResponse = await asyncio.wait_for(self.call.read(), timeout)
        return message

    async def snapshot(self, timeout: float = 10) -> tuple[list[node_pb2.SyncResponse], int]:
        """All pages of a snapshot, and its revision."""
        pages = [await self.next(timeout)]
        while pages[-1].WhichOneof("body") == "snapshot" and not pages[-1].snapshot.last:
            pages.append(await self.next(timeout))
        return pages, pages[-1].revision

    def cancel(self) -> None:
        self.call.cancel()
