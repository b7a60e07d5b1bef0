"""Policy files are read strictly: what a file says is what it means, or it is refused with
file, document and line; every size has a named limit (issue 14, hole 4)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.policy import Policy, load_text
from trustmesh.policy.loader import (
    MAX_FILE_BYTES,
    MAX_NAME_CHARS,
    MAX_OWNER_CHARS,
    MAX_RULES_PER_ALLOWLIST,
    REVISION,
)
from trustmesh.policy.model import Allowlist, AllowRule, IdPattern
from trustmesh.policy.strict_yaml import MAX_DEPTH, describe, load_all_strict
from trustmesh.policy.wire import MAX_COMPILED_POLICY_BYTES, compiled_size_problem

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)

DOC = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access, owner: {owner}}}
spec:
  destination: spiffe://example.org/ledger
  ports: [{port}]
  mode: enforce
  allow:
    - from: spiffe://example.org/payments
"""


def doc(owner: str = "payments", port: str = "9443") -> str:
    return DOC.format(owner=owner, port=port)


def refusal(text: str) -> str:
    """The one problem `text` gets, as printed."""
    loaded = load_text(text, "team/a.yaml", NOW)
    assert len(loaded.problems) == 1, [str(p) for p in loaded.problems]
    return str(loaded.problems[0])


def test_a_clean_file_still_loads() -> None:
    loaded = load_text(doc(), "team/a.yaml", NOW)
    assert loaded.ok and loaded.policy.allowlists[0].ports == (9443,)


def test_a_duplicate_key_is_refused_with_file_document_and_line() -> None:
    # Loose YAML: the second `mode` silently won, so an "enforce" file enforced nothing.
    text = "---\n" + doc() + "---\n" + doc().replace("  mode: enforce\n", "  mode: enforce\n  mode: audit\n")
    loaded = load_text(text, "team/a.yaml", NOW)
    assert [str(p) for p in loaded.problems] == [
        "team/a.yaml: document 2: line 19: duplicate key 'mode' (first at line 18); keep one"]


@pytest.mark.parametrize(("port", "meant"), [("010", "8"), ("0o10", None), ("1:20", "80"), ("0x1F", "31"),
                                             ("1_000", "1000"), ("yes", "True"), ("on", "True")])
def test_ports_must_be_plain_decimals(port: str, meant: str | None) -> None:
    message = refusal(doc(port=port))
    if meant is None:  # not a YAML 1.1 number: a string, refused as not a port
        assert "spec.ports[0]: '0o10' is not a port number" in message
    else:
        assert message.startswith("team/a.yaml: document 1: line 6: ")
        assert f"{port!r} is ambiguous (YAML 1.1 reads it as {meant})" in message


@pytest.mark.parametrize("port", ["true", "8080.0", "'80'", "0", "65536", "-1", "null"])
def test_ports_that_are_not_1_to_65535_are_refused(port: str) -> None:
    assert "spec.ports[0]" in refusal(doc(port=port)) and "is not a port number" in refusal(doc(port=port))


def test_a_quoted_ambiguous_value_is_text() -> None:
    loaded = load_text(doc(owner="'010'"), "a.yaml", NOW)
    assert loaded.ok and loaded.policy.allowlists[0].owner == "010"


BOMB = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata:
  name: ledger-access
  owner:
    - &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    - &a1 [*a0,*a0,*a0,*a0,*a0,*a0,*a0,*a0,*a0]
    - &a2 [*a1,*a1,*a1,*a1,*a1,*a1,*a1,*a1,*a1]
    - &a3 [*a2,*a2,*a2,*a2,*a2,*a2,*a2,*a2,*a2]
    - &a4 [*a3,*a3,*a3,*a3,*a3,*a3,*a3,*a3,*a3]
    - &a5 [*a4,*a4,*a4,*a4,*a4,*a4,*a4,*a4,*a4]
    - &a6 [*a5,*a5,*a5,*a5,*a5,*a5,*a5,*a5,*a5]
spec: {destination: spiffe://example.org/ledger, allow: [{from: spiffe://example.org/payments}]}
"""


def test_an_alias_bomb_is_refused_at_its_first_anchor() -> None:
    # All inside metadata.owner, which loose loading turned into megabytes of text.
    assert len(BOMB) < 700  # 9^7 strings, ~33 MB of owner once expanded
    assert refusal(BOMB) == ("team/a.yaml: document 1: line 6: anchors (&a0) are not allowed; "
                             "write the value out")


def test_an_alias_to_a_scalar_is_refused() -> None:
    text = doc(owner="&o payments").replace("spec:\n", "spec:\n  description: *o\n")
    assert "anchors (&o) are not allowed" in refusal(text)
    with pytest.raises(yaml.YAMLError) as err:
        load_all_strict("a: *o\n", "x")
    assert "aliases (*o) are not allowed" in describe(err.value)[2]


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 50_000])
@pytest.mark.parametrize("style", ["flow-seq", "flow-map", "block"])
def test_deep_nesting_is_one_line_not_a_recursion_error(depth: int, style: str) -> None:
    if style == "flow-seq":
        text = "[" * depth + "]" * depth
    elif style == "flow-map":
        text = "{a: " * depth + "1" + "}" * depth
    else:
        text = "- " * depth + "x\n"
    message = refusal(text)
    assert f"nested deeper than the limit of {MAX_DEPTH} levels (MAX_DEPTH)" in message and "\n" not in message


@pytest.mark.parametrize(("tag", "allowed"), [("!!python/object/apply:os.system", False), ("!custom", False),
                                              ("!!binary", False), ("!!set", False), ("!!timestamp", False),
                                              ("!", False), ("!!str", True)])
def test_only_core_tags(tag: str, allowed: bool) -> None:
    loaded = load_text(doc(owner=f"{tag} payments"), "a.yaml", NOW)
    assert loaded.ok is allowed, loaded.problems
    if not allowed:
        assert "is not allowed; only the core tags" in str(loaded.problems[0])


def test_a_merge_key_is_only_an_unknown_key() -> None:
    text = doc().replace("spec:\n", "spec:\n  <<: {mode: audit}\n")
    assert "spec.<<: unknown key" in refusal(text)


def test_names_and_owners_are_bounded() -> None:
    assert (f"metadata.owner: {MAX_OWNER_CHARS + 1} characters, above the limit of {MAX_OWNER_CHARS} "
            "(MAX_OWNER_CHARS)") in refusal(doc(owner="o" * (MAX_OWNER_CHARS + 1)))
    assert load_text(doc(owner="o" * MAX_OWNER_CHARS), "a.yaml", NOW).ok
    long_name = doc().replace("name: ledger-access", "name: " + "n" * (MAX_NAME_CHARS + 1))
    assert f"1 to {MAX_NAME_CHARS} characters (MAX_NAME_CHARS)" in refusal(long_name)
    assert "metadata.owner: must be text" in refusal(doc(owner="[a, b]"))


def test_rules_per_allowlist_are_bounded() -> None:
    rules = "".join(f"    - from: spiffe://example.org/s{i}\n" for i in range(MAX_RULES_PER_ALLOWLIST))
    assert (f"spec.allow: {MAX_RULES_PER_ALLOWLIST + 1} rules, above the limit of {MAX_RULES_PER_ALLOWLIST} "
            "(MAX_RULES_PER_ALLOWLIST)") in refusal(doc() + rules)


def test_file_size_is_bounded_before_parsing() -> None:
    text = doc() + "#" * MAX_FILE_BYTES
    assert f"above the limit of {MAX_FILE_BYTES} bytes (MAX_FILE_BYTES)" in refusal(text)
    assert load_text(text, "stored revision", NOW, limits=REVISION).ok


def test_the_compiled_policy_is_bounded() -> None:
    def allowlist(n: int, rules: int) -> Allowlist:
        return Allowlist(f"a{n}", IdPattern.parse(f"spiffe://example.org/d{n}"),
                         tuple(AllowRule(IdPattern.parse(f"spiffe://example.org/{i}{'x' * 500}"))
                               for i in range(rules)))
    assert compiled_size_problem(Policy((allowlist(0, 1000),))) is None
    problem = compiled_size_problem(Policy((allowlist(0, 1000), allowlist(1, 1000), allowlist(2, 200))))
    assert problem is not None
    assert f"above the limit of {MAX_COMPILED_POLICY_BYTES} bytes (MAX_COMPILED_POLICY_BYTES)" in problem


# -- properties -------------------------------------------------------------------------

# Text YAML can carry as itself: no control characters, surrogates or line separators
# (PyYAML's dumper mangles some of those, which is not what these tests are about).
chars = st.characters(exclude_categories=("Cc", "Cs", "Cf", "Co", "Cn", "Zl", "Zp"))
texts = st.text(chars, max_size=20)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), texts, st.floats(allow_nan=False, allow_infinity=False))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(texts, inner, max_size=4), max_leaves=20)


@given(st.dictionaries(texts | st.integers(), values, max_size=6))
@settings(max_examples=200)
def test_any_mapping_round_trips(mapping: dict[Any, Any]) -> None:
    text = yaml.safe_dump(mapping, allow_unicode=True)
    assert load_all_strict(text, "x") == [mapping]


@given(st.lists(st.text(chars, min_size=1, max_size=10), min_size=1, max_size=6, unique=True), st.data())
@settings(max_examples=200)
def test_any_duplicate_key_is_refused(keys: list[str], data: st.DataObject) -> None:
    duplicate = data.draw(st.sampled_from(keys))
    position = data.draw(st.integers(keys.index(duplicate) + 1, len(keys)))
    ordered = [*keys[:position], duplicate, *keys[position:]]
    nested = data.draw(st.booleans())
    lines = [f"{'  ' if nested else ''}{json.dumps(k, ensure_ascii=False)}: {i}" for i, k in enumerate(ordered)]
    text = ("outer:\n" if nested else "") + "\n".join(lines) + "\n"
    with pytest.raises(yaml.YAMLError) as err:
        load_all_strict(text, "x")
    document, line, message = describe(err.value)
    assert (document, line) == (1, position + 1 + nested)
    assert message.startswith(f"duplicate key {duplicate!r}")
