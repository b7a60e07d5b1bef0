"""The agent's own identity: attest once, keep it on disk, renew it before half-life.

The agent SVID and its key live in the data directory (directory 0700, key 0600, written
atomically) so a restarted agent re-attaches without a new join token. The trust bundle
the server returns is kept there too, so a rotated root is trusted after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.agent.config import RotationConfig
from trustmesh.backoff import backoff_delay, renew_at, seconds_until
from trustmesh.bundle import Bundle
from trustmesh.clock import Clock, utc_now
from trustmesh.errors import TrustmeshError, VerificationError
from trustmesh.files import atomic_write
from trustmesh.keys import PrivateKey, generate_private_key
from trustmesh.logs import log_event
from trustmesh.metrics import Registry
from trustmesh.naming import server_dns_name
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.wire import bundle_from_pb
from trustmesh.x509svid import build_csr, spiffe_id_from_certificate, verify_x509_svid

log = logging.getLogger("trustmesh.agent.attestation")

SVID_FILE = "agent_svid.pem"
KEY_FILE = "agent_key.pem"
BUNDLE_FILE = "bundle.pem"
# Others may traverse to the public files (SVID, bundle); the key inside is 0600.
DATA_DIR_MODE = 0o711
X509POP_CONTEXT = b"trustmesh-x509pop-v1:"


class AgentAttestationError(TrustmeshError):
    """The agent has no usable identity and could not get one."""


class TokenRefusedError(AgentAttestationError):
    """The server refused the join token or x509pop evidence."""


class AttestServerUnreachableError(AgentAttestationError):
    """No attestation address answered; worth retrying (the token is not spent)."""


NO_IDENTITY_HINT = ("start it once with --join-token (create one with `trustmesh token create --node NAME`) "
                    "or with --x509pop-cert/--x509pop-key")


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


def trust_domain_of_roots(roots: list[x509.Certificate]) -> TrustDomain:
    for root in roots:
        try:
            return spiffe_id_from_certificate(root).trust_domain
        except VerificationError:
            continue
    raise AgentAttestationError("the trust bundle has no root with a SPIFFE ID (spiffe://<trust domain>); "
                                "pass the bundle.pem the server wrote, and --trust-domain when the mesh's root "
                                "is signed by an upstream CA (the bundle is then that CA's root)")


def has_spiffe_id(cert: x509.Certificate) -> bool:
    """True when the certificate names a SPIFFE ID (a trustmesh root does, a bank's root does not)."""
    try:
        spiffe_id_from_certificate(cert)
    except VerificationError:
        return False
    return True


def load_roots(path: Path) -> list[x509.Certificate]:
    try:
        roots = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as err:
        raise AgentAttestationError(f"cannot read the trust bundle {path}: {err}") from err
    return roots


def save_identity(data_dir: Path, identity: AgentIdentity) -> None:
    data_dir.mkdir(parents=True, exist_ok=True, mode=DATA_DIR_MODE)
    atomic_write(data_dir / KEY_FILE, identity.key_pem(), 0o600)
    atomic_write(data_dir / SVID_FILE, identity.chain_pem(), 0o644)


def save_bundle(data_dir: Path, bundle: Bundle) -> None:
    if bundle.x509_authorities:
        data_dir.mkdir(parents=True, exist_ok=True, mode=DATA_DIR_MODE)
        atomic_write(data_dir / BUNDLE_FILE, bundle.x509_authorities_pem(), 0o644)


def inspect_identity(data_dir: Path, roots: Sequence[x509.Certificate], td: TrustDomain,
                     now: datetime | None = None) -> tuple[AgentIdentity | None, str]:
    """The stored identity if it is usable, else None and why not (for an actionable error)."""
    svid_path, key_path = data_dir / SVID_FILE, data_dir / KEY_FILE
    if not svid_path.exists() or not key_path.exists():
        return None, "this agent has no identity yet"
    try:
        chain = tuple(x509.load_pem_x509_certificates(svid_path.read_bytes()))
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        return None, f"the stored agent identity in {data_dir} is unreadable ({err})"
    now = now or utc_now()
    if chain[0].not_valid_after_utc <= now:
        # The agent was stopped (or cut off) for longer than its SVID lives: a renewal needs
        # a valid SVID, so only a new attestation brings it back.
        return None, (f"the stored agent identity expired at {chain[0].not_valid_after_utc.isoformat()} "
                      "(the agent was down longer than its SVID lives)")
    try:
        spiffe_id = verify_x509_svid(chain, {td: list(roots)}, now=now)
    except VerificationError as err:
        return None, f"the stored agent identity does not verify against the trust bundle ({err})"
    if chain[0].public_key() != key.public_key():
        return None, "the stored agent key does not belong to the stored agent SVID"
    return AgentIdentity(spiffe_id, key, chain), ""  # type: ignore[arg-type]


def load_identity(data_dir: Path, roots: Sequence[x509.Certificate], td: TrustDomain,
                  now: datetime | None = None) -> AgentIdentity | None:
    """The stored identity, if present, unexpired, chaining to the bundle and matching its key."""
    return inspect_identity(data_dir, roots, td, now)[0]


def load_x509pop(cert_path: Path, key_path: Path) -> tuple[list[x509.Certificate], PrivateKey]:
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except (OSError, ValueError) as err:
        raise AgentAttestationError(f"cannot read the x509pop certificate chain {cert_path}: {err}") from err
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise AgentAttestationError(f"cannot read the x509pop key {key_path} (PEM, unencrypted): {err}") from err
    if certs[0].public_key() != key.public_key():
        raise AgentAttestationError(f"the x509pop key {key_path} does not belong to the first certificate "
                                    f"of {cert_path}")
    return certs, key  # type: ignore[return-value]


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


def _identity_from_reply(key: PrivateKey, chain_der: Sequence[bytes], roots: Sequence[x509.Certificate],
                         td: TrustDomain, expected: SpiffeId | None = None) -> AgentIdentity:
    """Check what the server returned before trusting it with our next calls."""
    try:
        chain = tuple(x509.load_der_x509_certificate(d) for d in chain_der)
        spiffe_id = verify_x509_svid(chain, {td: list(roots)})
    except (ValueError, VerificationError) as err:
        raise AgentAttestationError(f"the server returned an agent SVID that does not verify: {err}") from err
    if chain[0].public_key() != key.public_key():
        raise AgentAttestationError("the server returned an agent SVID for another key")
    if expected is not None and spiffe_id != expected:
        raise AgentAttestationError(f"the server renewed the agent as {spiffe_id}, not {expected}")
    return AgentIdentity(spiffe_id, key, chain)


async def attest(addresses: tuple[str, ...], roots_pem: bytes, td: TrustDomain, *, join_token: str | None = None,
                 x509pop: tuple[list[x509.Certificate], PrivateKey] | None = None) -> tuple[AgentIdentity, Bundle]:
    """Attest with a join token or x509pop, trying each address in turn.

    Raises TokenRefusedError when the server says no (retrying cannot help) and
    AttestServerUnreachableError when no address answered (retrying can)."""
    if join_token is None and x509pop is None:
        raise AgentAttestationError(f"this agent has no identity yet: {NO_IDENTITY_HINT}")
    key = await asyncio.to_thread(generate_private_key)
    csr = await asyncio.to_thread(build_csr, key)
    last_error: grpc.aio.AioRpcError | None = None
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
                    challenge = await _read(call)
                    signature = await asyncio.to_thread(_sign_challenge, node_key,
                                                        X509POP_CONTEXT + challenge.challenge.nonce)
                    await call.write(node_pb2.AttestRequest(
                        challenge_response=node_pb2.X509PopChallengeResponse(signature=signature)))
                await call.done_writing()
                reply = await _read(call)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED):
                how = "join token" if join_token is not None else "x509pop evidence"
                raise TokenRefusedError(f"the server refused the {how}: {err.details()}; create a new token with "
                                        "`trustmesh token create --node NAME`") from err
            last_error = err
            continue
        result = reply.result
        bundle = bundle_from_pb(result.bundle)
        roots = list(bundle.x509_authorities) or x509.load_pem_x509_certificates(roots_pem)
        return _identity_from_reply(key, result.svid_chain, roots, td), bundle
    detail = f"{last_error.code().name}: {last_error.details()}" if last_error is not None else "no address"
    raise AttestServerUnreachableError(f"no server reachable for attestation at {', '.join(addresses)} ({detail})")


async def _read(call: grpc.aio.StreamStreamCall) -> node_pb2.AttestResponse:
    message = await call.read()
    if message is grpc.aio.EOF:  # an error status would have raised AioRpcError instead
        raise AgentAttestationError("the server ended attestation without an answer")
    return cast(node_pb2.AttestResponse, message)


def _sign_challenge(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH), hashes.SHA256())
    raise AgentAttestationError(f"unsupported x509pop key type {type(key).__name__}")


# --- renewal --------------------------------------------------------------------------------


class RenewalClient(Protocol):
    """What renewal needs of the connection to the control plane."""

    @property
    def identity(self) -> AgentIdentity: ...

    def trust_roots(self) -> list[x509.Certificate]: ...

    async def renew_agent(self, csr: bytes) -> Sequence[bytes]: ...

    def use_identity(self, identity: AgentIdentity) -> None: ...


@dataclass(frozen=True)
class RenewerConfig:
    data_dir: Path
    rotation: RotationConfig = RotationConfig()


class AgentRenewer:
    """Renews the agent SVID around half-life (jittered), stores it, and hands it to the
    client, which opens a new channel with it (grpcio cannot swap a client cert in place)."""

    def __init__(self, config: RenewerConfig, client: RenewalClient, metrics: Registry,
                 clock: Clock = utc_now, rand: random.Random | None = None, *,
                 received_at: datetime | None = None) -> None:
        self._config = config
        self._received_at = received_at  # when the current identity arrived (its file's mtime)
        self._client = client
        self._clock = clock
        self._rand = rand or random.Random()
        self._renewals = metrics.counter("trustmesh_agent_svid_renewals_total", "agent SVID renewals by outcome",
                                         ["outcome"])
        self._expires = metrics.gauge("trustmesh_agent_svid_expiry_timestamp_seconds",
                                      "unix time the agent SVID expires")

    def _due(self, identity: AgentIdentity, received_at: datetime | None = None) -> datetime:
        # Measure the lifetime from when we received the SVID: the CA back-dates NotBefore
        # for clock skew, which with a short lifetime would put half-life in the past at once.
        start = identity.issued_at
        if received_at is not None:
            start = max(start, min(received_at, identity.expires_at))
        r = self._config.rotation
        return renew_at(start, identity.expires_at, rand=self._rand, low=r.renew_low, high=r.renew_high)

    async def renew_once(self) -> AgentIdentity:
        identity = self._client.identity
        key = await asyncio.to_thread(generate_private_key)
        csr = await asyncio.to_thread(build_csr, key, identity.spiffe_id)
        chain_der = await self._client.renew_agent(csr)
        fresh = _identity_from_reply(key, chain_der, self._client.trust_roots(), identity.spiffe_id.trust_domain,
                                     expected=identity.spiffe_id)
        # Disk first: if we die right after, the restart finds the newest identity.
        save_identity(self._config.data_dir, fresh)
        self._client.use_identity(fresh)
        return fresh

    async def run(self) -> None:
        rotation = self._config.rotation
        attempt = 0
        delay = seconds_until(self._due(self._client.identity, self._received_at), self._clock())
        while True:
            self._expires.set(self._client.identity.expires_at.timestamp())
            await asyncio.sleep(delay)
            try:
                fresh = await self.renew_once()
            except grpc.aio.AioRpcError as err:
                if err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    self._renewals.inc(outcome="refused")
                    log_event(log, "agent_refused", level=logging.ERROR, call="RenewAgent", code=err.code().name,
                              detail=err.details(), hint="the server refuses this agent (banned, evicted, or its "
                                                         "identity in use elsewhere: see detail); an operator must "
                                                         "re-admit it")
                    delay = rotation.refused_retry
                else:
                    self._renewals.inc(outcome="unreachable")
                    log_event(log, "agent_renewal_failed", level=logging.WARNING, code=err.code().name,
                              detail=err.details(), attempt=attempt,
                              expires_at=self._client.identity.expires_at.isoformat())
                    delay = backoff_delay(attempt, base=rotation.backoff_base, cap=rotation.backoff_cap,
                                          rand=self._rand)
                    attempt += 1
                continue
            except AgentAttestationError as err:
                self._renewals.inc(outcome="invalid")
                log_event(log, "agent_renewal_failed", level=logging.ERROR, error=str(err), attempt=attempt)
                delay = backoff_delay(attempt, base=rotation.backoff_base, cap=rotation.backoff_cap, rand=self._rand)
                attempt += 1
                continue
            attempt = 0
            self._renewals.inc(outcome="renewed")
            log_event(log, "agent_renewed", spiffe_id=fresh.spiffe_id, expires_at=fresh.expires_at.isoformat())
            delay = seconds_until(self._due(fresh, received_at=self._clock()), self._clock())
