"""The one DNS-name rule (trustmesh/dnsname.py), and the two places that apply it:
registration (entries' DNS SANs) and the X509-SVID builder."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from trustmesh.controlplane.api.status import InvalidArgumentError
from trustmesh.controlplane.registration import check_dns_name
from trustmesh.dnsname import InvalidDnsNameError, dns_name_covers, normalize_dns_name
from trustmesh.errors import SvidError, TrustmeshError
from trustmesh.keys import generate_private_key
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_ca_certificate, build_leaf_certificate

TD = TrustDomain("example.org")
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("ledger.internal", "ledger.internal"),
        ("Ledger.Internal.", "ledger.internal"),
        ("localhost", "localhost"),
        ("*.ledger.internal", "*.ledger.internal"),
        ("*.Internal.", "*.internal"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61,) * 2,  # 253 characters
    ],
)
def test_accepted_names_and_their_canonical_form(name: str, canonical: str) -> None:
    assert normalize_dns_name(name) == canonical
    assert normalize_dns_name(canonical) == canonical


@pytest.mark.parametrize(
    "name",
    [
        "", ".", "a..b", "a.example..", "-a.example", "a-.example", "a b", "a_b.example",
        "*", "*.", "a.*.example", "**.example", "*a.example", "a" * 64 + ".example",
        "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 62,  # 254 characters
        "bücher.example", "\u212aube.internal",  # the Kelvin sign lower-cases to an ASCII 'k'
        "ledger.internal\n", None, 7, b"ledger.internal",
    ],
)
def test_refused_names_carry_the_input(name: object) -> None:
    with pytest.raises(InvalidDnsNameError, match="invalid DNS name") as info:
        normalize_dns_name(name)
    assert info.value.value == name
    assert isinstance(info.value, TrustmeshError) and isinstance(info.value, ValueError)


def test_a_refusal_quotes_a_clipped_input() -> None:
    with pytest.raises(InvalidDnsNameError) as info:
        normalize_dns_name("x" * 100_000)
    assert len(str(info.value)) < 400


@given(st.text(max_size=300))
def test_random_text_is_canonical_or_refused(name: str) -> None:
    try:
        canonical = normalize_dns_name(name)
    except InvalidDnsNameError:
        return
    assert canonical == canonical.lower() and canonical.isascii() and not canonical.endswith(".")
    assert normalize_dns_name(canonical) == canonical


@pytest.mark.parametrize(
    ("pattern", "name", "covers"),
    [
        ("ledger.internal", "ledger.internal", True),
        ("*.internal", "ledger.internal", True),
        ("*.internal", "a.ledger.internal", False),  # a wildcard covers exactly one label
        ("*.internal", "internal", False),
        ("*.example.org", "trustmesh-server.example.org", True),
        ("ledger.internal", "other.internal", False),
    ],
)
def test_dns_name_covers(pattern: str, name: str, covers: bool) -> None:
    assert dns_name_covers(pattern, name) is covers


def test_registration_applies_the_rule_and_guards_the_server_name() -> None:
    assert check_dns_name("Ledger.Internal.", TD) == "ledger.internal"
    assert check_dns_name("*.ledger.internal", TD) == "*.ledger.internal"
    with pytest.raises(InvalidArgumentError, match="invalid DNS name"):
        check_dns_name("a..b", TD)
    # A wildcard over the server's name would let a workload pose as the server.
    with pytest.raises(InvalidArgumentError, match="reserved"):
        check_dns_name("*.Example.Org", TD)


def test_certificates_carry_the_canonical_form_and_refuse_the_rest() -> None:
    key = generate_private_key()
    root = build_ca_certificate(trust_domain=TD, public_key=key.public_key(), issuer=None, issuer_key=key,
                                not_before=NOW, not_after=NOW + timedelta(days=1), path_length=None,
                                common_name="root")

    def leaf(*dns: str) -> x509.Certificate:
        return build_leaf_certificate(spiffe_id=SpiffeId.parse("spiffe://example.org/w"),
                                      public_key=generate_private_key().public_key(), issuer=root,
                                      issuer_key=key, not_before=NOW, not_after=NOW + timedelta(hours=1),
                                      dns_names=dns)

    san = leaf("Ledger.Internal.", "*.Ledger.Internal").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["ledger.internal", "*.ledger.internal"]
    with pytest.raises(SvidError, match="invalid DNS name"):
        leaf("\u212aube.internal")
