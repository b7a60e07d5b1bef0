"""Retry pacing and rotation timing: pure functions, so their bounds are tested directly.

Both sides retry (the agent its server calls, the server its store), so both use these.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

# 2**32 times any sane base is far beyond any cap; stopping there keeps the float finite.
_MAX_DOUBLINGS = 32


def backoff_ceiling(attempt: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """The longest wait before retry number `attempt` (from 0): base * 2**attempt, at most cap."""
    return min(cap, base * 2.0 ** min(max(attempt, 0), _MAX_DOUBLINGS))


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 30.0,
                  rand: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter: uniform in [0, backoff_ceiling(attempt)].

    Full jitter spreads a fleet that lost its server at the same moment over the whole
    window, so the reconnects do not arrive in step."""
    return (rand or random).uniform(0, backoff_ceiling(attempt, base=base, cap=cap))


def renew_at(not_before: datetime, not_after: datetime, *, rand: random.Random | None = None,
             low: float = 0.45, high: float = 0.55) -> datetime:
    """When to renew: around half of the lifetime, jittered so a fleet does not renew in step."""
    fraction = (rand or random).uniform(low, high)
    return not_before + (not_after - not_before) * fraction


def seconds_until(when: datetime, now: datetime) -> float:
    return max(0.0, (when - now) / timedelta(seconds=1))
