"""Retry pacing and rotation timing: pure functions, so their bounds are tested directly."""

from __future__ import annotations

import random
from datetime import datetime, timedelta


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 30.0,
                  rand: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap, base * (2 ** min(attempt, 32)))
    return (rand or random).uniform(0, ceiling)


def renew_at(not_before: datetime, not_after: datetime, *, rand: random.Random | None = None,
             low: float = 0.45, high: float = 0.55) -> datetime:
    """When to renew: around half of the lifetime, jittered so a fleet does not renew in step."""
    fraction = (rand or random).uniform(low, high)
    return not_before + (not_after - not_before) * fraction


def seconds_until(when: datetime, now: datetime) -> float:
    return max(0.0, (when - now) / timedelta(seconds=1))
