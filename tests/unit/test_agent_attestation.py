"""The agent's own identity: files on disk (modes, atomic writes), reuse after a restart,
actionable errors when there is none, and renewal against a fake client."""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.agent.agent import _obtain_identity
from trustmesh.agent.attestation import (
    KEY_FILE,
    SVID_FILE,
    AgentAttestationError,
    AgentIdentity,
    AgentRenewer,
    AttestServerUnreachableError,
    RenewerConfig,
    attest,
    inspect_identity,
    load_identity,
    load_x509pop,
    save_identity,
)
from trustmesh.agent.config import AgentConfig, RotationConfig
from trustmesh.keys import PrivateKey, generate_private_key
from trustmesh.metrics import Registry
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_ca_certificate, build_leaf_certificate

TD = TrustDomain("example.org")
NOW = datetime.now(timezone.utc)
AGENT = SpiffeId.parse("spiffe://example.org/agent/node-1")


def ca(td: TrustDomain = TD) -> tuple[x509.Certificate, PrivateKey]:
    key = generate_private_key()
    cert = build_ca_certificate(trust_domain=td, public_key=key.public_key(), issuer=None, issuer_key=key,
                                not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(days=1),
                                path_length=1, common_name="root")
    return cert, key


def leaf(root: x509.Certificate, root_key: PrivateKey, key: PrivateKey, *, sid: SpiffeId = AGENT,
         not_before: datetime | None = None, lifetime: timedelta = timedelta(hours=1)) -> x509.Certificate:
    start = not_before or NOW - timedelta(minutes=1)
    return build_leaf_certificate(spiffe_id=sid, public_key=key.public_key(), issuer=root,
                                  issuer_key=root_key, not_before=start, not_after=start + lifetime)


def identity(root: x509.Certificate, root_key: PrivateKey, **kw: object) -> AgentIdentity:
    key = generate_private_key()
    return AgentIdentity(AGENT, key, (leaf(root, root_key, key, **kw),))  # type: ignore[arg-type]


def events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, object]]]:
    return [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- files ------------------------------------------------------------------------------------


def test_key_is_0600_and_written_atomically(tmp_path: Path) -> None:
    root, root_key = ca()
    save_identity(tmp_path / "d", identity(root, root_key))
    assert stat.S_IMODE((tmp_path / "d" / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d" / SVID_FILE).stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [KEY_FILE, SVID_FILE], "no temp files left"


def test_restart_reuses_a_valid_identity_and_says_why_it_cannot(tmp_path: Path) -> None:
    root, root_key = ca()
    ident = identity(root, root_key)
    assert inspect_identity(tmp_path, [root], TD) == (None, "this agent has no identity yet")
    save_identity(tmp_path, ident)
    loaded = load_identity(tmp_path, [root], TD)
    assert loaded is not None and loaded.spiffe_id == AGENT and loaded.chain == ident.chain
    assert loaded.key.public_key() == ident.key.public_key()
    none, why = inspect_identity(tmp_path, [root], TD, now=NOW + timedelta(hours=2))
    assert none is None and "expired" in why
    other, _ = ca()
    none, why = inspect_identity(tmp_path, [other], TD)
    assert none is None and "does not verify" in why
    (tmp_path / KEY_FILE).write_bytes(b"garbage")
    none, why = inspect_identity(tmp_path, [root], TD)
    assert none is None and "unreadable" in why


# --- the composition root's first step ----------------------------------------------------------


def config_for(tmp_path: Path, root: x509.Certificate, **kw: object) -> AgentConfig:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pem(root))
    return AgentConfig(server=("127.0.0.1:1",), attest_server=("127.0.0.1:1",), trust_bundle=bundle,
                       data_dir=tmp_path / "agent", **kw)  # type: ignore[arg-type]


async def test_no_token_and_no_identity_is_a_clear_error(tmp_path: Path) -> None:
    root, _ = ca()
    with pytest.raises(AgentAttestationError) as err:
        await _obtain_identity(config_for(tmp_path, root), asyncio.Event())
    assert str(err.value).startswith("this agent has no identity yet: start it once with --join-token "
                                     "(create one with `trustmesh token create --node NAME`)")


async def test_an_expired_identity_says_so(tmp_path: Path) -> None:
    root, root_key = ca()
    config = config_for(tmp_path, root)
    save_identity(config.data_dir, identity(root, root_key, not_before=NOW - timedelta(hours=3)))
    with pytest.raises(AgentAttestationError, match="expired at .*--join-token"):
        await _obtain_identity(config, asyncio.Event())


async def test_restart_needs_no_token_and_no_server(tmp_path: Path) -> None:
    root, root_key = ca()
    config = config_for(tmp_path, root)
    ident = identity(root, root_key)
    save_identity(config.data_dir, ident)
    loaded, roots = await _obtain_identity(config, asyncio.Event())
    assert loaded.chain == ident.chain and roots == [root]


async def test_a_bundle_of_another_trust_domain_is_refused(tmp_path: Path) -> None:
    root, _ = ca(TrustDomain("other.org"))
    with pytest.raises(AgentAttestationError, match="does not match the trust bundle"):
        await _obtain_identity(config_for(tmp_path, root, trust_domain=TD), asyncio.Event())


async def test_attestation_waits_for_an_unreachable_server_until_stopped(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    root, _ = ca()
    config = config_for(tmp_path, root, join_token="tm_token",
                        rotation=RotationConfig(backoff_base=0.05, backoff_cap=0.1))
    stop = asyncio.Event()
    caplog.set_level(logging.INFO)
    task = asyncio.create_task(_obtain_identity(config, stop))
    await asyncio.sleep(1.0)
    assert not task.done(), "an unreachable server is retried: the token is not spent"
    stop.set()
    with pytest.raises(AgentAttestationError, match="stopped before"):
        await asyncio.wait_for(task, 5)
    assert any(e == "server_unreachable" and f.get("call") == "Attest" for e, f in events(caplog))


async def test_attest_tells_unreachable_apart() -> None:
    root, _ = ca()
    with pytest.raises(AttestServerUnreachableError, match="no server reachable"):
        await attest(("127.0.0.1:1",), pem(root), TD, join_token="tm_x")


def test_x509pop_files_are_checked(tmp_path: Path) -> None:
    root, root_key = ca()
    key = generate_private_key()
    cert = leaf(root, root_key, key)
    (tmp_path / "c.pem").write_bytes(pem(cert))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    certs, loaded = load_x509pop(tmp_path / "c.pem", tmp_path / "k.pem")
    assert certs == [cert] and loaded.public_key() == key.public_key()
    with pytest.raises(AgentAttestationError, match="cannot read the x509pop certificate"):
        load_x509pop(tmp_path / "missing.pem", tmp_path / "k.pem")
    other = generate_private_key()
    (tmp_path / "o.pem").write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    with pytest.raises(AgentAttestationError, match="does not belong"):
        load_x509pop(tmp_path / "c.pem", tmp_path / "o.pem")


# --- renewal ------------------------------------------------------------------------------------


class FakeClient:
    def __init__(self, root: x509.Certificate, root_key: PrivateKey, ident: AgentIdentity) -> None:
        self.root, self.root_key = root, root_key
        self._identity = ident
        self.error: grpc.StatusCode | None = None
        self.wrong_key = False
        self.calls = 0
        self.switched: list[AgentIdentity] = []

    @property
    def identity(self) -> AgentIdentity:
        return self._identity

    def trust_roots(self) -> list[x509.Certificate]:
        return [self.root]

    async def renew_agent(self, csr: bytes) -> Sequence[bytes]:
        self.calls += 1
        if self.error is not None:
            raise grpc.aio.AioRpcError(self.error, grpc.aio.Metadata(), grpc.aio.Metadata(), "no")
        key = x509.load_der_x509_csr(csr).public_key()
        if self.wrong_key:
            key = generate_private_key().public_key()
        cert = build_leaf_certificate(spiffe_id=AGENT, public_key=key, issuer=self.root,  # type: ignore[arg-type]
                                      issuer_key=self.root_key, not_before=NOW, not_after=NOW + timedelta(hours=1))
        return [cert.public_bytes(serialization.Encoding.DER)]

    def use_identity(self, ident: AgentIdentity) -> None:
        self._identity = ident
        self.switched.append(ident)


async def test_renewal_stores_the_new_identity_and_switches_the_channel(tmp_path: Path) -> None:
    root, root_key = ca()
    old = identity(root, root_key)
    client = FakeClient(root, root_key, old)
    renewer = AgentRenewer(RenewerConfig(tmp_path), client, Registry())
    fresh = await renewer.renew_once()
    assert client.switched == [fresh] and fresh.key.public_key() != old.key.public_key()
    stored = load_identity(tmp_path, [root], TD)
    assert stored is not None and stored.chain == fresh.chain
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


async def test_renewal_refuses_an_svid_for_another_key(tmp_path: Path) -> None:
    root, root_key = ca()
    client = FakeClient(root, root_key, identity(root, root_key))
    client.wrong_key = True
    with pytest.raises(AgentAttestationError, match="another key"):
        await AgentRenewer(RenewerConfig(tmp_path), client, Registry()).renew_once()
    assert client.switched == [] and not (tmp_path / KEY_FILE).exists()


async def test_renewal_runs_at_half_life_and_slows_down_when_refused(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    root, root_key = ca()
    # Issued 2 s ago for 4 s: due now (half-life).
    ident = identity(root, root_key, not_before=datetime.now(timezone.utc) - timedelta(seconds=2),
                     lifetime=timedelta(seconds=4))
    client = FakeClient(root, root_key, ident)
    client.error = grpc.StatusCode.PERMISSION_DENIED
    caplog.set_level(logging.INFO)
    renewer = AgentRenewer(RenewerConfig(tmp_path, RotationConfig(refused_retry=30)), client, Registry())
    task = asyncio.create_task(renewer.run())
    try:
        await asyncio.sleep(0.8)
        assert client.calls == 1, "a banned agent does not hammer the server"
        assert any(e == "agent_refused" and "banned, evicted" in str(f["hint"]) for e, f in events(caplog))
    finally:
        task.cancel()
    client.error = None
    registry = Registry()
    renewer = AgentRenewer(RenewerConfig(tmp_path), client, registry)
    task = asyncio.create_task(renewer.run())
    try:
        async with asyncio.timeout(3):
            while not client.switched:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
    assert "trustmesh_agent_svid_renewals_total{outcome=\"renewed\"} 1" in registry.render()
    expiry = registry.gauge("trustmesh_agent_svid_expiry_timestamp_seconds", "").value()
    assert expiry == client.identity.expires_at.timestamp()  # a point in time: named ..._timestamp_seconds
