"""Entry validation rules (the server's side; the CLI tests drive the same rules end to end)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.api.status import InvalidArgumentError
from controlplane.registration import EntrySpec, check_dns_name, check_node_name, token_hash, validate_entry
from trustmesh.spiffeid import TrustDomain

TD = TrustDomain("example.org")
AGENT = "spiffe://example.org/agent/node-1"


def spec(**kw: object) -> EntrySpec:
    base: dict[str, object] = {"spiffe_id": "spiffe://example.org/ledger", "parent_id": AGENT,
                               "selectors": ["unix:uid:1000"]}
    base.update(kw)
    return EntrySpec(**base)  # type: ignore[arg-type]


def test_canonical_form() -> None:
    clean = validate_entry(spec(selectors=["unix:uid:1", "unix:gid:2", "unix:uid:1"], dns_names=["A.Example.", "a.example"],
                                federates_with=["spiffe://partner.example", "partner.example"]), TD)
    assert clean.selectors == ("unix:gid:2", "unix:uid:1")
    assert clean.dns_names == ("a.example",)
    assert clean.federates_with == ("partner.example",)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"spiffe_id": "spiffe://example.org"}, "has no path"),
        ({"spiffe_id": "spiffe://other.org/x"}, "not this server's"),
        ({"spiffe_id": "spiffe://example.org/trustmesh/server"}, "reserved"),
        ({"spiffe_id": "spiffe://example.org/agent/node-2"}, "reserved"),
        ({"parent_id": "spiffe://other.org/agent/n"}, "not in trust domain"),
        ({"parent_id": "spiffe://example.org/ledger"}, "own parent"),
        ({"parent_id": "spiffe://example.org/trustmesh/other"}, "reserved"),
        ({"selectors": []}, "at least one"),
        ({"selectors": ["unix:uid:x"]}, "decimal"),
        ({"selectors": [f"unix:uid:{i}" for i in range(40)]}, "at most"),
        ({"x509_ttl": -1}, "out of range"),
        ({"x509_ttl": 40 * 86400}, "out of range"),
        ({"jwt_ttl": 2 * 86400}, "out of range"),
        ({"dns_names": ["-bad.example"]}, "invalid DNS name"),
        ({"dns_names": ["trustmesh-server.example.org"]}, "reserved"),
        ({"federates_with": ["Bad_TD!"]}, "federates-with"),
    ],
)
def test_refusals(kw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        validate_entry(spec(**kw), TD)


def test_node_alias_parent_is_allowed() -> None:
    assert validate_entry(spec(parent_id="spiffe://example.org/trustmesh/server"), TD).parent_id.endswith("/server")


@given(st.text(max_size=140))
def test_node_names_are_accepted_or_refused_cleanly(name: str) -> None:
    try:
        assert check_node_name(name) == name
    except InvalidArgumentError:
        pass


@given(st.text(max_size=80))
def test_dns_names_are_accepted_or_refused_cleanly(name: str) -> None:
    try:
        check_dns_name(name, TD)
    except InvalidArgumentError:
        pass


def test_token_hash_is_sha256_hex() -> None:
    assert len(token_hash("x")) == 64 and token_hash("x") != token_hash("y")
