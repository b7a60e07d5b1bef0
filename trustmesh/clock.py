"""The one wall clock. Components take a `Clock` so tests can fake time; this is the real one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

# What a component is given to read the time: always timezone-aware UTC.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_utc(when: datetime | float | None, *, missing: str = "-") -> str:
    """`when` (a datetime, or seconds since the epoch as the wire carries them) as
    2026-11-22T10:00:00Z; `missing` for None or 0, which the wire uses for "never"."""
    if not when:
        return missing
    moment = when if isinstance(when, datetime) else datetime.fromtimestamp(when, timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str) -> datetime:
    """An ISO 8601 time such as 2026-11-22T10:00:00Z; one without a zone is taken as UTC.
    Raises ValueError when `text` is not one."""
    when = datetime.fromisoformat(text)
    return when.astimezone(timezone.utc) if when.tzinfo else when.replace(tzinfo=timezone.utc)
