"""The policy files' JSON Schema (schemas/policy-v1.json) and the lint stage built on it
(issue 20, item 5): editors and `policy lint` read one schema; the loader stays the authority,
so on every generated document the two agree, and on every hand-written bad one both refuse."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh.cli.main import main
from trustmesh.policy.loader import load_text, to_document
from trustmesh.policy.model import Allowlist, AllowRule, IdPattern, PolicyError
from trustmesh.policy.responses import ResponseDocument, ResponseRule
from trustmesh.policy.responses import to_document as response_to_document
from trustmesh.policy.routes import PathPattern, check_method
from trustmesh.policy.schema import (
    SCHEMA_DIR,
    SCHEMA_FILES,
    _ecma,
    check_text,
    field_name,
    field_path,
    load_schema,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)$")

GOOD = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {name: ledger-access, owner: payments}
spec:
  destination: spiffe://example.org/ledger
  ports: [9443]
  allow:
    - from: spiffe://example.org/payments
      methods: [GET, HEAD]
      paths: [/transactions/*, /health]
    - from: spiffe://partner.example/*
      expires: 2031-01-01T00:00:00Z
---
apiVersion: trustmesh/v1
kind: Response
metadata: {name: responses}
spec:
  dry_run: true
  rules:
    - {identity: "*", detectors: sweep, action: ignore}
    - {identity: spiffe://example.org/ns/*, detectors: [sweep, deny_burst], action: quarantine, above: 0.8,
       target: node}
"""


def _agree(text: str) -> tuple[list[str], list[str]]:
    """(fields the schema flags, fields the loader flags) for `text`."""
    report = check_text(text, "p.yaml")
    loaded = load_text(text, "p.yaml", NOW, reject_expired=False)
    return [f.field for f in report.findings], [p.field for p in loaded.problems]


# --- the schema file -------------------------------------------------------------------------

def _subschemas(node: Any, refinements: bool = True) -> list[dict[str, Any]]:
    """Every schema within `node`; without `refinements`, none under if/then/else (which only
    narrow a property described where it is declared)."""
    out = []
    if isinstance(node, dict):
        out.append(node)
        for key, value in node.items():
            if refinements or key not in ("if", "then", "else"):
                out += _subschemas(value, refinements)
    elif isinstance(node, list):
        for value in node:
            out += _subschemas(value, refinements)
    return out


def test_the_schema_is_valid_2020_12_and_every_property_says_what_it_is_for() -> None:
    from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

    for api_version in SCHEMA_FILES:
        schema = load_schema(api_version)
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["properties"]["apiVersion"]["const"] == api_version
        # Editors show a property's description on hover: none may lack one.
        for node in _subschemas(schema, refinements=False):
            for name, prop in node.get("properties", {}).items():
                assert prop.get("description"), f"property {name} has no description"
        for name, definition in schema["$defs"].items():
            assert definition.get("description"), f"$defs/{name} has no description"


def test_the_package_reaches_the_one_schema_file_in_the_repository() -> None:
    # One file, two ways in: editors use schemas/, the installed package trustmesh/policy/schemas.
    assert SCHEMA_DIR.resolve() == (ROOT / "schemas").resolve()
    for name in SCHEMA_FILES.values():
        assert (ROOT / "schemas" / name).is_file()
    assert '"trustmesh.policy" = ["schemas/*.json"]' in (ROOT / "pyproject.toml").read_text()


def _patterns() -> list[str]:
    return sorted({n["pattern"] for n in _subschemas(load_schema("trustmesh/v1")) if "pattern" in n})


PATTERN_SAMPLES = [
    "spiffe://example.org/ledger", "spiffe://example.org/ledger\n", "spiffe://example.org/ns/*", "spiffe://td/*",
    "spiffe://td", "spiffe://td/.", "spiffe://td/a/../b", "spiffe://TD/a", "spiffe://td/a*", "spiffe://td//a",
    "/health", "/health\n", "/a/", "/*", "/a/*", "/a/./b", "/a%2Fb", "/a%20b", "/a%20b%c3", "/a;b", "/a/b*", "/",
    "GET", "get", "GET\n", "X-CUSTOM_1", "2026-12-31T00:00:00Z", "2026-12-31T00:00:00Z\n", "2026-12-31T00:00:00+01:00",
    "2026-12-31", "", "é",
    "08:00-19:00", "08:00-08:00", "22:00-02:00", "00:00-24:00", "24:00-01:00", "08:00-19:00\n", "Europe/London",
    "America/Argentina/Buenos_Aires", "Etc/GMT+5", "../etc", "Europe/London\n",
]


@pytest.mark.skipif(shutil.which("node") is None, reason="node (an ECMA-262 engine) is not installed")
def test_patterns_mean_the_same_to_editors_and_to_lint() -> None:
    # Editors run the patterns as ECMA-262 (unicode) regular expressions; lint runs them with
    # Python's re after turning `$` into the end of the text. Both must compile and agree.
    script = ("const [patterns, samples] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "console.log(JSON.stringify(patterns.map(p => samples.map(s => new RegExp(p, 'u').test(s)))));")
    patterns = _patterns()
    result = subprocess.run(["node", "-e", script], input=json.dumps([patterns, PATTERN_SAMPLES]),
                            capture_output=True, text=True, timeout=60, check=True)
    in_ecma = json.loads(result.stdout)
    for pattern, verdicts in zip(patterns, in_ecma, strict=True):
        for sample, verdict in zip(PATTERN_SAMPLES, verdicts, strict=True):
            assert bool(_ecma(pattern).search(sample)) == verdict, (pattern, sample)


# --- every example in the repository passes ----------------------------------------------------

def _policy_blocks(markdown: str) -> list[str]:
    blocks = re.findall(r"```ya?ml\n(.*?)```", markdown, re.S)
    return [b for b in blocks if re.match(r"(#[^\n]*\n)*apiVersion: trustmesh/v1\nkind: (Allowlist|Response)", b)]


def _examples() -> list[tuple[str, str]]:
    from tests.unit import test_policy_cli

    files = sorted((ROOT / "deploy" / "policies").glob("*.y*ml")) + sorted((ROOT / "docs").rglob("*.y*ml"))
    examples = [(str(f), f.read_text()) for f in files]
    examples += [(f"README.md block {i}", b) for i, b in enumerate(_policy_blocks((ROOT / "README.md").read_text()))]
    examples += [("GOOD", GOOD), ("test_policy_cli.DOC", test_policy_cli.DOC),
                 ("test_policy_cli.ROUTES", test_policy_cli.ROUTES)]
    return examples


def test_every_example_policy_validates() -> None:
    examples = _examples()
    assert any("deploy/policies" in name for name, _ in examples)
    assert sum(name.startswith("README") for name, _ in examples) >= 3
    for name, text in examples:
        assert check_text(text, name).findings == [], name
        assert load_text(text, name, NOW, reject_expired=False).problems == (), name


def test_example_policy_files_carry_the_editor_modeline() -> None:
    files = sorted((ROOT / "deploy" / "policies").glob("*.y*ml")) + sorted((ROOT / "docs").rglob("*.y*ml"))
    assert files
    for file in files:
        first = file.read_text().splitlines()[0]
        match = MODELINE.match(first)
        assert match, f"{file}: first line is not the yaml-language-server modeline"
        assert (file.parent / match.group(1)).resolve() == (SCHEMA_DIR / SCHEMA_FILES["trustmesh/v1"]).resolve()


def test_documents_trustmesh_writes_validate() -> None:
    # What `policy suggest`, `diff` and the server's revisions write must pass the schema too.
    rule = AllowRule(IdPattern.parse("spiffe://example.org/a"), datetime(2031, 1, 1, tzinfo=timezone.utc),
                     ("GET",), (PathPattern.parse("/x/*"),))
    allowlist = Allowlist("n", IdPattern.parse("spiffe://example.org/*"), (rule,), (443,), "audit", "team")
    response = ResponseDocument("r", "", (ResponseRule("r", 0, None, frozenset({"sweep"}), "alert", 0.5),))
    text = "".join("---\n" + yaml.safe_dump(d, sort_keys=False)
                   for d in (to_document(allowlist), response_to_document(response)))
    assert check_text(text, "written").findings == []


# --- hand-written bad documents: both refuse, on the same field ---------------------------------

def _doc(spec: str = "", meta: str = "{name: a}", head: str = "apiVersion: trustmesh/v1\nkind: Allowlist\n") -> str:
    spec = spec or "  destination: spiffe://example.org/x\n  allow:\n    - from: spiffe://example.org/y\n"
    return f"{head}metadata: {meta}\nspec:\n{spec}"


def _rule(extra: str, source: str = "spiffe://example.org/y") -> str:
    return _doc(f"  destination: spiffe://example.org/x\n  allow:\n    - from: {source}\n{extra}")


def _response(rule: str) -> str:
    return _doc(f"  rules:\n    - {rule}\n", head="apiVersion: trustmesh/v1\nkind: Response\n")


BAD = [
    ("apiVersion: trustmesh/v2\nkind: Allowlist\nmetadata: {name: a}\nspec: {}\n", "apiVersion"),
    (_doc(head="kind: Allowlist\n"), "apiVersion"),
    (_doc(head="apiVersion: trustmesh/v1\nkind: Allowlists\n"), "kind"),
    (_doc(head="apiVersion: trustmesh/v1\nkind: Allowlist\ncolour: red\n"), "colour"),
    ("- just\n- a list\n", "(document)"),
    (_doc(meta="{owner: x}"), "metadata.name"),
    (_doc(meta="{name: ''}"), "metadata.name"),
    (_doc(meta="{name: 12}"), "metadata.name"),
    (_doc(meta="{name: " + "n" * 129 + "}"), "metadata.name"),
    (_doc(meta="{name: a, owner: 5}"), "metadata.owner"),
    (_doc(meta="{name: a, team: x}"), "metadata.team"),
    (_doc(meta="x"), "metadata"),
    ("apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {name: a}\n", "spec"),
    (_doc("  destination: spiffe://example.org\n  allow:\n    - from: spiffe://example.org/y\n"), "spec.destination"),
    (_doc("  allow:\n    - from: spiffe://example.org/y\n"), "spec.destination"),
    (_doc("  destination: spiffe://example.org/x\n  allow: []\n"), "spec.allow"),
    (_doc("  destination: spiffe://example.org/x\n  mode: enforce\n  allow: []\n"), "spec.allow"),
    (_doc("  destination: spiffe://example.org/x\n  mode: audit\n"), "spec.allow"),
    (_doc("  destination: spiffe://example.org/x\n  mode: Audit\n  allow: []\n"), "spec.mode"),
    (_doc("  destination: spiffe://example.org/x\n  ports: 9443\n  allow: [{from: spiffe://example.org/y}]\n"),
     "spec.ports"),
    (_doc("  destination: spiffe://example.org/x\n  ports: [0]\n  allow: [{from: spiffe://example.org/y}]\n"),
     "spec.ports[0]"),
    (_doc("  destination: spiffe://example.org/x\n  ports: [65536]\n  allow: [{from: spiffe://example.org/y}]\n"),
     "spec.ports[0]"),
    (_doc("  destination: spiffe://example.org/x\n  ports: [443.0]\n  allow: [{from: spiffe://example.org/y}]\n"),
     "spec.ports[0]"),
    (_doc("  destination: spiffe://example.org/x\n  ports: [true]\n  allow: [{from: spiffe://example.org/y}]\n"),
     "spec.ports[0]"),
    (_doc("  destination: spiffe://example.org/x\n  ports: ['443']\n  allow: [{from: spiffe://example.org/y}]\n"),
     "spec.ports[0]"),
    (_doc("  destination: spiffe://example.org/x\n  allow: [spiffe://example.org/y]\n"), "spec.allow[0]"),
    (_doc("  destination: spiffe://example.org/x\n  allow: [{expires: 2031-01-01T00:00:00Z}]\n"), "spec.allow[0].from"),
    (_rule("", "spiffe://example.org/y/"), "spec.allow[0].from"),
    (_rule("", "spiffe://example.org/y*"), "spec.allow[0].from"),
    (_rule("", "spiffe://example.org/*/y"), "spec.allow[0].from"),
    (_rule("", "spiffe://example.org:443/y"), "spec.allow[0].from"),
    (_rule("", "spiffe://example.org/a/../y"), "spec.allow[0].from"),
    (_rule("", "spiffe://example.org/a%20b"), "spec.allow[0].from"),
    (_rule("", "https://example.org/y"), "spec.allow[0].from"),
    (_rule('', '"spiffe://example.org/y\\n"'), "spec.allow[0].from"),
    (_rule("", "spiffe://" + "a" * 256 + "/y"), "spec.allow[0].from"),
    (_rule("", "spiffe://example.org/" + "y" * 2030), "spec.allow[0].from"),
    (_rule("      owner: x\n"), "spec.allow[0].owner"),
    (_rule("      expires: 2031-01-01T00:00:00\n"), "spec.allow[0].expires"),
    (_rule("      expires: 2031-01-01\n"), "spec.allow[0].expires"),
    (_rule("      expires: tomorrow\n"), "spec.allow[0].expires"),
    (_rule("      expires: '2031-02-30T00:00:00Z'\n"), "spec.allow[0].expires"),
    (_rule("      expires: 1798761600\n"), "spec.allow[0].expires"),
    (_rule("      methods: []\n"), "spec.allow[0].methods"),
    (_doc("  destination: spiffe://example.org/x\n  ports: [443, 443]\n  allow: [{from: spiffe://example.org/y}]\n"),
     "spec.ports[1]"),
    (_rule("      methods: GET\n"), "spec.allow[0].methods"),
    (_rule("      methods: [get]\n"), "spec.allow[0].methods[0]"),
    (_rule("      methods: [GET, GET]\n"), "spec.allow[0].methods[1]"),
    (_rule("      methods: ['1GET']\n"), "spec.allow[0].methods[0]"),
    (_rule("      methods: [" + "G" * 33 + "]\n"), "spec.allow[0].methods[0]"),
    (_rule("      paths: []\n"), "spec.allow[0].paths"),
    (_rule("      paths: [health]\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: [/a/../b]\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: [/a//b]\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: [/a/./b]\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: ['/a?x=1']\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: ['/a;b']\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: ['/a%2Fb']\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: ['/a%2fb']\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: ['/a%41']\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: ['/a%c3%a9']\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: ['/a*']\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: ['/*/a']\n"), "spec.allow[0].paths[0]"),
    (_rule("      paths: [/a, /a]\n"), "spec.allow[0].paths[1]"),
    (_response("{identity: spiffe://example.org/x, action: alert}"), "spec.rules[0].above"),
    (_response("{detectors: [sweep], action: alert, above: 0.5}"), "spec.rules[0].identity"),
    (_response("{identity: '**', action: alert, above: 0.5}"), "spec.rules[0].identity"),
    (_response("{identity: '*', action: page, above: 0.5}"), "spec.rules[0].action"),
    (_response("{identity: '*', action: alert, above: 1.5}"), "spec.rules[0].above"),
    (_response("{identity: '*', action: alert, above: .nan}"), "spec.rules[0].above"),
    (_response("{identity: '*', action: alert, above: true}"), "spec.rules[0].above"),
    (_response("{identity: '*', action: alert, above: 0.5, detectors: []}"), "spec.rules[0].detectors"),
    (_response("{identity: '*', action: alert, above: 0.5, detectors: [bogus]}"), "spec.rules[0].detectors[0]"),
    (_response("{identity: '*', action: alert, above: 0.5, target: node}"), "spec.rules[0].target"),
    (_response("{identity: '*', action: quarantine, above: 0.5, target: host}"), "spec.rules[0].target"),
    (_response("{identity: '*', action: alert, above: 0.5, why: x}"), "spec.rules[0].why"),
    (_doc("  rules: []\n", head="apiVersion: trustmesh/v1\nkind: Response\n"), "spec.rules"),
    (_doc("  dry_run: yes please\n  rules: [{identity: '*', action: ignore}]\n",
          head="apiVersion: trustmesh/v1\nkind: Response\n"), "spec.dry_run"),
    (_doc("  destination: spiffe://example.org/x\n  rules: [{identity: '*', action: ignore}]\n",
          head="apiVersion: trustmesh/v1\nkind: Response\n"), "spec.destination"),
]


@pytest.mark.parametrize(("text", "field"), BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_both_refuse_each_bad_document_on_its_field(text: str, field: str) -> None:
    schema_fields, loader_fields = _agree(text)
    assert field in schema_fields, schema_fields
    assert field in loader_fields, loader_fields


def test_what_only_the_loader_can_see_is_still_reported() -> None:
    # A rule listed twice, and a name repeated across documents: no schema can say these.
    twice = _doc("  destination: spiffe://example.org/x\n  allow:\n    - from: spiffe://example.org/y\n"
                 "    - from: spiffe://example.org/y\n      expires: 2031-01-01T00:00:00Z\n")
    assert _agree(twice) == ([], ["spec.allow[1].from"])
    again = _doc() + "---\n" + _doc().replace("example.org/x", "example.org/z")
    assert _agree(again) == ([], ["metadata.name"])


def test_an_impossible_timestamp_is_a_problem_not_a_crash() -> None:
    text = _rule("      expires: 2031-13-01T00:00:00Z\n")
    assert check_text(text, "p.yaml").findings == []  # the schema stage leaves it to the loader
    assert load_text(text, "p.yaml", NOW).problems


# --- generated documents: the schema accepts exactly what the loader accepts -------------------

# The per-document checks a schema cannot express: a rule or window repeated (equal windows can
# be written differently), and a well-formed zone name missing from the tz database.
LOADER_ONLY = ("duplicates spec.allow[", "unknown time zone")

_td = st.sampled_from(["example.org", "partner.example", "td", "a-b_c.d"])
_segment = st.sampled_from(["payments", "ns", "batch", "a.b", "x-y_z", "..x", "V1"])
_valid_id = st.builds(lambda td, segs, star: f"spiffe://{td}" + "".join("/" + s for s in segs) + star,
                      _td, st.lists(_segment, min_size=1, max_size=3), st.sampled_from(["", "/*"])) | \
    st.builds(lambda td: f"spiffe://{td}/*", _td)
_valid_path = st.builds(lambda segs, tail: "/" + "/".join(segs) + tail,
                        st.lists(st.sampled_from(["health", "a.b", "~x", "%20", "%C3%A9", "a:b@c", "$!&'()+,="]),
                                 max_size=3),
                        st.sampled_from(["", "/", "/*"])).filter(lambda p: "//" not in p)
_valid_method = st.sampled_from(["GET", "HEAD", "POST", "PURGE", "X-CUSTOM_1", "CONNECT"])
_valid_time = (st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1),
                            timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=-5))]))
               | st.sampled_from(["2031-01-01T00:00:00Z", "2031-01-01T00:00:00.5+01:00", "2020-02-29T23:59:59Z"]))

# Faults, each of the kind of value it replaces: near misses of every grammar.
_fuzzy_id = st.builds(lambda a, b: a + b, st.sampled_from(["spiffe://", "spiffe://td", "spiffe://td/", "SPIFFE://",
                                                          "spiffe://td/a/", ""]),
                      st.text(alphabet="az09.-_/*%?#@:AZ \né", max_size=14))
_fuzzy_path = st.text(alphabet="/a.Z0-_~!$&'()*+,;=:@%2fFc3Bb?#\\ é\x00\n", max_size=12)
_fuzzy_method = st.text(alphabet="GETPOSgta0_- é\n", max_size=6)
_fuzzy_time = (st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1))
               | st.dates(min_value=date(2000, 1, 1), max_value=date(2040, 1, 1))
               | st.sampled_from(["2031-01-01T00:00:00", "2031-02-30T00:00:00Z", "2031-01-01T24:00:00Z", "2031",
                                  "2031-01-01 00:00:00Z", "2031-01-01T00:00:00+24:00", "20310101T000000Z",
                                  "2031-01-01t00:00:00z", "2031-01-01T00:00:00Z\n"]))
_DAY_NAMES = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_valid_hours = st.builds(lambda a, b: f"{a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}",
                         st.integers(0, 1439), st.integers(0, 1440)).filter(lambda h: h[:5] != h[6:]) \
    | st.sampled_from(["08:00-19:00", "22:00-02:00", "00:00-24:00"])
_valid_zone = st.sampled_from(["Europe/London", "America/New_York", "UTC", "Etc/GMT+5", "Asia/Kolkata",
                               "America/Argentina/Buenos_Aires", "Europe/Nowhere"])  # the last: loader-only
_window_st = st.fixed_dictionaries({"hours": _valid_hours, "timezone": _valid_zone},
                                   optional={"days": st.lists(st.sampled_from(_DAY_NAMES), min_size=1, max_size=7,
                                                              unique=True)})
_fuzzy_hours = st.sampled_from(["8:00-19:00", "08:00-08:00", "24:00-01:00", "08:60-09:00", "08:00-24:01", "08:00",
                                "08:00-19:00\n", "０8:00-19:00", "23:59-00:00", "00:00-24:00", ""]) | st.text(
    alphabet="0123456789:-", max_size=11)
_fuzzy_zone = st.sampled_from(["europe/london", "Europe/London/", "../etc/passwd", "/UTC", "Mars/Base", "UTC ", "",
                               "Etc/GMT+5", "EST5EDT", "a/b/c/d/e", "Europe//London"])
_fuzzy_days = st.sampled_from([["mon", "mon"], ["Mon"], ["monday"], [], "mon", [1], ["sun", "sat"]])
_scalar = (st.none() | st.booleans() | st.integers(-3, 70000) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=8) | st.lists(st.integers(0, 3), max_size=2)
           | st.dictionaries(st.sampled_from(["k", "from"]), st.integers(0, 3), max_size=1)
           | st.sampled_from(["Allowlist", "Response", "trustmesh/v2", "audit", "enforce", "node", "*", "sweep"]))
_FAULTS: dict[str, st.SearchStrategy[Any]] = {
    "from": _fuzzy_id, "destination": _fuzzy_id, "identity": _fuzzy_id, "paths": _fuzzy_path,
    "methods": _fuzzy_method, "expires": _fuzzy_time, "ports": st.integers(-1, 65537) | st.floats(0, 70000),
    "above": st.floats(-0.5, 1.5) | st.integers(-1, 2) | st.booleans(), "name": st.text(max_size=130),
    "detectors": st.sampled_from(["sweep", "*", "bogus", "Sweep"]),
    "hours": _fuzzy_hours, "timezone": _fuzzy_zone, "days": _fuzzy_days,
    "when": st.sampled_from([[], {}, "08:00-19:00", [{}]]),
}

_rule_st = st.fixed_dictionaries({"from": _valid_id}, optional={
    "expires": _valid_time, "methods": st.lists(_valid_method, min_size=1, max_size=3, unique=True),
    "paths": st.lists(_valid_path, min_size=1, max_size=3, unique=True),
    "when": _window_st | st.lists(_window_st, min_size=1, max_size=3)})
_allowlist = st.fixed_dictionaries({
    "apiVersion": st.just("trustmesh/v1"), "kind": st.just("Allowlist"),
    "metadata": st.fixed_dictionaries({"name": st.text(min_size=1, max_size=4)},
                                      optional={"owner": st.none() | st.text(max_size=4)}),
    "spec": st.fixed_dictionaries({"destination": _valid_id, "allow": st.lists(_rule_st, min_size=1, max_size=3)},
                                  optional={"ports": st.lists(st.integers(1, 65535), max_size=3, unique=True),
                                            "mode": st.sampled_from(["enforce", "audit"])}),
})


@st.composite
def _response_rule(draw: st.DrawFn) -> dict[str, Any]:
    action = draw(st.sampled_from(["ignore", "alert", "quarantine"]))
    rule: dict[str, Any] = {"identity": draw(st.just("*") | _valid_id), "action": action}
    if action != "ignore" or draw(st.booleans()):
        rule["above"] = draw(st.floats(0, 1) | st.sampled_from([0, 1]))
    if draw(st.booleans()):
        rule["detectors"] = draw(st.sampled_from(["sweep", "*"])
                                 | st.lists(st.sampled_from(["sweep", "volume", "new_node", "*"]), min_size=1))
    if draw(st.booleans()):
        rule["target"] = "node" if action == "quarantine" and draw(st.booleans()) else "identity"
    return rule


_response = st.fixed_dictionaries({
    "apiVersion": st.just("trustmesh/v1"), "kind": st.just("Response"),
    "metadata": st.fixed_dictionaries({"name": st.sampled_from(["r", "responses"])}),
    "spec": st.fixed_dictionaries({"rules": st.lists(_response_rule(), min_size=1, max_size=3)},
                                  optional={"dry_run": st.booleans()}),
})


def _places(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _places(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _places(value, path + (i,))
    return out


@st.composite
def _documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid document with up to two faults: a value replaced by a near miss of its kind (or
    anything), a key dropped, or a key added."""
    doc: dict[str, Any] = draw(_allowlist | _response)
    for _ in range(draw(st.integers(0, 2))):
        place = draw(st.sampled_from(_places(doc)[1:]))
        parent = doc
        for part in place[:-1]:
            parent = parent[part]
        key = next((p for p in reversed(place) if isinstance(p, str)), "")
        action = draw(st.sampled_from(["near", "near", "replace", "drop", "add"]))
        if action == "near" and key in _FAULTS:
            parent[place[-1]] = draw(_FAULTS[key])
        elif action in ("near", "replace"):
            parent[place[-1]] = draw(_scalar)
        elif action == "drop" and isinstance(parent, dict):
            del parent[place[-1]]
        elif action == "drop":
            parent.clear()
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "Spec", "from", "owner", "ports", "mode", "above"]))] = draw(_scalar)
    return doc


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents())
def test_the_schema_accepts_exactly_what_the_loader_accepts(doc: dict[str, Any]) -> None:
    text = yaml.safe_dump(doc, sort_keys=False)
    report = check_text(text, "gen.yaml")
    loaded = load_text(text, "gen.yaml", NOW, reject_expired=False)
    refused = [p for p in loaded.problems if not p.message.startswith(LOADER_ONLY)]
    # Never silently laxer (the schema passes what the loader refuses), nor stricter.
    assert (report.findings == []) == (refused == []), (text, [str(f) for f in report.findings],
                                                        [str(p) for p in refused])


def _grammar(*keys: str) -> re.Pattern[str]:
    node: Any = load_schema("trustmesh/v1")
    for key in keys:
        node = node[key]
    return _ecma(node["pattern"])


def _parses(parse: Any, text: str) -> bool:
    try:
        parse(text)
    except PolicyError:
        return False
    return True


_ALLOW_RULE = ("$defs", "allowRule", "properties")


@settings(max_examples=1500, deadline=None)
@given(_valid_id | _fuzzy_id | st.text(max_size=16))
def test_the_spiffe_id_grammar_is_the_loaders(text: str) -> None:
    assert bool(_grammar("$defs", "idPattern").search(text)) == _parses(IdPattern.parse, text), text


@settings(max_examples=1500, deadline=None)
@given(_valid_path | _fuzzy_path | st.text(max_size=12) | st.text(alphabet="/%0123456789ABCDEFabcdef.*", max_size=10))
def test_the_path_grammar_is_the_loaders(text: str) -> None:
    assert bool(_grammar(*_ALLOW_RULE, "paths", "items").search(text)) == _parses(PathPattern.parse, text), text


@settings(max_examples=500, deadline=None)
@given(_valid_method | _fuzzy_method | st.text(max_size=40, alphabet="GETX_-09a"))
def test_the_method_grammar_is_the_loaders(text: str) -> None:
    assert bool(_grammar(*_ALLOW_RULE, "methods", "items").search(text)) == _parses(check_method, text), text


def test_ids_at_the_length_limits() -> None:
    grammar = _grammar("$defs", "idPattern")
    for text in ["spiffe://td/" + "a" * 2036, "spiffe://td/" + "a" * 2037, "spiffe://td/" + "a" * 2036 + "/*",
                 "spiffe://td/" + "a" * 2037 + "/*", "spiffe://" + "t" * 255 + "/a", "spiffe://" + "t" * 256 + "/a"]:
        assert bool(grammar.search(text)) == _parses(IdPattern.parse, text), len(text)


# --- `policy lint` --------------------------------------------------------------------------------

def _lint(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["policy", "lint", *args])
    return code, capsys.readouterr().out


def test_lint_reports_schema_errors_with_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("ports: [9443]", "ports: [9443, 0]").replace("[GET, HEAD]", "[get]")
                   .replace("dry_run: true", "dry_run: true\n  colour: red"))
    code, out = _lint(capsys, str(bad))
    assert code == 1
    lines = out.splitlines()
    # The loader's more precise words, the schema's position; one line per field.
    assert f"{bad}: document 1: spec.ports[1]: 0 is not a port number (a decimal 1 to 65535) (line 6, column 17)" \
        in lines
    assert f"{bad}: document 1: spec.allow[0].methods[0]: 'get' is not a method: methods are case-sensitive; " \
           "use GET (line 9, column 17)" in lines
    assert f"{bad}: document 2: spec.colour: unknown key; allowed here: dry_run, rules (line 19, column 3)" in lines
    assert lines[-1] == "3 problem(s)" and len(lines) == 4


def test_lint_names_the_versions_it_knows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "v2.yaml").write_text(GOOD.replace("trustmesh/v1", "trustmesh/v2", 1))
    code, out = _lint(capsys, str(tmp_path))
    assert code == 1
    assert "document 1: apiVersion: unknown apiVersion 'trustmesh/v2'; this trustmesh knows trustmesh/v1 " \
           "(write apiVersion: trustmesh/v1) (line 1, column 1)" in out


def test_lint_json_lists_every_finding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text(GOOD.replace("mode", "x").replace("kind: Response", "kind: Respond"))
    (tmp_path / "b.yaml").write_text(GOOD.replace("/ledger", "/other").replace("responses", "other"))
    (tmp_path / "c.yaml").write_text("a: [b\n")
    code, out = _lint(capsys, "--json", str(tmp_path))
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    found = {(Path(p["source"]).name, p["document"], p["field"], p["check"]): p for p in report["problems"]}
    kind = found[("a.yaml", 2, "kind", "schema")]
    assert kind["line"] == 15 and kind["column"] == 1 and "must be 'Allowlist' or 'Response'" in kind["message"]
    # Fields of an Allowlist then: spec.rules is unknown, spec.destination and spec.allow missing.
    assert ("a.yaml", 2, "spec.rules", "schema") in found and ("a.yaml", 2, "spec.allow", "schema") in found
    # Across files (an allowlist named twice) and unreadable YAML: the loader's, as before.
    assert found[("b.yaml", 1, "metadata.name", "loader")]["line"] == 3
    assert found[("c.yaml", 1, "line 2", "loader")]["line"] is None
    assert set(kind) == {"source", "document", "field", "message", "line", "column", "check"}
    code, out = _lint(capsys, "--json", str(tmp_path / "b.yaml"))
    assert code == 0 and json.loads(out) == {"ok": True, "problems": [], "warnings": [], "allowlists": 1,
                                             "responses": 1}


def test_field_names_and_paths_are_inverse() -> None:
    for path in [("spec", "allow", 0, "from"), ("metadata",), ("spec", "rules", 12, "detectors", 1)]:
        assert field_path(field_name(path)) == path
    assert field_name(()) == "(document)"
    assert field_path("line 6") is None and field_path("(file)") is None
