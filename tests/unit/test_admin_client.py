"""Which trust domain the CLI expects its remote server in, when the bundle cannot say."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.cli.admin_client import TRUST_DOMAIN_ENV, AdminCallError, trust_domain_of
from trustmesh.keys import generate_private_key
from trustmesh.spiffeid import TrustDomain
from trustmesh.x509svid import build_ca_certificate

NOW = datetime.now(timezone.utc)


def _bank_root() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example Bank Root")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW).not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def test_a_bank_root_needs_the_trust_domain_from_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUST_DOMAIN_ENV, raising=False)
    with pytest.raises(AdminCallError, match=TRUST_DOMAIN_ENV):
        trust_domain_of([_bank_root()])
    monkeypatch.setenv(TRUST_DOMAIN_ENV, "example.org")
    assert trust_domain_of([_bank_root()]) == TrustDomain("example.org")
    monkeypatch.setenv(TRUST_DOMAIN_ENV, "not a domain!")
    with pytest.raises(AdminCallError, match=TRUST_DOMAIN_ENV):
        trust_domain_of([_bank_root()])


def test_a_mesh_root_names_its_trust_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRUST_DOMAIN_ENV, "other.org")
    key = generate_private_key()
    root = build_ca_certificate(trust_domain=TrustDomain("example.org"), public_key=key.public_key(), issuer=None,
                                issuer_key=key, not_before=NOW, not_after=NOW + timedelta(days=1), path_length=1,
                                common_name="root")
    assert trust_domain_of([_bank_root(), root]) == TrustDomain("example.org")
