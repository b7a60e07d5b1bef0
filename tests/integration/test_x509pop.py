"""x509pop node attestation against the real server: proof of possession of a node key."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.harness import ServerProcess
from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.keys import generate_private_key
from trustmesh.x509svid import build_csr

NOW = datetime.now(timezone.utc)


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - timedelta(hours=1))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return cert, key


def _node_cert(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


async def _attest(
    server: ServerProcess,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    sign_with: ec.EllipticCurvePrivateKey | None = None,
) -> node_pb2.AttestResult:
    async with server.node_channel() as channel:
        call = node_pb2_grpc.NodeStub(channel).Attest(timeout=20)
        csr = build_csr(generate_private_key())
        await call.write(
            node_pb2.AttestRequest(
                csr=csr, x509pop=node_pb2.X509PopEvidence(cert_chain=[cert.public_bytes(serialization.Encoding.DER)])
            )
        )
        challenge = await call.read()
        nonce = challenge.challenge.nonce
        assert len(nonce) == 32
        signature = (sign_with or key).sign(b"trustmesh-x509pop-v1:" + nonce, ec.ECDSA(hashes.SHA256()))
        await call.write(
            node_pb2.AttestRequest(challenge_response=node_pb2.X509PopChallengeResponse(signature=signature))
        )
        await call.done_writing()
        reply = await call.read()
        return reply.result


@pytest.fixture
def pop_server(make_server: Callable[..., ServerProcess], tmp_path: Path) -> tuple[ServerProcess, tuple]:  # type: ignore[type-arg]
    ca, ca_key = _ca("node CA")
    pem = tmp_path / "node-ca.pem"
    pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return make_server(extra=["--x509pop-ca", str(pem)]), (ca, ca_key)


async def test_x509pop_attests_and_re_attests(pop_server: tuple) -> None:  # type: ignore[type-arg]
    server, (ca, ca_key) = pop_server
    cert, key = _node_cert(ca, ca_key, "rack1-node7")
    result = await _attest(server, cert, key)
    assert result.spiffe_id == "spiffe://example.org/agent/rack1-node7"
    again = await _attest(server, cert, key)  # no human needed for the second time
    assert again.spiffe_id == result.spiffe_id and again.svid_chain[0] != result.svid_chain[0]
    agents = server.cli("agent", "list", "--json", check=True).stdout
    assert "x509pop:subject:cn" in agents or "subject:cn:rack1-node7" in agents


async def test_x509pop_refuses_foreign_certs_and_wrong_proofs(pop_server: tuple) -> None:  # type: ignore[type-arg]
    server, (ca, ca_key) = pop_server
    other_ca, other_key = _ca("another CA")
    cert, key = _node_cert(other_ca, other_key, "intruder")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with server.node_channel() as channel:
            call = node_pb2_grpc.NodeStub(channel).Attest(timeout=20)
            await call.write(
                node_pb2.AttestRequest(
                    csr=build_csr(generate_private_key()),
                    x509pop=node_pb2.X509PopEvidence(cert_chain=[cert.public_bytes(serialization.Encoding.DER)]),
                )
            )
            await call.read()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "does not chain" in info.value.details()
    good, good_key = _node_cert(ca, ca_key, "node-8")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _attest(server, good, good_key, sign_with=ec.generate_private_key(ec.SECP256R1()))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "did not prove" in info.value.details()


async def test_x509pop_is_off_unless_configured(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server()
    ca, ca_key = _ca("node CA")
    cert, key = _node_cert(ca, ca_key, "node-1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _attest(server, cert, key)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--x509pop-ca" in info.value.details()
