"""Retry pacing and rotation thresholds: pure functions, so their bounds are checked directly."""

from __future__ import annotations

import random
import statistics
from datetime import datetime, timedelta, timezone

import pytest

from trustmesh.agent.config import RotationConfig
from trustmesh.backoff import backoff_ceiling, backoff_delay, renew_at, seconds_until

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("attempt", [0, 1, 2, 5, 10, 40, 10_000])
def test_backoff_stays_within_the_capped_exponential_ceiling(attempt: int) -> None:
    rand = random.Random(attempt)
    ceiling = min(30.0, 0.5 * 2 ** min(attempt, 32))
    delays = [backoff_delay(attempt, base=0.5, cap=30.0, rand=rand) for _ in range(300)]
    assert all(0.0 <= d <= ceiling for d in delays)


def test_the_ceiling_doubles_from_base_to_cap_and_stays_finite() -> None:
    # The etcd client retries a dead member on exactly these steps (no jitter: it is one client).
    assert [backoff_ceiling(a, base=0.05, cap=0.5) for a in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff_ceiling(0) == 0.5 and backoff_ceiling(10**9) == 30.0
    assert backoff_ceiling(-3) == 0.5, "a negative attempt counts as the first"


@pytest.mark.parametrize("seed", range(5))
def test_a_seeded_random_gives_the_same_delays_within_the_ceiling(seed: int) -> None:
    first = [backoff_delay(a, base=0.25, cap=4.0, rand=random.Random(seed)) for a in range(12)]
    again = [backoff_delay(a, base=0.25, cap=4.0, rand=random.Random(seed)) for a in range(12)]
    assert first == again
    assert all(0.0 <= d <= backoff_ceiling(a, base=0.25, cap=4.0) for a, d in enumerate(first))


def test_backoff_is_full_jitter_not_a_fixed_step() -> None:
    rand = random.Random(7)
    delays = [backoff_delay(20, base=0.5, cap=30.0, rand=rand) for _ in range(2000)]
    # Uniform over [0, cap]: spread over the whole range, mean near cap/2, so a fleet that
    # lost the server together does not come back together.
    assert min(delays) < 3 and max(delays) > 27
    assert 13 < statistics.mean(delays) < 17
    assert len(set(delays)) > 1900


def test_backoff_grows_with_attempts_until_the_cap() -> None:
    rand = random.Random(3)
    means = [statistics.mean(backoff_delay(a, base=0.5, cap=8.0, rand=rand) for _ in range(400)) for a in range(6)]
    assert means[0] < means[2] < means[4]
    assert abs(means[5] - 4.0) < 0.6  # capped: uniform in [0, 8]


@pytest.mark.parametrize("lifetime", [timedelta(seconds=4), timedelta(minutes=5), timedelta(hours=1)])
def test_renewal_is_jittered_inside_the_configured_fraction(lifetime: timedelta) -> None:
    rand = random.Random(1)
    times = [renew_at(NOW, NOW + lifetime, rand=rand, low=0.5, high=0.6) for _ in range(500)]
    assert all(NOW + lifetime * 0.5 <= t <= NOW + lifetime * 0.6 for t in times)
    assert len(set(times)) > 400


def test_default_renewal_window_is_around_half_life() -> None:
    r = RotationConfig()
    assert r.renew_low < 0.5 < r.renew_high and r.renew_high - r.renew_low <= 0.1 + 1e-9
    rand = random.Random(2)
    for _ in range(200):
        t = renew_at(NOW, NOW + timedelta(hours=1), rand=rand, low=r.renew_low, high=r.renew_high)
        assert NOW + timedelta(minutes=27) <= t <= NOW + timedelta(minutes=33)


def test_rotation_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        RotationConfig(renew_low=0.6, renew_high=0.5)
    with pytest.raises(ValueError):
        RotationConfig(renew_high=1.0)
    with pytest.raises(ValueError):
        RotationConfig(backoff_base=5, backoff_cap=1)


def test_seconds_until_never_goes_negative() -> None:
    assert seconds_until(NOW - timedelta(seconds=5), NOW) == 0.0
    assert seconds_until(NOW + timedelta(seconds=5), NOW) == 5.0
