from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustmesh.selectors import InvalidSelectorError, Selector, matches, parse_selectors


@pytest.mark.parametrize(
    "text",
    [
        "unix:uid:0", "unix:uid:1000", "unix:gid:4294967295", "unix:user:www-data", "unix:group:staff",
        "unix:path:/usr/bin/python3", "unix:sha256:" + "a" * 64, "join_token:node:node-1",
        "x509pop:subject:cn:node-1.example.org", "x509pop:ca:fingerprint:" + "0" * 64, "node:name:n1",
    ],
)
def test_valid(text: str) -> None:
    assert str(Selector.parse(text)) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("uid:1000", "unknown selector type"),
        ("k8s:ns:default", "unknown selector type"),
        ("unix", "TYPE:VALUE"),
        ("unix:uid:-1", "decimal"),
        ("unix:uid:4294967296", "decimal"),
        ("unix:uid:abc", "decimal"),
        ("unix:uid:", "decimal"),
        ("unix:pid:12", "unknown unix selector"),
        ("unix:path:relative/bin", "absolute"),
        ("unix:sha256:ABC", "hex"),
        ("unix:user:bad name", "user or group"),
        ("join_token:node:", "node name"),
    ],
)
def test_invalid(text: str, reason: str) -> None:
    with pytest.raises(InvalidSelectorError) as info:
        Selector.parse(text)
    assert reason in str(info.value)


def test_canonical_form_is_sorted_and_unique() -> None:
    sels = parse_selectors(["unix:uid:1", "unix:gid:2", "unix:uid:1"])
    assert [str(s) for s in sels] == ["unix:gid:2", "unix:uid:1"]


def test_matching_needs_all_and_at_least_one() -> None:
    caller = parse_selectors(["unix:uid:1000", "unix:gid:1000", "unix:user:app"])
    assert matches(parse_selectors(["unix:uid:1000"]), caller)
    assert matches(parse_selectors(["unix:uid:1000", "unix:user:app"]), caller)
    assert not matches(parse_selectors(["unix:uid:1000", "unix:user:other"]), caller)
    assert not matches((), caller)


@given(st.text(max_size=80))
def test_arbitrary_text_is_parsed_or_refused_cleanly(text: str) -> None:
    try:
        sel = Selector.parse(text)
    except InvalidSelectorError:
        return
    assert str(sel) == text
