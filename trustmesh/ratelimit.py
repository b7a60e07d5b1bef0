"""Token buckets per key (e.g. a source address): refuse early what arrives too often."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class KeyedTokenBuckets:
    """Each key may spend `burst` tokens at once, refilled at `rate` per second.

    At most `max_keys` buckets are kept, the least recently used dropped first, so memory stays
    bounded whatever the number of keys (a dropped key starts again with a full bucket).
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("a token bucket needs rate > 0, burst >= 1 and max_keys >= 1")
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def allow(self, key: str) -> bool:
        """Spend one token of `key`'s bucket; False when it is empty (refuse the request)."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def retry_after(self, key: str) -> float:
        """Seconds until `key` has a token again (0 when it has one)."""
        tokens, at = self._buckets.get(key, (self._burst, self._clock()))
        tokens = min(self._burst, tokens + (self._clock() - at) * self._rate)
        return max(0.0, (1 - tokens) / self._rate)
