"""Kernel values on the wire (trustmesh/wire.py): what the server encodes, the agent decodes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from trustmesh._proto.trustmesh.v1 import types_pb2
from trustmesh.bundle import Bundle, JwtAuthority
from trustmesh.keys import spki_der
from trustmesh.policy import PolicyError, load_text
from trustmesh.policy.wire import policy_from_pb, policy_to_pb
from trustmesh.selectors import InvalidSelectorError, Selector, value_of
from trustmesh.spiffeid import TrustDomain
from trustmesh.wire import bundle_from_pb, bundle_to_pb, selector_from_pb, selector_to_pb

from .test_bundle import CA_EC, CA_RSA, JWT_ED, JWT_P256, full_bundle


def _same(a: Bundle, b: Bundle) -> None:
    assert a.trust_domain == b.trust_domain
    assert a.x509_authorities == b.x509_authorities
    assert [(j.key_id, spki_der(j.public_key), j.expires_at) for j in a.jwt_authorities] == \
        [(j.key_id, spki_der(j.public_key), j.expires_at) for j in b.jwt_authorities]
    assert (a.sequence_number, a.refresh_hint) == (b.sequence_number, b.refresh_hint)


def test_a_bundle_survives_the_wire_both_ways() -> None:
    expires = datetime(2027, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    bundle = full_bundle(jwt_authorities=(JwtAuthority("p256", JWT_P256.public_key(), expires),
                                          JwtAuthority("ed", JWT_ED.public_key())))
    message = bundle_to_pb(bundle)
    assert message.trust_domain == "example.org" and message.sequence_number == 7
    assert message.refresh_hint_seconds == 300
    assert [a.expires_at for a in message.jwt_authorities] == [int(expires.timestamp()), 0]
    again = bundle_from_pb(types_pb2.Bundle.FromString(message.SerializeToString()))
    _same(bundle, again)


def test_absent_optional_fields_stay_absent() -> None:
    bundle = Bundle(TrustDomain("partner.example"), (CA_EC, CA_RSA))
    again = bundle_from_pb(bundle_to_pb(bundle))
    _same(bundle, again)
    assert again.sequence_number is None and again.refresh_hint is None and again.jwt_authorities == ()


def test_a_bundle_with_a_refresh_hint_of_seconds_keeps_it() -> None:
    bundle = full_bundle(refresh_hint=timedelta(seconds=42), sequence_number=None)
    assert bundle_from_pb(bundle_to_pb(bundle)).refresh_hint == timedelta(seconds=42)


@pytest.mark.parametrize("text", ["unix:uid:1000", "unix:path:/usr/bin/a:b", "x509pop:subject:cn:a:b:c",
                                  "join_token:node:node-1"])
def test_selectors_keep_their_text_form_on_the_wire(text: str) -> None:
    message = selector_to_pb(Selector.parse(text))
    assert (message.type, message.value) == tuple(text.split(":", 1))
    assert str(selector_from_pb(message)) == text
    assert selector_to_pb(text) == message, "the stored text form encodes the same"


def test_decoding_a_selector_checks_nothing_and_encoding_text_checks_only_the_form() -> None:
    # The server audits what it refuses, so neither the wire nor a client pre-empts it.
    odd = selector_from_pb(types_pb2.Selector(type="k8s", value="ns:default"))
    assert str(odd) == "k8s:ns:default"
    assert selector_to_pb("k8s:ns:x").type == "k8s"
    with pytest.raises(InvalidSelectorError, match="TYPE:VALUE"):
        selector_to_pb("uid1000")
    with pytest.raises(InvalidSelectorError, match="unknown selector type"):
        Selector.parse("k8s:ns:x")


def test_value_of_reads_a_selector_kind() -> None:
    selectors = ["unix:gid:5", "unix:uid:1000", Selector("unix", "uid:7")]
    assert value_of(selectors, "unix:uid") == "1000"
    assert value_of(selectors, "unix:user") is None
    assert value_of(["unix:uidx:3"], "unix:uid") is None


# --- compiled policy routes (trustmesh/policy/wire.py) -----------------------------------------

ROUTED = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {name: ledger-read}
spec:
  destination: spiffe://example.org/ledger
  allow:
    - from: spiffe://example.org/fraud-scoring
      methods: [GET, HEAD]
      paths: ["/transactions/*", "/health"]
    - from: spiffe://example.org/payments
"""


def _compiled() -> types_pb2.CompiledPolicy:
    loaded = load_text(ROUTED, "routed.yaml")
    assert loaded.ok, loaded.problems
    return policy_to_pb(loaded.policy)


def test_routes_survive_the_wire_both_ways() -> None:
    message = _compiled()
    routed, plain = message.rules[0].allow
    assert (list(routed.methods), list(routed.paths)) == (["GET", "HEAD"], ["/transactions/*", "/health"])
    assert (list(plain.methods), list(plain.paths)) == ([], [])
    again = policy_from_pb(types_pb2.CompiledPolicy.FromString(message.SerializeToString()))
    assert again.allowlists == load_text(ROUTED, "routed.yaml").policy.allowlists
    assert again.route_methods == frozenset({"GET", "HEAD"})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("methods", "get", "case-sensitive"),
    ("methods", "", "is not a method"),
    ("paths", "/a/../b", "not a normalised path"),
    ("paths", "transactions/*", "start with '/'"),
    ("paths", "/a/*/b", "final '/*'"),
    ("paths", "/a%2Fb", "encoded slash"),
])
def test_an_agent_refuses_a_route_it_cannot_read(field: str, value: str, message: str) -> None:
    # Dropping the route would widen the rule to every request: refused, never guessed.
    compiled = _compiled()
    getattr(compiled.rules[0].allow[0], field).append(value)
    with pytest.raises(PolicyError, match="^compiled policy: ledger-read allow\\[0\\] has a route") as caught:
        policy_from_pb(compiled)
    assert message in str(caught.value)
