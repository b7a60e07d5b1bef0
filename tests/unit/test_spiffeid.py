"""SPIFFE ID parsing: a table of every rule in the standard, plus property tests."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import InvalidSpiffeIdError
from trustmesh.spiffeid import SpiffeId, TrustDomain, is_valid

VALID = [
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/ledger", "example.org", "/ledger"),
    ("spiffe://example.org/ns/batch/sa/worker-1", "example.org", "/ns/batch/sa/worker-1"),
    ("spiffe://a", "a", ""),
    ("spiffe://1.2.3.4/x", "1.2.3.4", "/x"),
    ("spiffe://td_with-all.chars09/Path_With-All.Chars09", "td_with-all.chars09", "/Path_With-All.Chars09"),
    ("spiffe://example.org/...", "example.org", "/..."),  # three dots is a plain segment
    ("spiffe://example.org/.hidden", "example.org", "/.hidden"),
    ("spiffe://example.org/UPPER/case", "example.org", "/UPPER/case"),  # paths may use upper case
]

INVALID = [
    ("", "empty"),
    ("example.org/ledger", "scheme"),
    ("http://example.org/ledger", "scheme"),
    ("SPIFFE://example.org/ledger", "scheme must be lower-case"),
    ("Spiffe://example.org", "scheme must be lower-case"),
    ("spiffe:/example.org", "scheme"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///path", "trust domain is missing"),
    ("spiffe://Example.org", "lower case"),
    ("spiffe://example.org:8080/x", "port"),
    ("spiffe://user@example.org/x", "userinfo"),
    ("spiffe://user:pw@example.org/x", "port"),  # ':' is seen first
    ("spiffe://exa mple.org", "not allowed"),
    ("spiffe://example.org%2F/x", "percent"),
    ("spiffe://ex/ample/", "must not end with '/'"),
    ("spiffe://example.org/", "must not end with '/'"),
    ("spiffe://example.org//x", "empty segments"),
    ("spiffe://example.org/x//y", "empty segments"),
    ("spiffe://example.org/./x", "'.' or '..'"),
    ("spiffe://example.org/x/..", "'.' or '..'"),
    ("spiffe://example.org/x/../y", "'.' or '..'"),
    ("spiffe://example.org/x?y=1", "query"),
    ("spiffe://example.org?y=1", "query"),
    ("spiffe://example.org/x#frag", "fragment"),
    ("spiffe://example.org#frag", "fragment"),
    ("spiffe://example.org/x%20y", "percent"),
    ("spiffe://example.org/caf\u00e9", "not allowed"),
    ("spiffe://example.org/a b", "not allowed"),
    ("spiffe://example.org/a:b", "not allowed"),
    ("spiffe://example.org/a@b", "not allowed"),
    ("spiffe://example.org/a\\b", "not allowed"),
    ("spiffe://" + "a" * 256, "longer than 255"),
    ("spiffe://example.org/" + "a" * 2048, "longer than 2048"),
]


@pytest.mark.parametrize(("text", "td", "path"), VALID)
def test_valid_ids_parse_and_round_trip(text: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.trust_domain == TrustDomain(td)
    assert sid.path == path
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid
    assert is_valid(text)


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_invalid_ids_are_refused_with_the_rule_named(text: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as info:
        SpiffeId.parse(text)
    assert reason in str(info.value)
    assert info.value.value == text
    assert not is_valid(text)


def test_exactly_2048_bytes_is_allowed_and_2049_is_not() -> None:
    prefix = "spiffe://example.org/"
    ok = prefix + "a" * (2048 - len(prefix))
    assert len(ok) == 2048
    assert str(SpiffeId.parse(ok)) == ok
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId.parse(ok + "a")


def test_trust_domain_of_255_bytes_is_allowed() -> None:
    assert TrustDomain("a" * 255).name == "a" * 255
    with pytest.raises(InvalidSpiffeIdError):
        TrustDomain("a" * 256)


def test_trust_domain_parse_accepts_a_name_or_an_id() -> None:
    assert TrustDomain.parse("example.org") == TrustDomain("example.org")
    assert TrustDomain.parse("spiffe://example.org/ledger") == TrustDomain("example.org")
    with pytest.raises(InvalidSpiffeIdError):
        TrustDomain.parse("Example.org")
    with pytest.raises(InvalidSpiffeIdError):
        TrustDomain.parse("https://example.org")


def test_trust_domain_id_and_membership() -> None:
    td = TrustDomain("example.org")
    assert str(td.id) == "spiffe://example.org"
    assert td.id.is_trust_domain_id
    ledger = td.spiffe_id("/ledger")
    assert ledger.is_member_of(td)
    assert not ledger.is_member_of(TrustDomain("partner.example"))
    assert not ledger.is_trust_domain_id


def test_from_parts_validates_each_segment() -> None:
    assert str(SpiffeId.from_parts("example.org", "agent", "node-1")) == "spiffe://example.org/agent/node-1"
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId.from_parts("example.org", "agent", "node/1", "")
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId.from_parts("example.org", "..")
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId.from_parts("example.org", "")


def test_constructor_validates_as_parse_does() -> None:
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId(TrustDomain("example.org"), "no-leading-slash")
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId(TrustDomain("example.org"), "/a/")


def test_ids_are_frozen_hashable_and_never_equal_to_strings() -> None:
    sid = SpiffeId.parse("spiffe://example.org/ledger")
    assert sid != "spiffe://example.org/ledger"
    assert {sid, SpiffeId.parse("spiffe://example.org/ledger")} == {sid}
    with pytest.raises(AttributeError):
        sid.path = "/other"  # type: ignore[misc]


def test_non_string_input_is_refused() -> None:
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId.parse(b"spiffe://example.org/x")  # type: ignore[arg-type]


# --- property tests -------------------------------------------------------------------

td_labels = st.text(alphabet=string.ascii_lowercase + string.digits + ".-_", min_size=1, max_size=40)
segments = st.text(alphabet=string.ascii_letters + string.digits + ".-_", min_size=1, max_size=20).filter(
    lambda s: s not in (".", "..")
)
paths = st.lists(segments, max_size=6).map(lambda segs: "".join("/" + s for s in segs))


@given(td=td_labels, path=paths)
def test_every_well_formed_id_round_trips(td: str, path: str) -> None:
    text = f"spiffe://{td}{path}"
    sid = SpiffeId.parse(text)
    assert str(sid) == text
    assert sid.trust_domain.name == td
    assert sid.path == path


@given(st.text(max_size=200))
@settings(max_examples=500)
def test_arbitrary_text_either_parses_to_itself_or_is_refused_cleanly(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except InvalidSpiffeIdError:
        return
    assert str(sid) == text


@given(td=td_labels, path=paths, bad=st.sampled_from(list("?#%:@ /\\") + ["\u00e9", "\x00", "A"]))
def test_a_forbidden_character_in_the_trust_domain_is_always_refused(td: str, path: str, bad: str) -> None:
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId.parse(f"spiffe://{td}{bad}x{path}") if bad != "/" else TrustDomain(td + bad)


@given(td=td_labels, segs=st.lists(segments, min_size=1, max_size=5), bad=st.sampled_from(["", ".", ".."]))
def test_empty_and_dot_segments_are_always_refused(td: str, segs: list[str], bad: str) -> None:
    segs = [*segs[:1], bad, *segs[1:]]
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId.parse(f"spiffe://{td}" + "".join("/" + s for s in segs))


@given(td=td_labels, path=paths)
def test_a_trailing_slash_is_always_refused(td: str, path: str) -> None:
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId.parse(f"spiffe://{td}{path}/")
