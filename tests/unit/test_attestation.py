"""Node attestation rules (join tokens, x509pop) over a real SQLite store and a real CA,
with the clock in the test's hand."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from trustmesh.controlplane.api.status import FailedPreconditionError, InvalidArgumentError, PermissionDeniedError
from trustmesh.controlplane.attestation import X509POP_CONTEXT, NodeAttestor
from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.ca.authority import CAConfig, CertificateAuthority
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.config import ServerConfig
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store import open_store
from trustmesh.controlplane.store.records import AttestedNode, JoinToken
from trustmesh.errors import NotFoundError
from trustmesh.keys import generate_private_key
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_csr, spiffe_id_from_certificate

TD = TrustDomain("example.org")
KEK = KeyEncryptionKey(bytes(range(32)))
T0 = 1_800_000_000.0
NodeKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _ca_cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> x509.Certificate:
    when = datetime.fromtimestamp(T0, timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(when - timedelta(hours=1))
        .not_valid_after(when + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


def _node_cert(
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    cn: str,
    key: NodeKey | None = None,
    key_usage: x509.KeyUsage | None = None,
) -> tuple[x509.Certificate, NodeKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    when = datetime.fromtimestamp(T0, timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(when - timedelta(hours=1))
        .not_valid_after(when + timedelta(hours=2))
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    return builder.sign(issuer[1], hashes.SHA256()), key


def _usage(digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(key: NodeKey, message: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH), hashes.SHA256())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class World:
    def __init__(
        self, rt: ServerRuntime, clock: Clock, node_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
    ) -> None:
        self.rt, self.clock, self.node_ca = rt, clock, node_ca
        self.attestor = NodeAttestor(rt)

    async def token(self, node: str, ttl: float = 600, secret: str | None = None) -> str:
        secret = secret or f"tmjt_{node}-{self.clock.now}"
        await self.rt.store.create_join_token(
            JoinToken(
                token_hash=hashlib.sha256(secret.encode()).hexdigest(),
                node_name=node,
                expires_at=self.clock.now + ttl,
                created_at=self.clock.now,
            )
        )
        return secret

    async def audit(self) -> list[tuple[str, str, str]]:
        return [(e.kind, e.outcome, str(e.details.get("reason", ""))) for e in await self.rt.store.list_audit_events()]

    async def failures_audited(self) -> list[int]:
        """Write the summaries of failed attestations still pending (as the server does when it
        stops); the counts of every failure event, in order."""
        stop = asyncio.Event()
        stop.set()
        await self.attestor.failures.run(stop)
        return [int(e.details["count"]) for e in await self.rt.store.list_audit_events() if e.outcome != "ok"]

    async def pop(
        self, cert_chain: list[x509.Certificate], key: NodeKey, sign_with: NodeKey | None = None
    ) -> AttestedNode:
        challenge = await self.attestor.x509pop_challenge([_der(c) for c in cert_chain])
        assert len(challenge.nonce) == 32
        signature = _sign(sign_with or key, X509POP_CONTEXT + challenge.nonce)
        return (await self.attestor.x509pop_finish(challenge, signature, build_csr(generate_private_key()))).node


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    node_ca = (_ca_cert("node CA", ca_key), ca_key)
    pem = tmp_path / "node-ca.pem"
    pem.write_bytes(node_ca[0].public_bytes(serialization.Encoding.PEM))
    store = await open_store("sqlite", tmp_path)
    clock = Clock()
    ca = await CertificateAuthority.load_or_create(
        CAConfig(trust_domain=TD, replica_id="r1"),
        store,
        KEK,
        clock=lambda: datetime.fromtimestamp(clock.now, timezone.utc),
    )
    config = ServerConfig(trust_domain=TD, data_dir=tmp_path, x509pop_ca=pem)
    rt = ServerRuntime(
        config=config, store=store, ca=ca, audit=AuditLog(store, KEK.derive("audit"), clock), clock=clock
    )
    yield World(rt, clock, node_ca)
    await store.close()


# --- join tokens ----------------------------------------------------------------------------


async def test_a_join_token_attests_once(world: World) -> None:
    key = generate_private_key()
    secret = await world.token("node-1")
    attested = await world.attestor.attest_join_token(secret, build_csr(key))
    assert str(attested.svid.spiffe_id) == "spiffe://example.org/agent/node-1"
    assert spiffe_id_from_certificate(attested.svid.leaf) == SpiffeId.parse("spiffe://example.org/agent/node-1")
    assert attested.svid.leaf.public_key() == key.public_key()
    node = await world.rt.store.get_attested_node("spiffe://example.org/agent/node-1")
    assert tuple(map(str, node.selectors)) == ("join_token:node:node-1", "node:name:node-1")
    assert node.attestation_type == "join_token" and not node.banned
    assert node.cert_serial == format(attested.svid.leaf.serial_number, "x")
    assert attested.node.revision == node.revision > 0, "the caller needs the revision for later CAS writes"
    assert await world.rt.store.list_join_tokens() == []
    with pytest.raises(PermissionDeniedError, match="unknown or already used"):
        await world.attestor.attest_join_token(secret, build_csr(key))
    assert [a[:2] for a in await world.audit()] == [("node.attest", "ok"), ("node.attest", "denied")]


async def test_unknown_and_malformed_tokens_are_denied(world: World) -> None:
    with pytest.raises(PermissionDeniedError, match="unknown or already used.*trustmesh token create"):
        await world.attestor.attest_join_token("tmjt_never-issued", build_csr(generate_private_key()))
    with pytest.raises(PermissionDeniedError, match="missing or malformed"):
        await world.attestor.attest_join_token("", build_csr(generate_private_key()))
    with pytest.raises(PermissionDeniedError, match="missing or malformed"):
        await world.attestor.attest_join_token("x" * 1000, build_csr(generate_private_key()))
    # The first at once, the others summed (attest_failures.py).
    assert [a[1] for a in await world.audit()] == ["denied"]
    assert await world.failures_audited() == [1, 2]
    assert [a[1] for a in await world.audit()] == ["denied"] * 2


async def test_an_expired_token_is_denied_and_deleted(world: World) -> None:
    secret = await world.token("node-1", ttl=60)
    world.clock.now += 60 + 300
    with pytest.raises(PermissionDeniedError, match=r"join token expired 5m ago; .*--node node-1"):
        await world.attestor.attest_join_token(secret, build_csr(generate_private_key()))
    assert await world.rt.store.list_join_tokens() == []
    with pytest.raises(NotFoundError):
        await world.rt.store.get_attested_node("spiffe://example.org/agent/node-1")
    assert (await world.audit())[-1][:2] == ("node.attest", "denied")


async def test_an_attested_name_is_denied_and_the_token_is_kept(world: World) -> None:
    first = await world.token("node-1", secret="tmjt_first")
    second = await world.token("node-1", secret="tmjt_second")
    await world.attestor.attest_join_token(first, build_csr(generate_private_key()))
    with pytest.raises(PermissionDeniedError, match="already attested by another agent.*evict"):
        await world.attestor.attest_join_token(second, build_csr(generate_private_key()))
    assert len(await world.rt.store.list_join_tokens()) == 1, "a refused token must stay usable"
    # Once the operator evicts the old agent, the kept token admits the replacement host.
    await world.rt.store.delete_attested_node("spiffe://example.org/agent/node-1")
    await world.attestor.attest_join_token(second, build_csr(generate_private_key()))


async def test_a_banned_node_cannot_attest_again(world: World) -> None:
    await world.attestor.attest_join_token(await world.token("node-1", secret="a"), build_csr(generate_private_key()))
    node = await world.rt.store.get_attested_node("spiffe://example.org/agent/node-1")
    await world.rt.store.update_attested_node(AttestedNode(**{**node.__dict__, "banned": True}))
    with pytest.raises(PermissionDeniedError, match="node-1 is banned"):
        await world.attestor.attest_join_token(
            await world.token("node-1", secret="b"), build_csr(generate_private_key())
        )


async def test_a_bad_csr_is_invalid_and_spends_no_token(world: World) -> None:
    secret = await world.token("node-1")
    with pytest.raises(InvalidArgumentError, match="agent CSR refused"):
        await world.attestor.attest_join_token(secret, b"not a csr")
    rsa_csr = build_csr(rsa.generate_private_key(65537, 2048))
    with pytest.raises(InvalidArgumentError, match="agent CSR refused"):
        await world.attestor.attest_join_token(secret, rsa_csr)
    assert len(await world.rt.store.list_join_tokens()) == 1
    assert await world.failures_audited() == [1, 1]  # two reasons, one source: the first, then a summary
    assert [a[1] for a in await world.audit()] == ["invalid", "invalid"]
    await world.attestor.attest_join_token(secret, build_csr(generate_private_key()))


# --- x509pop --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ec", "ed25519", "rsa"])
async def test_x509pop_proof_with_each_key_type(world: World, kind: str) -> None:
    key: NodeKey
    if kind == "ec":
        key = ec.generate_private_key(ec.SECP384R1())
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(65537, 2048)
    cert, key = _node_cert(world.node_ca, f"node-{kind}", key)
    node = await world.pop([cert], key)
    assert str(node.spiffe_id) == f"spiffe://example.org/agent/node-{kind}"
    assert node.attestation_type == "x509pop"
    selectors = list(map(str, node.selectors))
    assert f"x509pop:subject:cn:node-{kind}" in selectors and f"node:name:node-{kind}" in selectors
    fingerprint = world.node_ca[0].fingerprint(hashes.SHA256()).hex()
    assert f"x509pop:ca:fingerprint:{fingerprint}" in selectors


async def test_x509pop_through_an_intermediate(world: World) -> None:
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = _ca_cert("rack CA", mid_key, world.node_ca)
    cert, key = _node_cert((mid, mid_key), "rack1-n1")
    assert (await world.pop([cert, mid], key)).node_name == "rack1-n1"
    with pytest.raises(PermissionDeniedError, match="does not chain"):
        await world.pop([cert], key)  # the intermediate is missing


async def test_x509pop_re_attestation_replaces_the_serial(world: World) -> None:
    cert, key = _node_cert(world.node_ca, "n1")
    first = await world.pop([cert], key)
    again = await world.pop([cert], key)
    assert again.cert_serial != first.cert_serial and again.created_at == first.created_at
    stored = await world.rt.store.get_attested_node(first.spiffe_id)
    assert stored.cert_serial == again.cert_serial
    await world.rt.store.update_attested_node(AttestedNode(**{**stored.__dict__, "banned": True}))
    with pytest.raises(PermissionDeniedError, match="banned"):
        await world.pop([cert], key)


async def test_x509pop_cannot_take_over_a_join_token_node(world: World) -> None:
    await world.attestor.attest_join_token(await world.token("n1"), build_csr(generate_private_key()))
    cert, key = _node_cert(world.node_ca, "n1")
    with pytest.raises(PermissionDeniedError, match="already attested"):
        await world.pop([cert], key)


async def test_x509pop_refusals(world: World) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    foreign, fkey = _node_cert((_ca_cert("other", other_key), other_key), "n1")
    with pytest.raises(PermissionDeniedError, match="does not chain"):
        await world.pop([foreign], fkey)
    cert, key = _node_cert(world.node_ca, "n1")
    with pytest.raises(PermissionDeniedError, match="did not prove"):
        await world.pop([cert], key, sign_with=ec.generate_private_key(ec.SECP256R1()))
    no_sign, nkey = _node_cert(world.node_ca, "n2", key_usage=_usage(False))
    with pytest.raises(PermissionDeniedError, match="digitalSignature"):
        await world.pop([no_sign], nkey)
    signing, skey = _node_cert(world.node_ca, "n3", key_usage=_usage(True))
    assert (await world.pop([signing], skey)).node_name == "n3"
    bad_name, bkey = _node_cert(world.node_ca, "no spaces/allowed")
    with pytest.raises(PermissionDeniedError, match="common name"):
        await world.pop([bad_name], bkey)
    with pytest.raises(PermissionDeniedError, match="not DER"):
        await world.attestor.x509pop_challenge([b"junk"])
    with pytest.raises(PermissionDeniedError, match="1 to 8"):
        await world.attestor.x509pop_challenge([])
    world.clock.now += 3 * 3600  # past the node certificate's not_after
    with pytest.raises(PermissionDeniedError, match="expired"):
        await world.pop([cert], key)
    assert sum(await world.failures_audited()) == 7
    outcomes = [a[1] for a in await world.audit()]
    assert outcomes.count("denied") == 2 and outcomes.count("ok") == 1


async def test_x509pop_is_off_without_a_node_ca(world: World) -> None:
    world.rt.config = ServerConfig(trust_domain=TD, data_dir=world.rt.config.data_dir)
    attestor = NodeAttestor(world.rt)
    cert, _ = _node_cert(world.node_ca, "n1")
    with pytest.raises(FailedPreconditionError, match="--x509pop-ca"):
        await attestor.x509pop_challenge([_der(cert)])
