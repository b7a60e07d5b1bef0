"""The agent's connection to the control plane: one mTLS channel with the agent SVID.

grpcio clients cannot swap their certificate in place, so a renewed agent SVID means a new
channel; several server addresses are tried in turn (`failover`).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.spiffeid import TrustDomain

from agent.attestation import AgentIdentity, channel


class NodeClient:
    def __init__(self, servers: Sequence[str], roots_pem: bytes, td: TrustDomain, identity: AgentIdentity) -> None:
        if not servers:
            raise ValueError("at least one --server address is needed")
        self._servers = list(servers)
        self._index = 0
        self._roots_pem = roots_pem
        self._td = td
        self.identity = identity
        self._channel: grpc.aio.Channel | None = None
        self._old: list[grpc.aio.Channel] = []

    @property
    def address(self) -> str:
        return self._servers[self._index]

    def stub(self) -> node_pb2_grpc.NodeStub:
        if self._channel is None:
            self._channel = channel(self.address, self._roots_pem, self._td, self.identity)
        return node_pb2_grpc.NodeStub(self._channel)

    def _drop_channel(self) -> None:
        if self._channel is not None:
            # Streams opened on it keep running until they end; close it with the client.
            self._old.append(self._channel)
            self._channel = None

    def use_identity(self, identity: AgentIdentity) -> None:
        self.identity = identity
        self._drop_channel()

    def use_roots(self, roots_pem: bytes) -> None:
        if roots_pem != self._roots_pem:
            self._roots_pem = roots_pem
            self._drop_channel()

    def failover(self) -> None:
        self._index = (self._index + 1) % len(self._servers)
        self._drop_channel()

    async def batch_sign(self, items: list[tuple[str, bytes]]) -> list[node_pb2.X509SignResult]:
        req = node_pb2.BatchSignX509Request(items=[node_pb2.X509SignItem(entry_id=e, csr=c) for e, c in items])
        reply = await self.stub().BatchSignX509(req, timeout=30)
        return list(reply.results)

    async def sign_jwt(self, entry_id: str, audiences: list[str]) -> node_pb2.SignJWTResponse:
        return await self.stub().SignJWT(node_pb2.SignJWTRequest(entry_id=entry_id, audiences=audiences), timeout=30)

    async def close(self) -> None:
        for ch in [*self._old, *([self._channel] if self._channel else [])]:
            await ch.close()
        self._old.clear()
        self._channel = None
