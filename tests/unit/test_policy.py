"""Allowlists: patterns, loading with precise problems, and the decision (default deny)."""

from __future__ import annotations

import string
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.policy import IdPattern, PolicyError, load_text
from trustmesh.spiffeid import SpiffeId

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
S = SpiffeId.parse

LEDGER = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {name: ledger-access, owner: payments-platform}
spec:
  destination: spiffe://example.org/ledger
  ports: [9443]
  allow:
    - from: spiffe://example.org/payments
    - from: spiffe://example.org/ns/batch/*
    - from: spiffe://partner.example/settlement
      expires: 2026-12-31T00:00:00Z
---
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {name: reports-audit}
spec:
  destination: spiffe://example.org/reports/*
  mode: audit
  allow:
    - from: spiffe://partner.example/*
"""


def policy():  # type: ignore[no-untyped-def]
    loaded = load_text(LEDGER, "ledger.yaml", NOW)
    assert loaded.ok, loaded.problems
    return loaded.policy


@pytest.mark.parametrize(
    ("source", "destination", "port", "at", "verdict", "rule"),
    [
        ("spiffe://example.org/payments", "spiffe://example.org/ledger", 9443, NOW, "ALLOW", "ledger-access allow[0]"),
        (
            "spiffe://example.org/ns/batch/job-1",
            "spiffe://example.org/ledger",
            9443,
            NOW,
            "ALLOW",
            "ledger-access allow[1]",
        ),
        ("spiffe://example.org/ns/batchjob", "spiffe://example.org/ledger", 9443, NOW, "DENY", "default deny"),
        ("spiffe://example.org/ns/batch", "spiffe://example.org/ledger", 9443, NOW, "DENY", "default deny"),
        ("spiffe://example.org/frontend", "spiffe://example.org/ledger", 9443, NOW, "DENY", "default deny"),
        ("spiffe://example.org/payments", "spiffe://example.org/ledger", 8080, NOW, "DENY", "default deny"),
        ("spiffe://example.org/payments", "spiffe://example.org/ledger", None, NOW, "DENY", "default deny"),
        (
            "spiffe://partner.example/settlement",
            "spiffe://example.org/ledger",
            9443,
            NOW,
            "ALLOW",
            "ledger-access allow[2]",
        ),
        (
            "spiffe://partner.example/settlement",
            "spiffe://example.org/ledger",
            9443,
            datetime(2026, 12, 31, tzinfo=timezone.utc),
            "DENY",
            "default deny",
        ),
        ("spiffe://example.org/payments", "spiffe://example.org/unknown", 9443, NOW, "DENY", "default deny"),
        (
            "spiffe://partner.example/x",
            "spiffe://example.org/reports/daily",
            443,
            NOW,
            "ALLOW",
            "reports-audit allow[0]",
        ),
        (
            "spiffe://example.org/payments",
            "spiffe://example.org/reports/daily",
            443,
            NOW,
            "ALLOW",
            "reports-audit (audit mode)",
        ),
    ],
)
def test_decisions(source: str, destination: str, port: int | None, at: datetime, verdict: str, rule: str) -> None:
    decision = policy().decide(S(source), S(destination), port, at)
    assert (decision.verdict, decision.rule) == (verdict, rule), decision.reason


def test_reasons_say_why() -> None:
    p = policy()
    assert (
        "expired at 2026-12-31"
        in p.decide(
            S("spiffe://partner.example/settlement"), S("spiffe://example.org/ledger"), 9443, NOW + timedelta(days=60)
        ).reason
    )
    assert "no allowlist covers" in p.decide(S("spiffe://example.org/a"), S("spiffe://example.org/b"), 1, NOW).reason
    audit = p.decide(S("spiffe://example.org/x"), S("spiffe://example.org/reports/r"), 1, NOW)
    assert audit.audit_only and "enforce would deny" in audit.reason


def test_an_empty_policy_denies_everything() -> None:
    loaded = load_text("", "empty.yaml", NOW)
    assert loaded.ok and not loaded.policy.decide(S("spiffe://a/b"), S("spiffe://a/c"), 1, NOW).allowed


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        (
            "apiVersion: v2\nkind: Allowlist\nmetadata: {name: a}\n"
            "spec: {destination: spiffe://e.org/x, allow: [{from: spiffe://e.org/y}]}",
            "apiVersion",
            "trustmesh/v1",
        ),
        (
            "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a, colour: red}\n"
            "spec: {destination: spiffe://e.org/x, allow: [{from: spiffe://e.org/y}]}",
            "metadata.colour",
            "unknown key",
        ),
        (
            "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a}\n"
            "spec: {destination: spiffe://E.org/x, allow: [{from: spiffe://e.org/y}]}",
            "spec.destination",
            "lower case",
        ),
        (
            "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a}\n"
            "spec: {destination: spiffe://e.org/x, mode: block, allow: [{from: spiffe://e.org/y}]}",
            "spec.mode",
            "unknown mode",
        ),
        (
            "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a}\n"
            "spec: {destination: spiffe://e.org/x, allow: [{from: spiffe://e.org/y, expires: 2020-01-01T00:00:00Z}]}",
            "spec.allow[0].expires",
            "in the past",
        ),
        (
            "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a}\n"
            "spec: {destination: spiffe://e.org/x, allow: [{from: spiffe://e.org/y}, {from: spiffe://e.org/y}]}",
            "spec.allow[1].from",
            "duplicates",
        ),
        (
            "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a}\n"
            "spec: {destination: spiffe://e.org/x, ports: [0, 70000], allow: [{from: spiffe://e.org/y}]}",
            "spec.ports[0]",
            "not a port",
        ),
        (
            "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a}\n"
            "spec: {destination: spiffe://e.org/x, allow: []}",
            "spec.allow",
            "is required",
        ),
        (
            "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a}\n"
            "spec: {destination: spiffe://e.org/x*, allow: [{from: spiffe://e.org/y}]}",
            "spec.destination",
            "wildcard",
        ),
        ("key: [unclosed", "line 1", "not valid YAML"),
    ],
)
def test_problems_name_file_document_and_field(text: str, field: str, message: str) -> None:
    loaded = load_text(text, "team/a.yaml", NOW)
    assert not loaded.ok
    hits = [p for p in loaded.problems if p.field == field and message in p.message]
    assert hits, [str(p) for p in loaded.problems]
    assert str(hits[0]).startswith("team/a.yaml: document 1: ")


def test_every_problem_is_reported_not_just_the_first() -> None:
    text = (
        "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a, x: 1}\n"
        "spec: {destination: nope, mode: m, ports: [x], allow: [{from: bad}], extra: 1}\n"
    )
    fields = {p.field for p in load_text(text, "f.yaml", NOW).problems}
    assert {
        "metadata.x",
        "spec.destination",
        "spec.mode",
        "spec.ports[0]",
        "spec.allow[0].from",
        "spec.extra",
    } <= fields


def test_overlaps_and_duplicate_names_across_documents() -> None:
    doc = (
        "apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: %s}\n"
        "spec: {destination: spiffe://e.org/x, ports: [1], allow: [{from: spiffe://e.org/%s}]}\n"
    )
    loaded = load_text(doc % ("a", "y") + "---\n" + doc % ("a", "z"), "f.yaml", NOW)
    messages = " ".join(p.message for p in loaded.problems)
    assert "also defined" in messages and "overlaps allowlist 'a'" in messages


def test_stored_revisions_load_with_lapsed_rules() -> None:
    loaded = load_text(LEDGER, "stored", NOW + timedelta(days=90), reject_expired=False)
    assert loaded.ok


def test_node_compilation_keeps_only_what_the_node_serves() -> None:
    p = policy().for_destinations([S("spiffe://example.org/ledger")])
    assert [a.name for a in p.allowlists] == ["ledger-access"]


# --- property tests ----------------------------------------------------------------------------

segment = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=8)
ids = st.builds(
    lambda td, segs: SpiffeId.parse(f"spiffe://{td}.org" + "".join("/" + s for s in segs)),
    st.sampled_from(["example", "partner"]),
    st.lists(segment, min_size=1, max_size=4),
)


@given(ids, ids)
def test_a_prefix_matches_exactly_its_subtree(prefix_id: SpiffeId, candidate: SpiffeId) -> None:
    pattern = IdPattern.parse(str(prefix_id) + "/*")
    expected = candidate.trust_domain == prefix_id.trust_domain and candidate.path.startswith(prefix_id.path + "/")
    assert pattern.matches(candidate) == expected
    assert IdPattern.parse(str(prefix_id)).matches(candidate) == (candidate == prefix_id)


@given(st.text(max_size=60))
def test_patterns_parse_or_are_refused_cleanly(text: str) -> None:
    try:
        pattern = IdPattern.parse(text)
    except PolicyError:
        return
    assert str(pattern) == text


@given(st.text(max_size=300))
@settings(max_examples=200)
def test_arbitrary_yaml_never_crashes_the_loader(text: str) -> None:
    load_text(text, "fuzz.yaml", NOW)


@given(ids, ids, st.integers(1, 65535))
def test_no_allowlist_means_deny(source: SpiffeId, destination: SpiffeId, port: int) -> None:
    assert not load_text("", "x", NOW).policy.decide(source, destination, port, NOW).allowed


def test_an_audit_allowlist_without_rules_discovers_and_denies_nothing() -> None:
    from datetime import datetime, timezone

    from trustmesh.policy import load_text
    from trustmesh.spiffeid import SpiffeId

    loaded = load_text("apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: discover}\n"
                       "spec: {destination: spiffe://e.org/*, mode: audit, allow: []}", "discover.yaml")
    assert loaded.problems == ()
    decision = loaded.policy.decide(SpiffeId.parse("spiffe://e.org/a"), SpiffeId.parse("spiffe://e.org/b"), 443,
                                    datetime.now(timezone.utc))
    assert decision.allowed and decision.audit_only and decision.rule == "discover (audit mode)"
