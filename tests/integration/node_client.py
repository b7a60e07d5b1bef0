"""A small test-side agent speaking the real Node protocol over real mTLS."""

from __future__ import annotations

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

    def channel(self) -> grpc.aio.Channel:
        return self.server.node_channel(self.key, pem_chain(self.chain_der))

    async def batch_sign(self, items: list[tuple[str, bytes]]) -> node_pb2.BatchSignX509Response:
        async with self.channel() as channel:
            req = node_pb2.BatchSignX509Request(items=[node_pb2.X509SignItem(entry_id=e, csr=c) for e, c in items])
            return await node_pb2_grpc.NodeStub(channel).BatchSignX509(req, timeout=20)
