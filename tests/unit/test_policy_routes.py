"""HTTP routes (trustmesh/policy/routes.py): request paths made unambiguous or refused, path
patterns, methods and bounded route labels."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trustmesh.policy import AmbiguousPathError, PathPattern, PolicyError, normalize_path, route_label
from trustmesh.policy.routes import (
    MAX_PATH_CHARS,
    STANDARD_METHODS,
    check_method,
)

# --- normalize_path: tables --------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "normal"), [
    ("/", "/"),
    ("/transactions/42", "/transactions/42"),
    ("/a/", "/a/"),  # a trailing slash is kept
    ("/a/.", "/a/"),
    ("/a/./b", "/a/b"),
    ("/a/b/..", "/a/"),
    ("/a/b/../c", "/a/c"),
    ("/a/..", "/"),
    ("/.", "/"),
    ("/a/%2e%2e/b", "/b"),  # decoded before dot segments are removed
    ("/a/%2E./b", "/b"),
    ("/a/.%2e", "/"),
    ("//a///b", "/a/b"),
    ("/a//", "/a/"),
    ("/a//../b", "/b"),
    ("/%41%62%7e%2D%5f", "/Ab~-_"),  # unreserved characters decoded
    ("/caf%c3%a9", "/caf%C3%A9"),  # other escapes upper-cased, not decoded
    ("/100%25", "/100%25"),
    ("/a%3f%23b", "/a%3F%23b"),  # an encoded ? or # is data
    ("/.well-known/x", "/.well-known/x"),
    ("/..a/b..", "/..a/b.."),
    ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
])
def test_paths_that_normalise(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal
    assert normalize_path(normal) == normal


@pytest.mark.parametrize(("raw", "why"), [
    ("/a%2Fb", "encoded slash"),
    ("/a%2fb", "encoded slash"),
    ("/a%5Cb", "encoded backslash"),
    ("/a%5cb", "encoded backslash"),
    ("/a\\b", "backslash"),
    ("/a\x00", "NUL"),
    ("/a%00", "NUL"),
    ("/a\tb", "control character"),
    ("/a%0Ab", "control character"),
    ("/a%7f", "control character"),
    ("/a\x7f", "control character"),
    ("/a%G1", "two hex digits"),
    ("/a%", "two hex digits"),
    ("/a%2", "two hex digits"),
    ("/a%+1", "two hex digits"),
    ("/a%\u0661\u0661", "two hex digits"),  # Arabic-Indic digits: int() would take them
    ("/a#b", "fragment"),
    ("/public;x/../admin", "path parameters"),
    ("/a;b", "path parameters"),
    ("/public/..%3B/admin", "%3B"),
    ("/..", "above the root"),
    ("/a/../..", "above the root"),
    ("/%2e%2e/a", "above the root"),
    ("/caf\u00e9", "ASCII"),
    ("/a b", "only letters"),
    *[(f"/a{c}b", "only letters") for c in "\"<>[]{}|^`?"],
    ("a/b", "start with '/'"),
    ("", "start with '/'"),
    ("*", "start with '/'"),
    ("http://example.org/a", "start with '/'"),
    ("/" + "a" * MAX_PATH_CHARS, "MAX_PATH_CHARS"),
])
def test_ambiguous_paths_are_refused(raw: str, why: str) -> None:
    with pytest.raises(AmbiguousPathError) as caught:
        normalize_path(raw)
    assert why in caught.value.reason and str(caught.value) == caught.value.reason


@pytest.mark.parametrize("tail", ["%2F", "\\", ";x", "%00", "%zz", "#", " ", "/../../..", "\u00e9"])
def test_a_refusal_never_quotes_the_path(tail: str) -> None:
    # The reason goes into 400 bodies, logs and flows; paths can hold account numbers.
    with pytest.raises(AmbiguousPathError) as caught:
        normalize_path("/accounts/4111111111111111" + tail)
    assert "4111" not in caught.value.reason and "accounts" not in caught.value.reason


def test_the_bound_is_on_the_raw_path() -> None:
    longest = "/" + "a" * (MAX_PATH_CHARS - 1)
    assert normalize_path(longest) == longest


def test_the_common_case_returns_the_same_object() -> None:
    # The per-request fast path: a plain path is checked and returned, never rebuilt.
    raw = "".join(["/transactions/", "42"])
    assert normalize_path(raw) is raw


# --- normalize_path: properties ----------------------------------------------------------------

UNRESERVED = string.ascii_letters + string.digits + "-._~"
pieces = st.one_of(
    st.sampled_from(["/", "//", ".", "..", "/./", "/../", "%2e", "%2E", "%2f", "%5c", "%25", "%c3%a9", "%", "%4",
                     ";", "\\", "\x00", "#", "?", "é", " ", ":", "@", "*"]),
    st.text(alphabet=UNRESERVED, min_size=1, max_size=4),
    st.builds(lambda c: f"%{ord(c):02x}", st.sampled_from(UNRESERVED)),
)
paths = st.lists(pieces, max_size=12).map(lambda parts: "/" + "".join(parts))


@given(paths)
@settings(max_examples=300)
@example("/a/%2e%2e/b")
@example("/a/./")
def test_normalised_paths_are_fixed_points_without_ambiguity(raw: str) -> None:
    try:
        normal = normalize_path(raw)
    except AmbiguousPathError:
        return
    assert normalize_path(normal) == normal
    assert normal.startswith("/")
    for bad in ("//", "/./", "/../", "%2F", "%2f", "%5C", "%5c", "\\", "\x00", ";"):
        assert bad not in normal
    assert not normal.endswith("/..") and not normal.endswith("/.")


@given(st.text(alphabet=UNRESERVED, min_size=1, max_size=1), st.text(alphabet=UNRESERVED, max_size=6),
       st.text(alphabet=UNRESERVED, max_size=6), st.booleans())
@settings(max_examples=200)
def test_an_unreserved_character_and_its_encoding_are_the_same_path(char: str, before: str, after: str,
                                                                    upper: bool) -> None:
    encoded = f"%{ord(char):02X}" if upper else f"%{ord(char):02x}"
    plain, escaped = f"/x/{before}{char}{after}", f"/x/{before}{encoded}{after}"
    try:
        expected = normalize_path(plain)
    except AmbiguousPathError:
        with pytest.raises(AmbiguousPathError):
            normalize_path(escaped)
        return
    assert normalize_path(escaped) == expected


@given(st.text(max_size=80))
@settings(max_examples=300)
def test_any_text_normalises_or_is_refused_cleanly(raw: str) -> None:
    try:
        normalize_path(raw)
    except AmbiguousPathError as err:
        assert err.reason


# --- path patterns -----------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("/health", "/health", True),
    ("/health", "/health/", False),
    ("/health", "/healthz", False),
    ("/transactions/*", "/transactions/x", True),
    ("/transactions/*", "/transactions/x/y", True),
    ("/transactions/*", "/transactions/", True),  # "*" matches any rest, even an empty one
    ("/transactions/*", "/transactions", False),
    ("/transactions/*", "/transactionsX", False),
    ("/transactions/*", "/transactionsX/y", False),
    ("/*", "/", True),
    ("/*", "/anything/at/all", True),
    ("/a/b/*", "/a/b/c", True),
    ("/a/b/*", "/a/c/b", False),
])
def test_patterns_match_whole_segments(pattern: str, path: str, matches: bool) -> None:
    parsed = PathPattern.parse(pattern)
    assert str(parsed) == pattern
    assert parsed.matches(path) is matches


@pytest.mark.parametrize(("text", "message"), [
    ("/a/*/b", "only allowed as a final '/*'"),
    ("/a*", "only allowed as a final '/*'"),
    ("*", "only allowed as a final '/*'"),
    ("/a/**", "only allowed as a final '/*'"),
    ("/a?b=1", "no query"),
    ("/a/./b", "not a normalised path; write '/a/b'"),
    ("//a/*", "not a normalised path; write '/a/*'"),
    ("/caf%c3%a9", "write '/caf%C3%A9'"),
    ("/%41", "write '/A'"),
    ("health", "must start with '/'"),
    ("", "must start with '/'"),
    ("/a;b", "path parameters"),
    ("/../a", "above the root"),
    (42, "not a path pattern"),
    (None, "not a path pattern"),
])
def test_malformed_patterns_are_refused(text: object, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        PathPattern.parse(text)
    assert message in str(caught.value)


@given(st.text(max_size=40))
@settings(max_examples=200)
def test_a_pattern_parses_to_its_own_text_or_is_refused(text: str) -> None:
    try:
        pattern = PathPattern.parse(text)
    except PolicyError:
        return
    assert str(pattern) == text
    assert PathPattern.parse(str(pattern)) == pattern


# --- methods and labels ------------------------------------------------------------------------

@pytest.mark.parametrize("method", [*STANDARD_METHODS, "PROPFIND", "M-SEARCH", "X_CUSTOM1", "A" * 32])
def test_methods_a_rule_may_name(method: str) -> None:
    assert check_method(method) == method


@pytest.mark.parametrize(("text", "message"), [
    ("get", "'get' is not a method: methods are case-sensitive; use GET"),
    ("Post", "case-sensitive; use POST"),
    ("1GET", "a letter first"),
    ("-GET", "a letter first"),
    ("GET ", "a letter first"),
    ("G.ET", "a letter first"),
    ("", "a letter first"),
    ("A" * 33, "at most 32 characters"),
    ("GÉT", "a letter first"),
    (7, "not a method"),
    (["GET"], "not a method"),
])
def test_malformed_methods_are_refused(text: object, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        check_method(text)
    assert message in str(caught.value)


def test_route_labels_are_bounded_and_never_a_path() -> None:
    assert route_label("GET", "/transactions/*") == "GET /transactions/*"
    assert route_label("GET", "*") == "GET *"
    assert route_label("POST", None) == "POST"
    # A method neither standard nor named by the policy cannot mint a label of its own.
    assert route_label("BREW", None) == "OTHER"
    assert route_label("X" * 30, "/a") == "OTHER /a"
    assert route_label("PROPFIND", "/dav/*", frozenset({"PROPFIND"})) == "PROPFIND /dav/*"
