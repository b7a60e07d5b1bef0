"""The agent's own identity: attest once, keep it on disk, renew it before half-life.

The agent SVID and its key live in the data directory (directory 0700, key 0600, written
atomically) so a restarted agent re-attaches without a new join token. The trust bundle
the server returns is kept there too, so a rotated root is trusted after a restart.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from agent.convert import bundle_from_pb
from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.bundle import Bundle
from trustmesh.errors import TrustmeshError, VerificationError
from trustmesh.keys import PrivateKey, generate_private_key
from trustmesh.naming import server_dns_name
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_csr, spiffe_id_from_certificate, verify_x509_svid

SVID_FILE = "agent_svid.pem"
KEY_FILE = "agent_key.pem"
BUNDLE_FILE = "bundle.pem"
X509POP_CONTEXT = b"trustmesh-x509pop-v1:"


class AgentAttestationError(TrustmeshError):
    """The agent has no usable identity and could not get one."""


class TokenRefusedError(AgentAttestationError):
    """The server refused the join token or x509pop evidence."""


@dataclass(frozen=True)
class AgentIdentity:
    spiffe_id: SpiffeId
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]

    @property
    def expires_at(self) -> datetime:
        return self.chain[0].not_valid_after_utc

    @property
    def issued_at(self) -> datetime:
        return self.chain[0].not_valid_before_utc

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically (temp file in the same directory, fsync, rename) with `mode`."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def trust_domain_of_roots(roots: list[x509.Certificate]) -> TrustDomain:
    for root in roots:
        try:
            return spiffe_id_from_certificate(root).trust_domain
        except VerificationError:
            continue
    raise AgentAttestationError("the trust bundle has no root with a SPIFFE ID (spiffe://<trust domain>); "
                                "pass the bundle.pem the server wrote")


def load_roots(path: Path) -> list[x509.Certificate]:
    try:
        roots = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as err:
        raise AgentAttestationError(f"cannot read the trust bundle {path}: {err}") from err
    return roots


def save_identity(data_dir: Path, identity: AgentIdentity) -> None:
    write_private(data_dir / KEY_FILE, identity.key_pem(), 0o600)
    write_private(data_dir / SVID_FILE, identity.chain_pem(), 0o644)


def save_bundle(data_dir: Path, bundle: Bundle) -> None:
    if bundle.x509_authorities:
        write_private(data_dir / BUNDLE_FILE, bundle.x509_authorities_pem(), 0o644)


def load_identity(data_dir: Path, roots: list[x509.Certificate], td: TrustDomain,
                  now: datetime | None = None) -> AgentIdentity | None:
    """The stored identity, if present, unexpired and chaining to the bundle."""
    svid_path, key_path = data_dir / SVID_FILE, data_dir / KEY_FILE
    if not svid_path.exists() or not key_path.exists():
        return None
    try:
        chain = tuple(x509.load_pem_x509_certificates(svid_path.read_bytes()))
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        spiffe_id = verify_x509_svid(chain, {td: roots}, now=now)
    except (ValueError, VerificationError):
        return None
    if chain[0].public_key() != key.public_key():
        return None
    return AgentIdentity(spiffe_id, key, chain)  # type: ignore[arg-type]


def _credentials(roots_pem: bytes, identity: AgentIdentity | None = None) -> grpc.ChannelCredentials:
    if identity is None:
        return grpc.ssl_channel_credentials(root_certificates=roots_pem)
    return grpc.ssl_channel_credentials(root_certificates=roots_pem, private_key=identity.key_pem(),
                                        certificate_chain=identity.chain_pem())


def channel(address: str, roots_pem: bytes, td: TrustDomain, identity: AgentIdentity | None = None) -> grpc.aio.Channel:
    # grpcio cannot check a SPIFFE ID during the handshake; the server's certificate carries
    # a DNS name reserved for it, which the server refuses to register for any workload.
    return grpc.aio.secure_channel(address, _credentials(roots_pem, identity),
                                   options=[("grpc.ssl_target_name_override", server_dns_name(td))])


async def attest(addresses: tuple[str, ...], roots_pem: bytes, td: TrustDomain, *, join_token: str | None = None,
                 x509pop: tuple[list[x509.Certificate], PrivateKey] | None = None) -> tuple[AgentIdentity, Bundle]:
    """Attest with a join token or x509pop, trying each address in turn."""
    key = await asyncio.to_thread(generate_private_key)
    csr = await asyncio.to_thread(build_csr, key)
    last_error: Exception | None = None
    for address in addresses:
        try:
            async with channel(address, roots_pem, td) as ch:
                call = node_pb2_grpc.NodeStub(ch).Attest(timeout=30)
                if join_token is not None:
                    await call.write(node_pb2.AttestRequest(csr=csr, join_token=join_token))
                elif x509pop is not None:
                    certs, node_key = x509pop
                    await call.write(node_pb2.AttestRequest(csr=csr, x509pop=node_pb2.X509PopEvidence(
                        cert_chain=[c.public_bytes(serialization.Encoding.DER) for c in certs])))
                    challenge = await call.read()
                    signature = _sign_challenge(node_key, X509POP_CONTEXT + challenge.challenge.nonce)
                    await call.write(node_pb2.AttestRequest(
                        challenge_response=node_pb2.X509PopChallengeResponse(signature=signature)))
                else:
                    raise AgentAttestationError("no join token and no x509pop credentials to attest with")
                await call.done_writing()
                reply = await call.read()
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.FAILED_PRECONDITION):
                raise TokenRefusedError(f"the server refused attestation: {err.details()}") from err
            last_error = err
            continue
        result = reply.result
        chain = tuple(x509.load_der_x509_certificate(d) for d in result.svid_chain)
        return AgentIdentity(SpiffeId.parse(result.spiffe_id), key, chain), bundle_from_pb(result.bundle)
    raise AgentAttestationError(f"no server reachable for attestation at {', '.join(addresses)}: {last_error}")


def _sign_challenge(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH), hashes.SHA256())
    raise AgentAttestationError(f"unsupported x509pop key type {type(key).__name__}")


async def renew(stub: node_pb2_grpc.NodeStub, identity: AgentIdentity) -> AgentIdentity:
    key = await asyncio.to_thread(generate_private_key)
    csr = await asyncio.to_thread(build_csr, key)
    reply = await stub.RenewAgent(node_pb2.RenewAgentRequest(csr=csr), timeout=30)
    chain = tuple(x509.load_der_x509_certificate(d) for d in reply.svid_chain)
    return AgentIdentity(identity.spiffe_id, key, chain)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
