"""Allowlists: patterns, loading with precise problems, and the decision (default deny)."""

from __future__ import annotations

import string
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.controlplane.policy_store import canonical, diff_text
from trustmesh.policy import AllowRule, Decision, HttpRequest, IdPattern, PathPattern, PolicyError, load_text
from trustmesh.policy.loader import dump_documents, to_document
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


# --- HTTP routes: methods and paths ------------------------------------------------------------

ROUTES = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {name: ledger-read, owner: payments-platform}
spec:
  destination: spiffe://example.org/ledger
  allow:
    - from: spiffe://example.org/fraud-scoring
      methods: [GET, HEAD]
      paths: ["/transactions/*", "/health"]
    - from: spiffe://example.org/fraud-scoring
      methods: [POST]
      paths: [/scores]
    - from: spiffe://example.org/payments
    - from: spiffe://example.org/reporting
      paths: ["/reports/*"]
    - from: spiffe://example.org/dav
      methods: [PROPFIND]
    - from: spiffe://example.org/temp
      methods: [GET]
      expires: 2026-12-01T00:00:00Z
"""
LEDGER_ID, FRAUD = S("spiffe://example.org/ledger"), S("spiffe://example.org/fraud-scoring")


def routes_policy():  # type: ignore[no-untyped-def]
    loaded = load_text(ROUTES, "routes.yaml", NOW)
    assert loaded.ok, loaded.problems
    return loaded.policy


def ask(source: str, method: str, path: str, at: datetime = NOW, text: str = ROUTES) -> Decision:
    loaded = load_text(text, "routes.yaml", NOW)
    assert loaded.ok, loaded.problems
    return loaded.policy.decide(S(source), LEDGER_ID, 443, at, request=HttpRequest(method, path))


@pytest.mark.parametrize(("source", "method", "path", "verdict", "rule", "route"), [
    ("fraud-scoring", "GET", "/transactions/42", "ALLOW", "ledger-read allow[0]", "GET /transactions/*"),
    ("fraud-scoring", "HEAD", "/health", "ALLOW", "ledger-read allow[0]", "HEAD /health"),
    ("fraud-scoring", "POST", "/transactions/42", "DENY", "default deny", "POST"),
    ("fraud-scoring", "GET", "/transactions", "DENY", "default deny", "GET"),
    ("fraud-scoring", "GET", "/health/x", "DENY", "default deny", "GET"),
    ("fraud-scoring", "POST", "/scores", "ALLOW", "ledger-read allow[1]", "POST /scores"),
    ("fraud-scoring", "get", "/health", "DENY", "default deny", "OTHER"),  # methods are case-sensitive
    ("payments", "DELETE", "/anything", "ALLOW", "ledger-read allow[2]", "DELETE *"),
    ("payments", "BREW", "/pot", "ALLOW", "ledger-read allow[2]", "OTHER *"),
    ("reporting", "PATCH", "/reports/q3", "ALLOW", "ledger-read allow[3]", "PATCH /reports/*"),
    ("reporting", "GET", "/transactions/1", "DENY", "default deny", "GET"),
    ("dav", "PROPFIND", "/x", "ALLOW", "ledger-read allow[4]", "PROPFIND *"),  # named by the policy
    ("dav", "GET", "/x", "DENY", "default deny", "GET"),
    ("temp", "GET", "/x", "ALLOW", "ledger-read allow[5]", "GET *"),
])
def test_requests_are_decided_by_method_and_path(source: str, method: str, path: str, verdict: str, rule: str,
                                                 route: str) -> None:
    decision = ask(f"spiffe://example.org/{source}", method, path)
    assert (decision.verdict, decision.rule, decision.route) == (verdict, rule, route), decision.reason


def test_a_route_rule_never_allows_a_plain_connection() -> None:
    decision = routes_policy().decide(FRAUD, LEDGER_ID, 443, NOW)
    assert not decision.allowed and decision.route == ""
    assert decision.reason == ("ledger-read allow[0] allows only HTTP requests (methods/paths): serve this port "
                               "with an http listener")
    # A rule without routes still allows the connection, and a request on it.
    plain = routes_policy().decide(S("spiffe://example.org/payments"), LEDGER_ID, 443, NOW)
    assert plain.allowed and plain.route == ""


@pytest.mark.parametrize(("source", "method"), [("fraud-scoring", "DELETE"), ("fraud-scoring", "POST"),
                                                ("nobody", "GET"), ("temp", "GET"), ("reporting", "GET")])
def test_request_reasons_never_hold_the_path(source: str, method: str) -> None:
    # 403 bodies and logs carry reasons; paths can hold account numbers.
    later = NOW + timedelta(days=30)  # temp's rule has expired
    decision = ask(f"spiffe://example.org/{source}", method, "/accounts/acct-4111111111111111", later)
    assert not decision.allowed
    assert "4111" not in decision.reason + decision.route and "acct" not in decision.reason + decision.route


def test_request_reasons_say_what_did_not_match() -> None:
    wrong_path = ask("spiffe://example.org/fraud-scoring", "GET", "/accounts/4111111111111111")
    assert wrong_path.reason == ("no rule of ledger-read allows GET from spiffe://example.org/fraud-scoring "
                                 "on this path")
    wrong_method = ask("spiffe://example.org/fraud-scoring", "DELETE", "/transactions/4111111111111111")
    assert wrong_method.reason == "no rule of ledger-read allows DELETE from spiffe://example.org/fraud-scoring"


def test_route_rules_expire() -> None:
    later = NOW + timedelta(days=30)
    decision = ask("spiffe://example.org/temp", "GET", "/x", later)
    assert not decision.allowed and "ledger-read allow[5] expired at 2026-12-01T00:00:00Z" in decision.reason


def test_audit_mode_with_routes() -> None:
    audit = ROUTES.replace("spec:\n", "spec:\n  mode: audit\n")
    decision = ask("spiffe://example.org/fraud-scoring", "DELETE", "/transactions/1", text=audit)
    assert decision.allowed and decision.audit_only
    assert (decision.rule, decision.route) == ("ledger-read (audit mode)", "DELETE")
    assert "transactions" not in decision.reason
    exact = ask("spiffe://example.org/fraud-scoring", "GET", "/transactions/1", text=audit)
    assert exact.allowed and not exact.audit_only and exact.route == "GET /transactions/*"


def test_quarantine_refuses_requests_too() -> None:
    policy = replace(routes_policy(), quarantined=frozenset({str(FRAUD)}))
    decision = policy.decide(FRAUD, LEDGER_ID, 443, NOW, request=HttpRequest("GET", "/health"))
    assert not decision.allowed and decision.rule == "quarantine" and decision.route == "GET"


def test_the_policy_knows_its_methods_for_labels() -> None:
    assert routes_policy().route_methods == frozenset({"GET", "HEAD", "POST", "PROPFIND"})
    assert policy().route_methods == frozenset()


def test_rules_with_and_without_routes() -> None:
    rule = AllowRule(IdPattern.parse("spiffe://e.org/a"))
    assert rule.covers(None) == "*" and rule.covers(HttpRequest("GET", "/x")) == "*" and not rule.routed
    routed = AllowRule(IdPattern.parse("spiffe://e.org/a"), None, ("GET",), (PathPattern.parse("/x/*"),))
    assert routed.routed and routed.covers(None) is None
    assert routed.covers(HttpRequest("GET", "/x/1")) == "/x/*" and routed.covers(HttpRequest("PUT", "/x/1")) is None
    methods_only = AllowRule(IdPattern.parse("spiffe://e.org/a"), methods=("GET",))
    assert methods_only.covers(HttpRequest("GET", "/any")) == "*" and methods_only.covers(None) is None
    assert routed == AllowRule(IdPattern.parse("spiffe://e.org/a"), None, ("GET",), (PathPattern.parse("/x/*"),))


RULE_DOC = ("apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a}\n"
            "spec: {destination: spiffe://e.org/x, allow: [%s]}")


@pytest.mark.parametrize(("rules", "field", "message"), [
    ("{from: spiffe://e.org/y, methods: []}", "spec.allow[0].methods", "must be a non-empty list"),
    ("{from: spiffe://e.org/y, methods: GET}", "spec.allow[0].methods", "must be a non-empty list"),
    ("{from: spiffe://e.org/y, paths: []}", "spec.allow[0].paths", "must be a non-empty list"),
    ("{from: spiffe://e.org/y, paths: /a}", "spec.allow[0].paths", "must be a non-empty list"),
    ("{from: spiffe://e.org/y, methods: [GET, get]}", "spec.allow[0].methods[1]", "case-sensitive; use GET"),
    ("{from: spiffe://e.org/y, methods: [GET, 12]}", "spec.allow[0].methods[1]", "not a method"),
    ("{from: spiffe://e.org/y, methods: [GET, HEAD, GET]}", "spec.allow[0].methods[2]", "GET is listed twice"),
    ("{from: spiffe://e.org/y, paths: [/a, /b/../c]}", "spec.allow[0].paths[1]", "write '/c'"),
    ("{from: spiffe://e.org/y, paths: [/a, '/a/*/b']}", "spec.allow[0].paths[1]", "final '/*'"),
    ("{from: spiffe://e.org/y, paths: [/a, '/b?x=1']}", "spec.allow[0].paths[1]", "no query"),
    ("{from: spiffe://e.org/y, paths: ['/a/*', /b, '/a/*']}", "spec.allow[0].paths[2]", "/a/* is listed twice"),
    ("{from: spiffe://e.org/y, paths: ['/a;b']}", "spec.allow[0].paths[0]", "path parameters"),
    ("{from: spiffe://e.org/y, verbs: [GET]}", "spec.allow[0].verbs", "allowed here: expires, from, methods, paths"),
    ("{from: spiffe://e.org/y, methods: [%s]}" % ", ".join(f"M{i}" for i in range(33)), "spec.allow[0].methods",
     "MAX_METHODS_PER_RULE"),
    ("{from: spiffe://e.org/y, paths: [%s]}" % ", ".join(f"/p{i}" for i in range(65)), "spec.allow[0].paths",
     "MAX_PATHS_PER_RULE"),
    ("{from: spiffe://e.org/y, methods: [GET], paths: [/a]}, {from: spiffe://e.org/y, paths: [/a], methods: [GET]}",
     "spec.allow[1].from", "duplicates spec.allow[0] (spiffe://e.org/y, the same methods and paths)"),
    ("{from: spiffe://e.org/y, methods: [GET, HEAD]}, {from: spiffe://e.org/y, methods: [HEAD, GET]}",
     "spec.allow[1].from", "duplicates spec.allow[0]"),
])
def test_route_problems_name_their_field(rules: str, field: str, message: str) -> None:
    loaded = load_text(RULE_DOC % rules, "team/a.yaml", NOW)
    hits = [p for p in loaded.problems if p.field == field and message in p.message]
    assert hits, [str(p) for p in loaded.problems]


def test_every_field_of_a_bad_rule_is_reported() -> None:
    loaded = load_text(RULE_DOC % "{from: bad, methods: [get], paths: [x], expires: soon}", "a.yaml", NOW)
    assert {p.field for p in loaded.problems} == {"spec.allow[0].from", "spec.allow[0].methods[0]",
                                                  "spec.allow[0].paths[0]", "spec.allow[0].expires"}


def test_one_source_may_have_several_routes() -> None:
    loaded = load_text(RULE_DOC % ("{from: spiffe://e.org/y, methods: [GET], paths: [/a]}, "
                                   "{from: spiffe://e.org/y, methods: [POST], paths: [/b]}, "
                                   "{from: spiffe://e.org/y, methods: [GET], paths: [/b]}"), "a.yaml", NOW)
    assert loaded.ok, loaded.problems
    assert [len(r.methods) for r in loaded.policy.allowlists[0].allow] == [1, 1, 1]


def test_unusual_methods_are_warnings() -> None:
    loaded = load_text(RULE_DOC % "{from: spiffe://e.org/y, methods: [GET, PROPFIND, CONNECT]}", "a.yaml", NOW)
    assert loaded.ok
    assert [(w.field, w.message.split(" ")[0]) for w in loaded.warnings] == [
        ("spec.allow[0].methods[1]", "PROPFIND"), ("spec.allow[0].methods[2]", "http")]
    assert "not a standard method" in loaded.warnings[0].message and "CONNECT" in loaded.warnings[1].message


def test_routes_round_trip_through_documents() -> None:
    original = routes_policy()
    text = dump_documents(original.allowlists)
    assert "methods:\n" in text and "- /transactions/*" in text
    again = load_text(text, "dumped.yaml", NOW)
    assert again.ok, again.problems
    assert again.policy.allowlists == original.allowlists
    assert to_document(original.allowlists[0])["spec"]["allow"][0] == {
        "from": "spiffe://example.org/fraud-scoring", "methods": ["GET", "HEAD"],
        "paths": ["/transactions/*", "/health"]}


def test_a_diff_shows_route_changes() -> None:
    before = routes_policy()
    after = load_text(ROUTES.replace("methods: [GET, HEAD]", "methods: [GET, HEAD, DELETE]"), "r.yaml", NOW).policy
    diff = diff_text(before, after, "old", "new")
    assert "   - HEAD\n+  - DELETE\n   paths:\n" in diff, diff
    assert canonical(before) != canonical(after)
