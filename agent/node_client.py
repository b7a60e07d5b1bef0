"""The agent's connection to the control plane: one mTLS channel with the agent SVID.

grpcio clients cannot swap their certificate in place, so a renewed agent SVID means a new
channel. The old one is retired, not closed at once: a request in flight on it finishes;
it is closed after a grace period. Consumers that hold a long stream (sync) watch
`generation` and reopen their stream on the new channel. Several server addresses are tried
in turn (`failover`), and the channel to an address that failed is closed right away.

How the control plane looks from here is one metric, `trustmesh_agent_server_state{state}`
(`ServerState`). gRPC reports a server whose certificate does not chain to our roots as
merely UNAVAILABLE, so `server_untrusted` asks the server itself over plain TLS, and the
agent can say which of the two it is.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from cryptography import x509

from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.agent.attestation import AgentIdentity, channel
from trustmesh.hostport import split_host_port
from trustmesh.metrics import Registry
from trustmesh.naming import server_dns_name
from trustmesh.spiffeid import TrustDomain

RPC_TIMEOUT = 30.0
# Longer than any unary call's deadline, so closing a retired channel cancels nothing.
RETIRE_GRACE = RPC_TIMEOUT + 5.0
PROBE_TIMEOUT = 5.0
# connected: the sync stream runs; unreachable: no server answers; untrusted: a server
# answers but its certificate does not chain to our trust bundle; banned: the server
# refuses this agent (banned, evicted, or its identity in use elsewhere).
STATES = ("connected", "unreachable", "untrusted", "banned")


class ServerState:
    """The agent's view of the control plane: `trustmesh_agent_server_state{state}` is 1 for
    the current state and 0 for the others. Shared by attestation and the sync stream."""

    def __init__(self, metrics: Registry) -> None:
        self._gauge = metrics.gauge("trustmesh_agent_server_state", "1 for the agent's current state", ["state"])
        self.state = ""
        self.set("unreachable")

    def set(self, state: str) -> bool:
        """Move to `state`; True when that is a change (worth one log line)."""
        if state == self.state:
            return False
        if state not in STATES:
            raise ValueError(f"unknown server state {state!r}")
        self.state = state
        for s in STATES:
            self._gauge.set(1 if s == state else 0, state=s)
        return True


async def server_untrusted(address: str, roots_pem: bytes, td: TrustDomain,
                           timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the server at `address` fails verification against `roots_pem`, or None when it
    passes (or cannot be reached at all, which is another problem). The same checks as the
    agent's gRPC channels: the chain, and the name reserved for the server of `td`."""
    context = ssl.create_default_context(cadata=roots_pem.decode("ascii", errors="replace"))
    try:
        host, port = split_host_port(address)
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=server_dns_name(td)), timeout)
    except ssl.SSLCertVerificationError as err:
        return str(err.verify_message or err.reason or err)
    except (OSError, ValueError, asyncio.TimeoutError):
        return None  # refused, reset, timed out, or the handshake failed for another reason
    writer.close()
    return None


def untrusted_message(bundle: Path, from_server: bool) -> str:
    """What to do about a server that our trust bundle does not trust (`bundle`: the file the
    roots came from; `from_server`: the copy kept in the data directory, not the flag's)."""
    if from_server:
        return (f"the server's certificate does not chain to the trust bundle {bundle} (kept from the server); "
                f"check --server, or remove {bundle} to start again from --trust-bundle")
    return f"the server's certificate does not chain to the trust bundle {bundle}; check --trust-bundle"


class NodeClient:
    def __init__(self, servers: Sequence[str], roots_pem: bytes, td: TrustDomain, identity: AgentIdentity,
                 *, retire_grace: float = RETIRE_GRACE, bundle_path: Path | None = None,
                 bundle_from_server: bool = True) -> None:
        if not servers:
            raise ValueError("at least one --server address is needed")
        self._servers = list(servers)
        self._index = 0
        self._roots_pem = roots_pem
        self._td = td
        self._identity = identity
        self._retire_grace = retire_grace
        self._channel: grpc.aio.Channel | None = None
        self._retired: list[tuple[grpc.aio.Channel, float]] = []  # (channel, close at, monotonic)
        self._generation = 0
        self._new_channel = asyncio.Event()
        self._bundle_path = bundle_path
        self._bundle_from_server = bundle_from_server

    # --- state ------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._servers[self._index]

    @property
    def identity(self) -> AgentIdentity:
        return self._identity

    @property
    def generation(self) -> int:
        """Increases whenever the credentials or the address change (a new channel is due)."""
        return self._generation

    async def wait_new_generation(self, after: int) -> int:
        while self._generation <= after:
            await self._new_channel.wait()
        return self._generation

    def trust_roots(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self._roots_pem)

    def stub(self) -> node_pb2_grpc.NodeStub:
        if self._channel is None:
            self._channel = channel(self.address, self._roots_pem, self._td, self._identity)
        return node_pb2_grpc.NodeStub(self._channel)

    def _next_generation(self, grace: float) -> None:
        if self._channel is not None:
            self._retired.append((self._channel, time.monotonic() + grace))
            self._channel = None
        self._generation += 1
        event, self._new_channel = self._new_channel, asyncio.Event()
        event.set()

    def use_identity(self, identity: AgentIdentity) -> None:
        self._identity = identity
        self._next_generation(self._retire_grace)

    def use_roots(self, roots_pem: bytes) -> None:
        if roots_pem != self._roots_pem:
            self._roots_pem = roots_pem
            self._next_generation(self._retire_grace)

    async def untrusted(self) -> str | None:
        """Why the current server fails verification against our roots (see
        `server_untrusted`); None when it does not."""
        return await server_untrusted(self.address, self._roots_pem, self._td)

    @property
    def untrusted_message(self) -> str:
        if self._bundle_path is None:
            return "the server's certificate does not chain to the agent's trust bundle"
        return untrusted_message(self._bundle_path, self._bundle_from_server)

    def failover(self) -> None:
        """Move to the next address; the failed channel is closed at the next tick."""
        self._index = (self._index + 1) % len(self._servers)
        self._next_generation(0.0)

    # --- calls --------------------------------------------------------------------------------

    async def batch_sign(self, items: list[tuple[str, bytes]]) -> list[node_pb2.X509SignResult]:
        req = node_pb2.BatchSignX509Request(items=[node_pb2.X509SignItem(entry_id=e, csr=c) for e, c in items])
        reply = await self.stub().BatchSignX509(req, timeout=RPC_TIMEOUT)
        return list(reply.results)

    async def sign_jwt(self, entry_id: str, audiences: list[str]) -> node_pb2.SignJWTResponse:
        reply: node_pb2.SignJWTResponse = await self.stub().SignJWT(
            node_pb2.SignJWTRequest(entry_id=entry_id, audiences=audiences), timeout=RPC_TIMEOUT)
        return reply

    async def renew_agent(self, csr: bytes) -> Sequence[bytes]:
        reply = await self.stub().RenewAgent(node_pb2.RenewAgentRequest(csr=csr), timeout=RPC_TIMEOUT)
        return list(reply.svid_chain)

    # --- lifecycle ------------------------------------------------------------------------------

    async def close_retired(self, now: float | None = None) -> int:
        """Close retired channels whose grace has passed; return how many."""
        now = time.monotonic() if now is None else now
        due = [ch for ch, at in self._retired if at <= now]
        self._retired = [(ch, at) for ch, at in self._retired if at > now]
        for ch in due:
            await ch.close()
        return len(due)

    async def run(self) -> None:
        """Close retired channels as their grace ends, so rotations and failovers leak none."""
        while True:
            await self.close_retired()
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        retired, self._retired = self._retired, []
        for ch, _ in retired:
            await ch.close()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
