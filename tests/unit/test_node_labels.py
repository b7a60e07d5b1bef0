"""Node labels: their syntax, how records keep them (and read records without them), and the
authorized-entry index for entries with a node selector, against a brute-force oracle."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.controlplane.attestation import cert_labels
from trustmesh.controlplane.authorized import AuthorizedIndex
from trustmesh.controlplane.store.records import AttestedNode, RegistrationEntry, label_pairs
from trustmesh.labels import (
    LabelError,
    check_key,
    effective_labels,
    matches,
    parse_assignment,
    parse_assignments,
    parse_cert_label,
)
from trustmesh.selectors import Selector
from trustmesh.spiffeid import SpiffeId

SERVER = "spiffe://example.org/trustmesh/server"
SELECTED = "spiffe://example.org/trustmesh/node-selector"
AGENTS = [f"spiffe://example.org/agent/n{i}" for i in range(4)]


@pytest.mark.parametrize("text, pair", [
    ("zone=cde", ("zone", "cde")),
    ("bank.example/zone=cde", ("bank.example/zone", "cde")),
    ("rack=", ("rack", "")),
    ("a.b_c-d=X_1.2-z", ("a.b_c-d", "X_1.2-z")),
    ("k=" + "v" * 63, ("k", "v" * 63)),
])
def test_valid_labels(text: str, pair: tuple[str, str]) -> None:
    assert parse_assignment(text) == pair


@pytest.mark.parametrize("text, says", [
    ("zone", "has no '='"),
    ("=cde", "the name must be"),
    ("Zone=cde", "the name must be"),
    ("zone-=cde", "the name must be"),
    ("k" * 64 + "=v", "the name must be"),
    ("Bank.Example/zone=cde", "prefix before '/'"),
    ("/zone=cde", "prefix before '/'"),
    ("zone=c d e", "the value must be"),
    ("zone=-cde", "the value must be"),
    ("zone=" + "v" * 64, "the value must be"),
    ("attestation=join_token", "reserved"),
])
def test_invalid_labels_say_why_in_one_line(text: str, says: str) -> None:
    with pytest.raises(LabelError, match=says) as err:
        parse_assignment(text)
    assert "\n" not in str(err.value)


def test_a_key_given_twice_with_different_values() -> None:
    assert parse_assignments(["zone=cde", "zone=cde", "rack=r1"]) == {"zone": "cde", "rack": "r1"}
    with pytest.raises(LabelError, match="given twice"):
        parse_assignments(["zone=cde", "zone=dmz"])


def test_the_reserved_key_only_where_allowed() -> None:
    assert check_key("attestation", allow_reserved=True) == "attestation"
    with pytest.raises(LabelError, match="reserved"):
        check_key("attestation")


def test_attestation_label_is_the_servers() -> None:
    # A stored attestation key (which validation refuses) can never override the server's.
    assert effective_labels({"zone": "cde", "attestation": "x509pop"}, "join_token") == {
        "zone": "cde", "attestation": "join_token"}
    assert matches({"zone": "cde"}, {"zone": "cde", "rack": "1"})
    assert not matches({"zone": "cde", "rack": "2"}, {"zone": "cde", "rack": "1"})
    assert not matches({}, {"zone": "cde"})  # an empty selector selects nothing


def entry(i: int, parent: str = SELECTED, selector: dict[str, str] | None = None) -> RegistrationEntry:
    return RegistrationEntry(id=f"e{i}", spiffe_id=SpiffeId.parse(f"spiffe://example.org/w{i}"),
                             parent_id=SpiffeId.parse(parent), selectors=(Selector.parse("unix:uid:1"),),
                             x509_ttl=0, jwt_ttl=0, dns_names=(), federates_with=(), admin=False,
                             created_at=0, updated_at=0, node_selector=label_pairs(selector or {}))


def node(agent: str, labels: dict[str, str] | None = None, attestation: str = "join_token") -> AttestedNode:
    return AttestedNode(spiffe_id=SpiffeId.parse(agent), node_name=agent.rsplit("/", 1)[1],
                        attestation_type=attestation, cert_serial="1", cert_not_after=0, banned=False,
                        created_at=0, updated_at=0, labels=label_pairs(labels or {}))


def test_records_keep_labels_and_read_older_records() -> None:
    n = node(AGENTS[0], {"zone": "cde"})
    assert AttestedNode.from_json(n.to_json()) == n
    e = entry(1, selector={"zone": "cde", "rack": "r1"})
    assert RegistrationEntry.from_json(e.to_json()) == e
    # Records without labels are written byte for byte as before, so MACs of old records hold.
    plain = node(AGENTS[0])
    assert b"labels" not in plain.to_json() and AttestedNode.from_json(plain.to_json()).labels == ()
    assert b"node_selector" not in entry(2, parent=AGENTS[0]).to_json()


def test_selector_entries_reach_exactly_the_labelled_nodes() -> None:
    idx = AuthorizedIndex(SpiffeId.parse(SERVER))
    idx.load([entry(1, selector={"zone": "cde"}), entry(2, parent=AGENTS[1]),
              entry(3, selector={"attestation": "x509pop"})],
             [node(AGENTS[0], {"zone": "cde"}), node(AGENTS[1]), node(AGENTS[2], attestation="x509pop")], 5)
    assert [e.id for e in idx.authorized_for(AGENTS[0])] == ["e1"]
    assert [e.id for e in idx.authorized_for(AGENTS[1])] == ["e2"]
    assert [e.id for e in idx.authorized_for(AGENTS[2])] == ["e3"]
    assert idx.is_authorized(AGENTS[0], "e1") and not idx.is_authorized(AGENTS[1], "e1")
    assert idx.reached_by("e1") == [AGENTS[0]]

    # The label goes: only that node is affected, and it can resume with a delta of e1.
    assert idx.apply_node(AGENTS[0], node(AGENTS[0]), 6) == {AGENTS[0]}
    assert idx.authorized_for(AGENTS[0]) == [] and not idx.is_authorized(AGENTS[0], "e1")
    assert idx.changed_since(AGENTS[0], 5) == {"e1"}
    # Another node gains it.
    assert idx.apply_node(AGENTS[1], node(AGENTS[1], {"zone": "cde"}), 7) == {AGENTS[1]}
    assert [e.id for e in idx.authorized_for(AGENTS[1])] == ["e1", "e2"]
    assert idx.reached_by("e1") == [AGENTS[1]]
    # The entry's selector narrows: the node that no longer matches is told.
    assert idx.apply_entry("e1", entry(1, selector={"zone": "cde", "rack": "r1"}), 8) == {AGENTS[1]}
    assert [e.id for e in idx.authorized_for(AGENTS[1])] == ["e2"]
    assert idx.apply_entry("e1", None, 9) == set()


LABELS = [{}, {"zone": "cde"}, {"zone": "dmz"}, {"zone": "cde", "rack": "r1"}, {"rack": "r1"}]
SELECTORS = [{"zone": "cde"}, {"zone": "dmz"}, {"zone": "cde", "rack": "r1"}, {"attestation": "x509pop"}]

change = st.one_of(
    st.tuples(st.just("node"), st.integers(0, 3), st.none() | st.integers(0, len(LABELS) - 1), st.booleans()),
    st.tuples(st.just("entry"), st.integers(0, 5), st.none() | st.integers(0, len(SELECTORS)), st.booleans()),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(change, max_size=25))
def test_index_agrees_with_an_oracle(changes: list[tuple[str, int, int | None, bool]]) -> None:
    idx = AuthorizedIndex(SpiffeId.parse(SERVER))
    idx.load([], [], 0)
    entries: dict[str, RegistrationEntry] = {}
    nodes: dict[str, AttestedNode] = {}
    for revision, (kind, i, which, flag) in enumerate(changes, 1):
        if kind == "node":
            agent = AGENTS[i]
            new_node = None if which is None else node(agent, LABELS[which], "x509pop" if flag else "join_token")
            before = {a: [e.id for e in idx.authorized_for(a)] for a in AGENTS}
            affected = idx.apply_node(agent, new_node, revision)
            if new_node is None:
                nodes.pop(agent, None)
            else:
                nodes[agent] = new_node
        else:
            # which == len(SELECTORS): an ordinary entry of one agent
            new_entry = None if which is None else (
                entry(i, parent=AGENTS[i % 4]) if which == len(SELECTORS) else entry(i, selector=SELECTORS[which]))
            before = {a: [e.id for e in idx.authorized_for(a)] for a in AGENTS}
            affected = idx.apply_entry(f"e{i}", new_entry, revision)
            if new_entry is None:
                entries.pop(f"e{i}", None)
            else:
                entries[f"e{i}"] = new_entry
        for agent in AGENTS:
            want = sorted(
                e.id for e in entries.values()
                if (not e.node_selector and str(e.parent_id) == agent)
                or (bool(e.node_selector) and agent in nodes
                    and matches(dict(e.node_selector), nodes[agent].effective_labels)))
            got = [e.id for e in idx.authorized_for(agent)]
            assert got == want
            for e in entries:
                assert idx.is_authorized(agent, e) == (e in want)
            if got != before[agent] and agent in nodes:
                assert agent in affected
    fresh = AuthorizedIndex(SpiffeId.parse(SERVER))
    fresh.load(entries.values(), nodes.values(), len(changes))
    for agent in AGENTS:
        assert fresh.authorized_for(agent) == idx.authorized_for(agent)



def _cert(subject: list[tuple[object, str]], uris: list[str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in subject])  # type: ignore[arg-type]
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(datetime(2026, 1, 1, tzinfo=timezone.utc))
               .not_valid_after(datetime(2027, 1, 1, tzinfo=timezone.utc)))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_labels_from_a_node_certificate() -> None:
    mappings = [parse_cert_label(t) for t in ("zone=subject:OU", "rack=san-uri-prefix:spiffe://bank/rack/",
                                              "site=subject:L", "odd=subject:O")]
    cert = _cert([(NameOID.COMMON_NAME, "node-7"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "cde"),
                  (NameOID.ORGANIZATION_NAME, "Bank of Examples")],
                 ["spiffe://other/rack/r9", "spiffe://bank/rack/r12"])
    # No L: no site label; an O that is no valid label value: no label either.
    assert cert_labels(cert, mappings) == {"zone": "cde", "rack": "r12"}
    assert cert_labels(_cert([(NameOID.COMMON_NAME, "n")], []), mappings) == {}


@pytest.mark.parametrize("text, says", [
    ("zone", "write KEY=subject:ATTR"),
    ("zone=subject:XX", "the source must be"),
    ("zone=san-uri-prefix:", "the source must be"),
    ("zone=dns:x", "the source must be"),
    ("attestation=subject:OU", "reserved"),
])
def test_bad_certificate_label_mappings(text: str, says: str) -> None:
    with pytest.raises(LabelError, match=says):
        parse_cert_label(text)
