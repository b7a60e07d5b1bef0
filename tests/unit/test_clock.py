"""The one clock and its two text forms (trustmesh/clock.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from trustmesh.clock import format_utc, parse_utc, utc_now

WHEN = datetime(2026, 11, 22, 10, 0, 5, tzinfo=timezone.utc)


def test_utc_now_is_aware_utc_and_current() -> None:
    now = utc_now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert abs(now - datetime.now(timezone.utc)) < timedelta(seconds=5)


def test_format_reads_datetimes_and_wire_seconds_alike() -> None:
    assert format_utc(WHEN) == "2026-11-22T10:00:05Z"
    assert format_utc(int(WHEN.timestamp())) == "2026-11-22T10:00:05Z"
    assert format_utc(WHEN.astimezone(timezone(timedelta(hours=2)))) == "2026-11-22T10:00:05Z"


def test_zero_and_none_mean_never() -> None:
    assert format_utc(0) == "-" and format_utc(None) == "-"
    assert format_utc(0, missing="never") == "never"


@pytest.mark.parametrize("text", ["2026-11-22T10:00:05Z", "2026-11-22T10:00:05+00:00", "2026-11-22T12:00:05+02:00",
                                  "2026-11-22T10:00:05"])
def test_parse_reads_iso_times_and_takes_a_bare_one_as_utc(text: str) -> None:
    parsed = parse_utc(text)
    assert parsed == WHEN and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01T00:00:00Z", "1h"])
def test_parse_refuses_what_is_not_a_time(text: str) -> None:
    with pytest.raises(ValueError):
        parse_utc(text)


def test_the_two_forms_round_trip() -> None:
    assert parse_utc(format_utc(WHEN)) == WHEN
