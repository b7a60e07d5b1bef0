"""Suggested allowlists, simulation, the graph renderings and the flows export format."""

from __future__ import annotations

import json
import string
import subprocess
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.detect.trace import TraceRecord, record_to_line
from trustmesh.flowgraph import build, render
from trustmesh.flows import DECISIONS, Flow, FlowFormatError, flow_from_dict, flow_to_dict, read_jsonl, valid_route
from trustmesh.policy import load_paths, load_text
from trustmesh.policy.model import IdPattern
from trustmesh.policy.suggest import simulate, suggest

TD = "spiffe://example.org"
WEB, BATCH, LEDGER, FX = f"{TD}/web", f"{TD}/batch/nightly", f"{TD}/ledger", f"{TD}/fx"
T0 = 1_800_000_000.0
NOW = datetime.fromtimestamp(T0 + 3600, timezone.utc)


def flow(src: str, dst: str, port: int = 8443, decision: str = "audit", n: int = 5, *, address: str = "",
         rule: str = "catch-all (audit mode)") -> Flow:
    return Flow(src, dst, port, decision, rule, n, 100 * n, 1000 * n, T0, T0 + 60, address)


OBSERVED = [
    flow(WEB, LEDGER, 8443, n=40),
    flow(BATCH, LEDGER, 8443, "allow", n=3, rule="ledger allow[0]"),
    flow(BATCH, LEDGER, 9090, n=1),  # batch's metrics scrape: a second port, batch only
    flow(WEB, FX, 7000, n=12),
    flow(f"{TD}/attacker", LEDGER, 8443, "deny", n=7, rule="default deny"),  # never reached the ledger
    flow("", LEDGER, 8443, "unverified", n=2, address="10.1.2.3"),
]


def write(tmp_path: Path, flows: list[Flow], **options: object) -> Path:
    out = tmp_path / "proposed"
    out.mkdir(exist_ok=True)
    for s in suggest(flows, **options):  # type: ignore[arg-type]
        (out / s.filename).write_text(s.text)
    return out


def test_a_suggestion_allows_exactly_what_went_through(tmp_path: Path) -> None:
    out = write(tmp_path, OBSERVED)
    loaded = load_paths([out])
    assert loaded.problems == () and loaded.warnings == ()
    policy = loaded.policy
    assert {a.mode for a in policy.allowlists} == {"audit"}
    # Exactly the sources and ports seen: web only on 8443, batch on 8443 and 9090.
    exact = [(str(a.destination), a.ports, sorted(str(r.source) for r in a.allow)) for a in policy.allowlists]
    assert sorted(exact) == [(FX, (7000,), [WEB]), (LEDGER, (8443,), [WEB]), (LEDGER, (8443, 9090), [BATCH])]
    # Replaying the same traffic: nothing that went through would be denied, every rule used.
    result = simulate(policy, OBSERVED, NOW)
    assert result.would_deny == [] and result.unused_rules == []
    assert [f.source_address for f in result.unverified] == ["10.1.2.3"]
    assert result.newly_allowed == []  # the denied caller stays denied
    text = (out / "ledger.yaml").read_text()
    assert "10.1.2.3 on port 8443: 2 connection(s)" in text  # the plaintext caller, as a comment only
    assert "# 40 connection(s), first seen 2027-01-15T08:00:00Z" in text
    assert "attacker" not in text


def test_min_connections_prefixes_and_teams(tmp_path: Path) -> None:
    [ledger] = suggest(OBSERVED, min_connections=5, owns=lambda d: d == LEDGER, team="payments")
    policy = load_text(ledger.text, "ledger.yaml").policy
    assert [str(r.source) for a in policy.allowlists for r in a.allow] == [WEB]  # batch's 4 fell below
    assert {a.owner for a in policy.allowlists} == {"payments"}
    grouped = suggest(OBSERVED, group_prefixes=[IdPattern.parse(f"{TD}/batch/*")], owns=lambda d: d == LEDGER)
    rules = {str(r.source) for a in load_text(grouped[0].text, "x").policy.allowlists for r in a.allow}
    assert rules == {WEB, f"{TD}/batch/*"}


def test_simulate_catches_a_removed_rule_and_reports_unused_ones(tmp_path: Path) -> None:
    out = write(tmp_path, OBSERVED)
    candidate = (out / "ledger.yaml").read_text().replace(f'- from: "{WEB}"', f'- from: "{TD}/someone-else"')
    (out / "ledger.yaml").write_text(candidate)
    result = simulate(load_paths([out]).policy, OBSERVED, NOW)
    assert [(r.flow.source, r.flow.destination, r.flow.port) for r in result.would_deny] == [(WEB, LEDGER, 8443)]
    assert result.would_deny[0].reason.startswith("no rule of suggested-ledger-8443, suggested-ledger-8443-9090 allows")
    assert result.would_deny[0].reason.endswith("(an audit-mode allowlist lets it through until enforced)")
    assert [source for _, source in result.unused_rules] == [f"{TD}/someone-else"]


def test_simulate_reports_a_denied_flow_the_candidate_would_let_in() -> None:
    policy = load_text(f"""
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: open-ledger}}
spec: {{destination: "{LEDGER}", mode: enforce, allow: [{{from: "{TD}/*"}}]}}
""", "x").policy
    result = simulate(policy, OBSERVED, NOW)
    assert [f.source for f in result.newly_allowed] == [f"{TD}/attacker"]
    assert [r.flow.destination for r in result.would_deny] == [FX]  # no allowlist covers fx any more


def test_simulate_replays_http_flows_by_their_route() -> None:
    """An HTTP flow keeps its method and the pattern it was counted under, never its path: a
    candidate is judged on those (a prefix as the prefix itself)."""
    read_only = load_text(f"""
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-read}}
spec:
  destination: "{LEDGER}"
  allow: [{{from: "{WEB}", methods: [GET], paths: ["/transactions/*", /health]}}]
""", "x").policy

    def request(route: str, decision: str = "allow") -> Flow:
        return replace(flow(WEB, LEDGER, 8443, decision, rule="ledger allow[0]"), route=route)

    observed = [request("GET /transactions/*"), request("GET /health"), request("POST *"), request("DELETE", "deny"),
                flow(WEB, LEDGER, 8443, "allow", rule="ledger allow[0]")]  # a plain connection
    result = simulate(read_only, observed, NOW)
    assert [(r.flow.route, r.reason) for r in result.would_deny] == [
        ("POST *", f"no rule of ledger-read allows POST from {WEB}"),
        ("", "ledger-read allow[0] allows only HTTP requests (methods/paths): serve this port with an http "
             "listener")]
    assert not result.newly_allowed and result.judged == 5


def test_the_graph_in_three_formats(tmp_path: Path) -> None:
    graph = build(OBSERVED)
    assert ("unverified:10.1.2.3", "unverified") in graph.nodes
    data = json.loads(render(graph, "json"))
    ledger_from_batch = [e for e in data["edges"] if e["source"] == BATCH]
    assert ledger_from_batch == [
        {"source": BATCH, "destination": LEDGER, "decision": "allow", "ports": [8443], "connections": 3,
         "bytes_in": 300, "bytes_out": 3000, "first_seen": "2027-01-15T08:00:00Z", "last_seen": "2027-01-15T08:01:00Z"},
        {"source": BATCH, "destination": LEDGER, "decision": "audit", "ports": [9090], "connections": 1,
         "bytes_in": 100, "bytes_out": 1000, "first_seen": "2027-01-15T08:00:00Z",
         "last_seen": "2027-01-15T08:01:00Z"}]
    mermaid = render(graph, "mermaid")
    assert mermaid.startswith("flowchart LR\n") and '--x|"deny :8443 x7"|' in mermaid
    dot = render(graph, "dot")
    try:
        rendered = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        pytest.skip("graphviz (dot) is not installed")
    assert rendered.returncode == 0, rendered.stderr
    assert "<svg" in rendered.stdout and "unverified:10.1.2.3" in rendered.stdout


def test_a_hostile_name_stays_one_quoted_dot_string() -> None:
    nasty = Flow(WEB, LEDGER, 1, "allow", "", 1, 0, 0, T0, T0, "")
    graph = build([nasty, Flow("", LEDGER, 1, "unverified", "", 1, 0, 0, T0, T0, 'x"];evil->"y\n')])
    dot = render(graph, "dot")
    assert 'x\\"];evil->\\"y\\n' in dot and dot.count("\n") == len(dot.splitlines())
    assert '#quot;' in render(graph, "mermaid")


def test_an_unverified_address_never_breaks_out_of_its_comment() -> None:
    [s] = suggest([flow("", LEDGER, 1, "unverified", address="1.2.3.4\nkind: Allowlist")])
    assert "kind: Allowlist" not in s.text and "unknown on port 1" in s.text


# --- the export format ------------------------------------------------------------------

ids = st.sampled_from([WEB, LEDGER, "", f"{TD}/a b"])
flows = st.builds(Flow, ids, ids, st.integers(0, 65535), st.sampled_from(DECISIONS),
                  st.text(string.printable, max_size=20), st.integers(0, 2**40), st.integers(0, 2**40),
                  st.integers(0, 2**40), st.integers(1, 2**32).map(float), st.integers(1, 2**32).map(float),
                  st.sampled_from(["", "10.0.0.1", "::1"]), st.sampled_from(["", "GET", "GET *", "POST /tx/*"]))


@settings(max_examples=200, deadline=None)
@given(flows)
def test_export_lines_read_back_identical(f: Flow) -> None:
    assert flow_from_dict(json.loads(json.dumps(flow_to_dict(f))), "line 1") == f


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["source", "destination", "port", "decision", "rule", "connections",
                                        "bytes_in", "bytes_out", "first_seen", "last_seen", "source_address",
                                        "route"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=30),
                                 st.floats(), st.lists(st.integers(), max_size=2))))
def test_any_json_object_is_a_flow_or_a_one_line_refusal(data: dict[str, object]) -> None:
    try:
        f = flow_from_dict(data, "line 7")
    except FlowFormatError as err:
        assert str(err).startswith("line 7: ") and "\n" not in str(err)
        return
    assert f.decision in DECISIONS and 0 <= f.port <= 65535 and f.connections >= 0 and valid_route(f.route)


def test_a_line_without_a_route_is_a_connection_and_a_bad_route_is_refused(tmp_path: Path) -> None:
    request = Flow(WEB, LEDGER, 8443, "allow", "ledger allow[0]", 3, 10, 20, T0, T0 + 60, route="GET /tx/*")
    line = flow_to_dict(request)
    assert line["route"] == "GET /tx/*" and flow_from_dict(line, "line 1") == request
    # A file `flows export --format edges` wrote before flows had routes.
    older = {k: v for k, v in line.items() if k != "route"}
    assert flow_from_dict(older, "line 1") == Flow(WEB, LEDGER, 8443, "allow", "ledger allow[0]", 3, 10, 20, T0,
                                                   T0 + 60)
    for bad in ("GET /tx/1 HTTP/1.1", "get /tx", "GET /tx\n", "GET " + "/x" * 200, 7):
        with pytest.raises(FlowFormatError, match="line 1: 'route' must be"):
            flow_from_dict(line | {"route": bad}, "line 1")
    path = tmp_path / "flows.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(older) + "\n")
    assert [f.route for f in read_jsonl(path)] == ["GET /tx/*", ""]


def test_a_bad_export_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    good = json.dumps(flow_to_dict(OBSERVED[0]))
    path.write_text(f"{good}\n\n{good}\n")
    assert read_jsonl(path) == [OBSERVED[0], OBSERVED[0]]
    path.write_text(f"{good}\n{{not json\n")
    with pytest.raises(FlowFormatError, match="line 2: not JSON"):
        read_jsonl(path)
    path.write_text(json.dumps(flow_to_dict(OBSERVED[0]) | {"decision": "maybe"}) + "\n")
    with pytest.raises(FlowFormatError, match="line 1: 'decision' must be one of"):
        read_jsonl(path)
    with pytest.raises(FlowFormatError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_just_in_time_access_is_never_evidence_for_a_standing_rule() -> None:
    granted = flow(FX, LEDGER, 8443, "allow", n=4, rule="access/0123456789ab allow[0]")
    [s] = suggest([granted, *OBSERVED[:1]], owns=lambda d: d == LEDGER)
    policy = load_text(s.text, "x").policy
    assert [str(r.source) for a in policy.allowlists for r in a.allow] == [WEB]
    assert f"#   {FX}: 4 connection(s)" in s.text
    result = simulate(policy, [granted, *OBSERVED[:1]], NOW)
    assert result.would_deny == [] and result.granted == [granted]


def test_destinations_with_the_same_file_name_do_not_overwrite_each_other(tmp_path: Path) -> None:
    clashing = [flow(WEB, f"{TD}/a-b"), flow(WEB, f"{TD}/a/b"), flow(WEB, "spiffe://other.example/a-b")]
    suggestions = suggest(clashing)
    assert len({s.filename for s in suggestions}) == 3
    out = write(tmp_path, clashing)
    loaded = load_paths([out])
    assert loaded.problems == ()  # names unique too
    assert sorted(str(a.destination) for a in loaded.policy.allowlists) == sorted(f.destination for f in clashing)


def _trace_line(ts: float, source: str, destination: str, port: int, decision: str, conns: int,
                node: str = "node-1") -> str:
    return record_to_line(TraceRecord(ts, node, source, destination, port, decision, conns, 10 * conns, conns))


def test_a_trace_export_is_read_as_flows_per_edge(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(_trace_line(T0 + 60, WEB, LEDGER, 8443, "audit", 30)
                    + _trace_line(T0 + 60, "unverified:10.1.2.3", LEDGER, 8443, "unverified", 2, node="")
                    + "\n"
                    + _trace_line(T0 + 180, WEB, LEDGER, 8443, "audit", 10, node="node-2")  # another node: same edge
                    + json.dumps(flow_to_dict(OBSERVED[1])) + "\n")  # a per-edge line in the same file
    web, unverified = (Flow(WEB, LEDGER, 8443, "audit", "", 40, 400, 40, T0, T0 + 180),
                       Flow("", LEDGER, 8443, "unverified", "", 2, 20, 2, T0, T0 + 60, "10.1.2.3"))
    assert read_jsonl(path) == [OBSERVED[1], web, unverified]
    # simulate on the trace: the audit-mode edge would be denied once the rule is gone.
    policy = load_text(f"""\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger}}
spec: {{destination: "{LEDGER}", allow: [{{from: "{BATCH}"}}]}}
""", "ledger.yaml").policy
    result = simulate(policy, read_jsonl(path)[1:], NOW)
    assert [r.flow.source for r in result.would_deny] == [WEB]
    assert [f.source_address for f in result.unverified] == ["10.1.2.3"]


def test_a_bad_trace_line_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    good = _trace_line(T0, WEB, LEDGER, 8443, "allow", 1)
    path.write_text(good + good.replace('"allow"', '"maybe"'))
    with pytest.raises(FlowFormatError, match="line 2: 'decision' must be one of"):
        read_jsonl(path)
    path.write_text(good + '{"ts": "yesterday", "source": "a"}\n')
    with pytest.raises(FlowFormatError, match="line 2: 'ts' must be an ISO 8601"):
        read_jsonl(path)
    path.write_text("[" * 50_000 + "\n")  # nested deeper than the JSON parser recurses
    with pytest.raises(FlowFormatError, match="line 1: not JSON"):
        read_jsonl(path)
