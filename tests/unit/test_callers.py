"""Who calls on each listener: the authenticators of the call layer over real TLS.

A real grpc.aio server per listener shape (mTLS, TLS without client certificate, unix
socket) with the CallLayer and the listener's authenticator; clients present real
X509-SVIDs. The node records behind `agents()` are a small in-memory stand-in for the
registry view (the AgentAuthenticator protocol), with the same refusals.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, node_pb2, node_pb2_grpc
from trustmesh.controlplane.api import callers
from trustmesh.controlplane.api.calls import (
    ANONYMOUS_CALLER,
    Authenticator,
    CallerKind,
    CallLayer,
    DenialHook,
    current_caller,
)
from trustmesh.controlplane.api.local_socket import AdminSocket
from trustmesh.controlplane.api.peer import PeerAgent
from trustmesh.controlplane.store.records import AttestedNode
from trustmesh.errors import PermissionDeniedError
from trustmesh.keys import PrivateKey, generate_private_key
from trustmesh.metrics import Registry
from trustmesh.naming import server_dns_name
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_ca_certificate, build_leaf_certificate

TD = TrustDomain("example.org")
NOW = datetime.now(timezone.utc)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Pki:
    key: PrivateKey = field(default_factory=generate_private_key)
    root: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.root = build_ca_certificate(trust_domain=TD, public_key=self.key.public_key(), issuer=None,
                                         issuer_key=self.key, not_before=NOW - timedelta(hours=1),
                                         not_after=NOW + timedelta(days=1), path_length=1, common_name="root")

    def svid(self, sid: str, dns: tuple[str, ...] = (), admin_entry: str = "") -> tuple[bytes, bytes, x509.Certificate]:
        key = generate_private_key()
        cert = build_leaf_certificate(spiffe_id=SpiffeId.parse(sid), public_key=key.public_key(), issuer=self.root,
                                      issuer_key=self.key, not_before=NOW - timedelta(minutes=1),
                                      not_after=NOW + timedelta(hours=1), dns_names=dns, admin_entry=admin_entry)
        return _key_pem(key), _pem(cert), cert


@dataclass
class Records:
    """Node records as the registry view keeps them: attested agents, some banned."""

    nodes: dict[str, AttestedNode] = field(default_factory=dict)

    def authenticate(self, peer: PeerAgent) -> AttestedNode:
        node = self.nodes.get(peer.id)
        if node is None:
            raise PermissionDeniedError(f"agent {peer.id} is not attested; attest with a join token")
        if node.banned:
            raise PermissionDeniedError(f"agent {peer.id} is banned")
        return node


class Seen(node_pb2_grpc.NodeServicer, admin_pb2_grpc.AdminServicer):
    """Answers a few methods of both services and remembers who called."""

    def __init__(self) -> None:
        self.callers: list[Any] = []

    async def BatchSignX509(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.callers.append(callers.current_agent())
        return node_pb2.BatchSignX509Response()

    async def Attest(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self.callers.append(current_caller())
        yield node_pb2.AttestResponse()

    async def ListEntries(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.callers.append(current_caller())
        return admin_pb2.ListEntriesResponse()


@dataclass
class Listener:
    server: grpc.aio.Server
    seen: Seen
    address: str


async def listen(pki: Pki, authenticate: Authenticator, *, client_cert: bool | None,
                 on_denied: DenialHook | None = None, socket: Path | None = None) -> Listener:
    """client_cert: True mTLS, False TLS without client certificates, None the unix socket."""
    seen = Seen()
    server = grpc.aio.server(interceptors=[CallLayer(authenticate, Registry(), on_denied=on_denied)],
                             options=[("grpc.so_reuseport", 0)])
    node_pb2_grpc.add_NodeServicer_to_server(seen, server)
    admin_pb2_grpc.add_AdminServicer_to_server(seen, server)
    if client_cert is None:
        assert socket is not None
        address = f"unix:{socket}"
        server.add_insecure_port(address)
    else:
        key, chain, _ = pki.svid("spiffe://example.org/trustmesh/server", (server_dns_name(TD),))
        creds = grpc.ssl_server_credentials([(key, chain)], _pem(pki.root), require_client_auth=client_cert)
        address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', creds)}"
    await server.start()
    return Listener(server, seen, address)


def channel(pki: Pki, listener: Listener, client: tuple[bytes, bytes, x509.Certificate] | None) -> grpc.aio.Channel:
    if listener.address.startswith("unix:"):
        return grpc.aio.insecure_channel(listener.address)
    creds = grpc.ssl_channel_credentials(_pem(pki.root), client[0] if client else None,
                                         client[1] if client else None)
    return grpc.aio.secure_channel(listener.address, creds,
                                   options=[("grpc.ssl_target_name_override", server_dns_name(TD))])


async def batch_sign(pki: Pki, listener: Listener, client: tuple[bytes, bytes, x509.Certificate] | None) -> Any:
    async with channel(pki, listener, client) as ch:
        return await node_pb2_grpc.NodeStub(ch).BatchSignX509(node_pb2.BatchSignX509Request(), timeout=10)


async def list_entries(pki: Pki, listener: Listener, client: tuple[bytes, bytes, x509.Certificate] | None) -> Any:
    async with channel(pki, listener, client) as ch:
        return await admin_pb2_grpc.AdminStub(ch).ListEntries(admin_pb2.ListEntriesRequest(), timeout=10)


async def attest(pki: Pki, listener: Listener, client: tuple[bytes, bytes, x509.Certificate] | None) -> Any:
    async with channel(pki, listener, client) as ch:
        call = node_pb2_grpc.NodeStub(ch).Attest(iter([node_pb2.AttestRequest()]), timeout=10)
        return [r async for r in call]


def node(sid: str, cert: x509.Certificate, *, banned: bool = False) -> AttestedNode:
    return AttestedNode(spiffe_id=sid, node_name=sid.rsplit("/", 1)[1], attestation_type="join_token",
                        cert_serial=format(cert.serial_number, "x"),
                        cert_not_after=cert.not_valid_after_utc.timestamp(), banned=banned,
                        created_at=1.0, updated_at=1.0)


async def test_the_node_listener_serves_attested_agents_only() -> None:
    pki = Pki()
    agent = pki.svid("spiffe://example.org/agent/node-1")
    banned = pki.svid("spiffe://example.org/agent/node-2")
    stranger = pki.svid("spiffe://example.org/agent/node-3")
    workload = pki.svid("spiffe://example.org/ledger")
    records = Records({"spiffe://example.org/agent/node-1": node("spiffe://example.org/agent/node-1", agent[2]),
                       "spiffe://example.org/agent/node-2": node("spiffe://example.org/agent/node-2", banned[2],
                                                                 banned=True)})
    listener = await listen(pki, callers.agents(TD, records), client_cert=True)
    try:
        await batch_sign(pki, listener, agent)
        [seen] = listener.seen.callers
        assert seen.peer == PeerAgent(SpiffeId.parse("spiffe://example.org/agent/node-1"),
                                      format(agent[2].serial_number, "x"), agent[2].not_valid_after_utc.timestamp(),
                                      "127.0.0.1")  # the address the call came from, without its port
        assert seen.node is records.nodes["spiffe://example.org/agent/node-1"]
        for client, words in ((banned, "is banned"), (stranger, "is not attested"), (workload, "only agents")):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await batch_sign(pki, listener, client)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and words in (info.value.details() or "")
        # Agents attest on the attestation listener, never over their mTLS connection.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await attest(pki, listener, agent)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--attest-bind" in (info.value.details()
                                                                                               or "")
        assert len(listener.seen.callers) == 1
    finally:
        await listener.server.stop(None)


async def test_without_a_client_certificate_an_agent_call_is_unauthenticated() -> None:
    pki = Pki()
    listener = await listen(pki, callers.agents(TD, Records()), client_cert=False)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await batch_sign(pki, listener, None)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "attest first" in (info.value.details() or "")
    finally:
        await listener.server.stop(None)


async def test_the_attestation_listener_serves_anonymous_attest_only() -> None:
    pki = Pki()
    listener = await listen(pki, callers.anonymous, client_cert=False)
    try:
        assert await attest(pki, listener, None) == [node_pb2.AttestResponse()]
        assert listener.seen.callers == [replace(ANONYMOUS_CALLER, source="127.0.0.1")]
        for call in (batch_sign, list_entries):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(pki, listener, None)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await listener.server.stop(None)


@dataclass
class Audit:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def record(self, kind: str, *, actor: str, subject: str = "", outcome: str = "ok",
                     **details: Any) -> object:
        self.events.append((kind, {"actor": actor, "subject": subject, "outcome": outcome, **details}))
        return None


@dataclass
class Admins:
    entries: dict[str, str]  # admin entry id -> its SPIFFE ID

    def is_admin_entry(self, entry_id: str, spiffe_id: str) -> bool:
        return self.entries.get(entry_id) == spiffe_id


async def test_the_remote_admin_listener_serves_admin_entries_and_audits_the_others() -> None:
    pki = Pki()
    admin = pki.svid("spiffe://example.org/ops", admin_entry="e-ops")
    plain = pki.svid("spiffe://example.org/web")
    audit = Audit()
    listener = await listen(pki, callers.remote_admins(TD, Admins({"e-ops": "spiffe://example.org/ops"})),
                            client_cert=True, on_denied=callers.audit_admin_denials(audit))
    try:
        await list_entries(pki, listener, admin)
        assert [c.id for c in listener.seen.callers] == ["admin:spiffe://example.org/ops"]
        assert not audit.events
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_entries(pki, listener, plain)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (info.value.details() or "").startswith("spiffe://example.org/web may not use the admin API")
        assert audit.events == [("admin.call", {"actor": "spiffe://example.org/web", "subject": "ListEntries",
                                                "outcome": "denied",
                                                "reason": "its SVID was not issued from an entry marked admin"})]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await batch_sign(pki, listener, admin)  # an admin is no agent
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert len(listener.seen.callers) == 1
    finally:
        await listener.server.stop(None)


async def test_the_admin_socket_names_the_caller_by_its_uid(tmp_path: Path) -> None:
    seen = Seen()
    sock = AdminSocket(tmp_path / "admin.sock")
    server = grpc.aio.server(interceptors=[CallLayer(callers.local_admins(sock), Registry())],
                             options=[("grpc.so_reuseport", 0)])
    node_pb2_grpc.add_NodeServicer_to_server(seen, server)
    admin_pb2_grpc.add_AdminServicer_to_server(seen, server)
    await sock.start(server)
    listener = Listener(server, seen, f"unix:{tmp_path / 'admin.sock'}")
    try:
        assert stat.S_IMODE((tmp_path / "admin.sock").stat().st_mode) == 0o600
        await list_entries(Pki(), listener, None)
        [caller] = seen.callers
        assert (caller.kind, caller.id, caller.source) == (CallerKind.LOCAL_ADMIN, f"local-root (uid {os.getuid()})",
                                                           f"pid {os.getpid()}")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await batch_sign(Pki(), listener, None)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Around the socket, straight to the gRPC server behind it: nobody the kernel named.
        around = Listener(server, seen, f"unix:{sock._inner}")  # noqa: SLF001
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_entries(Pki(), around, None)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(None)
        await sock.close()
    assert not (tmp_path / "admin.sock").exists()