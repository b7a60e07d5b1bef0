"""The one wall clock. Components take a `Clock` so tests can fake time; this is the real one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

# What a component is given to read the time: always timezone-aware UTC.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
