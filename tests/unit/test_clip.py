"""The one clipping rule for caller input echoed in messages, logs, audit events and records."""

from __future__ import annotations

import pytest

from trustmesh.clip import AUTHOR, COMMENT, ENTRY_ID, MARKER, REASON, SHOWN, clip, shown
from trustmesh.errors import InvalidSpiffeIdError


@pytest.mark.parametrize("limit", [SHOWN, ENTRY_ID, AUTHOR, COMMENT, REASON, 4, 3, 1, 0])
def test_clipped_text_is_never_longer_than_the_limit(limit: int) -> None:
    for n in (0, 1, limit - 1, limit, limit + 1, 10 * limit + 7, 100_000):
        text = "x" * max(n, 0)
        out = clip(text, limit)
        assert len(out) <= limit or out == text
        assert len(out) <= max(limit, len(text))


def test_text_within_the_limit_is_unchanged() -> None:
    assert clip("ledger", SHOWN) == "ledger"
    assert clip("x" * SHOWN, SHOWN) == "x" * SHOWN
    assert clip("", 0) == ""


def test_clipped_text_says_it_was_clipped() -> None:
    out = clip("abcdefghij" * 20, SHOWN)
    assert len(out) == SHOWN and out.endswith(MARKER) and out.startswith("abcdefghij")
    assert "abcdefghij".startswith(clip("abcdefghij", 3)), "too short for a marker: just the start"


def test_shown_quotes_so_control_characters_cannot_forge_lines() -> None:
    out = shown("evil\nlevel=error msg=forged" + "y" * 5000)
    assert "\n" not in out and out.startswith("'evil\\n") and out.endswith("...'")
    assert len(out) <= 2 * SHOWN + 2


def test_the_limits_keep_their_meaning() -> None:
    # Changing one changes what the API stores or answers: see the callers before you do.
    assert (SHOWN, ENTRY_ID, AUTHOR, COMMENT, REASON) == (96, 64, 256, 1024, 2000)


def test_a_huge_invalid_spiffe_id_is_quoted_clipped() -> None:
    err = InvalidSpiffeIdError("spiffe://" + "x" * 100_000, "too long")
    assert len(str(err)) < SHOWN + 60 and err.value.startswith("spiffe://xxx")
