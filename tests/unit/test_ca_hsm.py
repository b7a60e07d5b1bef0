"""CA keys in a real SoftHSM2 token, and an upstream authority above the mesh's root.

Every PKCS#11 test of this process shares one token (a PKCS#11 module reads its
configuration once per process); the server-level tests are in
tests/integration/test_hsm.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from tests.hsm import MODULE, PIN, SoftHsm, make_softhsm
from tests.pki import bank_ca_cert
from trustmesh.controlplane.ca.authority import CAConfig, CertificateAuthority
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.ca.keymanager import KeyManager
from trustmesh.controlplane.ca.pkcs11 import HsmKey, Pkcs11Token, is_reference, parse_pkcs11_uri
from trustmesh.controlplane.ca.upstream import UpstreamAuthority
from trustmesh.controlplane.store import Store, open_store
from trustmesh.errors import CAError
from trustmesh.jwtsvid import validate_jwt_svid
from trustmesh.keys import generate_private_key
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_csr, verify_x509_svid

TD = TrustDomain("example.org")
LEDGER = SpiffeId.parse("spiffe://example.org/ledger")
KEK = KeyEncryptionKey(bytes(range(32)))
NOW = datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    hsm = make_softhsm(tmp_path_factory.mktemp("softhsm"))
    before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    yield hsm
    if before is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = before


@pytest.fixture(scope="module")
def token(softhsm: SoftHsm) -> Iterator[Pkcs11Token]:
    t = Pkcs11Token(MODULE, softhsm.label, PIN)
    yield t
    t.close()


async def _store(tmp_path: Path, name: str = "s") -> Store:
    (tmp_path / name).mkdir()
    return await open_store("sqlite", tmp_path / name)


def _journal(data: bytes | None) -> dict[str, Any]:
    assert data is not None
    doc: dict[str, Any] = json.loads(data)
    return doc


def _unb64(text: str) -> bytes:
    import base64
    return base64.b64decode(text)


# --- keys in the token --------------------------------------------------------------------


async def test_root_jwt_and_signing_keys_live_in_the_token(tmp_path: Path, token: Pkcs11Token,
                                                            softhsm: SoftHsm) -> None:
    store = await _store(tmp_path)
    keys = KeyManager(KEK, token, signing_keys_in_token=True)
    ca = await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r1"), store, keys)
    doc = _journal((await store.load_ca_state())[0])
    # The journal holds references, never a sealed key.
    assert all(is_reference(_unb64(slot["sealed_key"])) for slot in doc["roots"] + doc["jwt_keys"])
    # The token holds them as sensitive keys that can never be extracted (seen by OpenSC's tool).
    listed = softhsm.private_keys()
    assert len(listed) >= 2 and all("never extractable" in block and "sensitive" in block for block in listed)

    key = generate_private_key()
    svid = await ca.sign_x509_svid(build_csr(key), LEDGER, timedelta(minutes=5))
    assert verify_x509_svid(svid.cert_chain, {TD: ca.x509_authorities()}) == LEDGER
    signing_key = ca._signing.key  # noqa: SLF001 - the signing CA's key object itself
    assert isinstance(signing_key, HsmKey)
    with pytest.raises(CAError, match="never leaves the token"):
        signing_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())

    token_jwt, _ = await ca.issue_jwt_svid(LEDGER, ["payments"], timedelta(minutes=5))
    claims = validate_jwt_svid(token_jwt, audience="payments", jwt_authorities={TD: ca.jwt_authorities()},
                               now=datetime.now(timezone.utc))
    assert claims.spiffe_id == LEDGER

    # A root rotation makes its root and JWT key in the token too.
    await ca.prepare_root()
    doc = _journal((await store.load_ca_state())[0])
    assert len(doc["roots"]) == 2 and all(is_reference(_unb64(s["sealed_key"])) for s in doc["roots"])
    await store.close()


async def test_a_second_replica_opens_the_same_keys_by_reference(tmp_path: Path, token: Pkcs11Token) -> None:
    store = await _store(tmp_path)
    first = await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r1"), store,
                                                      KeyManager(KEK, token))
    second = await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r2"), store,
                                                       KeyManager(KEK, token))
    svid = await second.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5))
    assert verify_x509_svid(svid.cert_chain, {TD: first.x509_authorities()}) == LEDGER
    await store.close()


async def test_a_store_writer_cannot_repoint_a_reference(tmp_path: Path, token: Pkcs11Token) -> None:
    store = await _store(tmp_path)
    await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r1"), store,
                                              KeyManager(KEK, token))
    data, version = await store.load_ca_state()
    doc = _journal(data)
    # Point the JWT slot at the root's key: the reference's MAC names the root's slot.
    doc["jwt_keys"][0]["sealed_key"] = doc["roots"][0]["sealed_key"]
    await store.save_ca_state(json.dumps(doc).encode(), version)
    with pytest.raises(CAError, match="failed its check"):
        await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r2"), store,
                                                  KeyManager(KEK, token))
    await store.close()


async def test_keys_in_a_token_are_never_replaced_by_software_keys(tmp_path: Path, token: Pkcs11Token) -> None:
    store = await _store(tmp_path)
    await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r1"), store,
                                              KeyManager(KEK, token))
    before = await store.load_ca_state()
    with pytest.raises(CAError, match="start with --key-manager pkcs11"):
        await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r2"), store, KEK)
    assert await store.load_ca_state() == before
    await store.close()


async def test_a_software_ca_moves_into_the_token_at_its_next_rotation(tmp_path: Path, token: Pkcs11Token) -> None:
    store = await _store(tmp_path)
    await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r1"), store, KEK)
    ca = await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r2"), store,
                                                   KeyManager(KEK, token))
    await ca.prepare_root()
    await ca.activate_root()
    doc = _journal((await store.load_ca_state())[0])
    kinds = {slot["status"]: is_reference(_unb64(slot["sealed_key"])) for slot in doc["roots"]}
    assert kinds == {"old": False, "active": True}
    svid = await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5))
    assert verify_x509_svid(svid.cert_chain, {TD: ca.x509_authorities()}) == LEDGER
    await store.close()


def test_signing_keys_in_the_token_stay_in_this_process(token: Pkcs11Token) -> None:
    keys = KeyManager(KEK, token, signing_keys_in_token=True)
    with pytest.raises(CAError, match="signing-workers 0"):
        CertificateAuthority(CAConfig(trust_domain=TD, replica_id="r1", signing_workers=2), None,  # type: ignore[arg-type]
                             keys, lambda: NOW, None, 0)  # type: ignore[arg-type]


def test_hsm_refusals(softhsm: SoftHsm, token: Pkcs11Token) -> None:
    with pytest.raises(CAError, match="no token labelled 'nope'"):
        Pkcs11Token(MODULE, "nope", PIN)
    with pytest.raises(CAError, match="cannot load the PKCS#11 module"):
        Pkcs11Token(Path("/nonexistent/libpkcs11.so"), softhsm.label, PIN)
    with pytest.raises(CAError, match="cannot be kept in the HSM"):
        token.generate("ed25519", "x", persistent=False)
    with pytest.raises(CAError, match="holds no private key"):
        token.key(b"\x99" * 16)


# --- PKCS#11 URIs ----------------------------------------------------------------------------


def test_pkcs11_uris() -> None:
    assert parse_pkcs11_uri("pkcs11:object=bank%20ca") == {"object": b"bank ca"}
    assert parse_pkcs11_uri("pkcs11:token=t;id=%01%ff;type=private") == {"token": b"t", "id": b"\x01\xff"}
    for bad in ("object=x", "pkcs11:", "pkcs11:serial=1", "pkcs11:object=x;type=cert", "pkcs11:token=t"):
        with pytest.raises(CAError):
            parse_pkcs11_uri(bad)


@given(st.text(max_size=80))
def test_pkcs11_uri_parser_refuses_with_ca_errors_only(text: str) -> None:
    try:
        attrs = parse_pkcs11_uri("pkcs11:" + text)
    except CAError:
        return
    assert set(attrs) <= {"object", "id", "token"} and ("object" in attrs or "id" in attrs)


# --- the upstream authority ------------------------------------------------------------------


def _bank(tmp_path: Path, name: str = "bank", issuing_path_length: int | None = None) -> tuple[Path, Path,
                                                                                                x509.Certificate]:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = bank_ca_cert(f"{name} root", root_key, None)
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing = bank_ca_cert(f"{name} issuing", issuing_key, (root, root_key), issuing_path_length, days=400)
    chain = tmp_path / f"{name}-chain.pem"
    chain.write_bytes(issuing.public_bytes(serialization.Encoding.PEM) + root.public_bytes(serialization.Encoding.PEM))
    key = tmp_path / f"{name}-issuing.key"
    key.write_bytes(issuing_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    key.chmod(0o600)
    return chain, key, root


async def test_the_mesh_root_chains_to_the_banks_root(tmp_path: Path) -> None:
    chain, key, bank_root = _bank(tmp_path)
    upstream = UpstreamAuthority.load(chain, str(key), None, NOW)
    store = await _store(tmp_path)
    ca = await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r1"), store, KEK,
                                                   upstream=upstream)
    # The bundle is the bank's root alone; an SVID carries the chain up to (not including) it.
    assert ca.x509_authorities() == [bank_root]
    svid = await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5))
    assert len(svid.cert_chain) == 4
    assert verify_x509_svid(svid.cert_chain, {TD: [bank_root]}) == LEDGER
    # The next root is signed by the upstream CA too; the bundle does not change.
    await ca.prepare_root()
    await ca.activate_root()
    assert ca.x509_authorities() == [bank_root]
    svid = await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5))
    assert verify_x509_svid(svid.cert_chain, {TD: [bank_root]}) == LEDGER
    await store.close()


async def test_an_upstream_chain_in_the_store_is_trusted_only_if_it_ends_at_the_configured_root(
        tmp_path: Path) -> None:
    chain, key, _ = _bank(tmp_path)
    other_chain, other_key, _ = _bank(tmp_path, "other")
    store = await _store(tmp_path)
    config = CAConfig(trust_domain=TD, replica_id="r1")
    await CertificateAuthority.load_or_create(config, store, KEK, upstream=UpstreamAuthority.load(chain, str(key),
                                                                                                 None, NOW))
    with pytest.raises(CAError, match="start every replica with --upstream-ca-cert"):
        await CertificateAuthority.load_or_create(config, store, KEK)
    with pytest.raises(CAError, match="does not chain to the root in --upstream-ca-cert"):
        await CertificateAuthority.load_or_create(config, store, KEK, upstream=UpstreamAuthority.load(
            other_chain, str(other_key), None, NOW))
    # A store writer swaps in a chain of their own above a root they cannot re-sign.
    data, version = await store.load_ca_state()
    doc = _journal(data)
    forged = UpstreamAuthority.load(other_chain, str(other_key), None, NOW).chain_der
    import base64
    doc["roots"][0]["upstream"] = base64.b64encode(forged).decode()
    await store.save_ca_state(json.dumps(doc).encode(), version)
    with pytest.raises(CAError, match="does not chain"):
        await CertificateAuthority.load_or_create(config, store, KEK, upstream=UpstreamAuthority.load(
            chain, str(key), None, NOW))
    await store.close()


def test_upstream_refusals(tmp_path: Path) -> None:
    chain, key, root = _bank(tmp_path)
    short, short_key, _ = _bank(tmp_path, "short", issuing_path_length=1)
    with pytest.raises(CAError, match="allows 1 CA level"):
        UpstreamAuthority.load(short, str(short_key), None, NOW)
    with pytest.raises(CAError, match="is not the key of the first certificate"):
        UpstreamAuthority.load(chain, str(short_key), None, NOW)
    only_issuing = tmp_path / "issuing-only.pem"
    only_issuing.write_bytes(chain.read_bytes().split(b"-----END CERTIFICATE-----")[0]
                             + b"-----END CERTIFICATE-----\n")
    with pytest.raises(CAError, match="is not self-signed"):
        UpstreamAuthority.load(only_issuing, str(key), None, NOW)
    key.chmod(0o644)
    with pytest.raises(CAError, match="upstream-ca-key"):
        UpstreamAuthority.load(chain, str(key), None, NOW)
    with pytest.raises(CAError, match="give --pkcs11-module"):
        UpstreamAuthority.load(chain, "pkcs11:object=bank", None, NOW)
    assert root.subject.rfc4514_string().startswith("CN=bank root")


async def test_the_upstream_key_may_live_in_the_token(tmp_path: Path, token: Pkcs11Token) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = bank_ca_cert("hsm bank root", root_key, None)
    issuing_key = token.generate("ec-p256", "bank issuing ca", persistent=True)
    issuing = bank_ca_cert("hsm bank issuing", issuing_key, (root, root_key))  # type: ignore[arg-type]
    chain = tmp_path / "chain.pem"
    chain.write_bytes(issuing.public_bytes(serialization.Encoding.PEM) + root.public_bytes(serialization.Encoding.PEM))
    upstream = UpstreamAuthority.load(chain, f"pkcs11:id={''.join(f'%{b:02x}' for b in issuing_key.object_id)}",
                                      token, NOW)
    store = await _store(tmp_path)
    ca = await CertificateAuthority.load_or_create(CAConfig(trust_domain=TD, replica_id="r1"), store, KEK,
                                                   upstream=upstream)
    svid = await ca.sign_x509_svid(build_csr(generate_private_key()), LEDGER, timedelta(minutes=5))
    assert verify_x509_svid(svid.cert_chain, {TD: [root]}) == LEDGER
    await store.close()
