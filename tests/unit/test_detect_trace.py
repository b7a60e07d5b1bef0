"""benchmarks/detect_trace.py: the synthetic flow trace the detection benchmark replays is
deterministic, well formed, and its labels (attacks, benign identity-days) say what they claim."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks.detect_trace import DAY, GRACE, KINDS, NEW_SERVICE, Trace, day_of, generate, spiffe
from trustmesh.detect.trace import read_trace, record_from_dict, record_to_line

SEED = 7


@pytest.fixture(scope="module")
def small() -> Trace:
    return generate(SEED, identities=6, days=10)


@pytest.fixture(scope="module")
def quick() -> Trace:
    return generate(SEED, identities=12, days=14)


def test_the_same_seed_gives_the_same_trace(small: Trace) -> None:
    again = generate(SEED, identities=6, days=10)
    assert again.records == small.records
    assert again.attacks == small.attacks
    assert again.events == small.events
    assert again.benign == small.benign
    other = generate(SEED + 1, identities=6, days=10)
    assert other.records != small.records


def test_a_small_trace_is_generated_fast() -> None:
    started = time.perf_counter()
    trace = generate(SEED + 2, identities=6, days=10)
    assert time.perf_counter() - started < 5.0
    assert 5_000 < len(trace.records) < 500_000


def test_records_are_sorted_inside_the_window_and_round_trip(small: Trace) -> None:
    times = [r.ts for r in small.records]
    assert times == sorted(times)
    assert small.start < times[0] and times[-1] < small.end
    assert all(ts % 60 == 0 for ts in times)  # each ends a one-minute window
    for record in small.records:
        assert record_from_dict(json.loads(record_to_line(record)), "test") == record


def test_write_jsonl_reads_back_with_read_trace(small: Trace, tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    small.write_jsonl(path)
    with path.open("rb") as lines:
        assert list(read_trace(lines, str(path))) == small.records


def test_the_population_is_as_described(quick: Trace) -> None:
    sources = {r.source for r in quick.records}
    assert sources == set(quick.identities) and len(sources) == 12
    assert any(s.startswith("unverified:") for s in sources)
    by_source: dict[str, set[tuple[str, int]]] = {}
    nodes: dict[str, set[str]] = {}
    for r in quick.records:
        by_source.setdefault(r.source, set()).add((r.destination, r.port))
        nodes.setdefault(r.source, set()).add(r.node)
        assert r.decision in ("allow", "deny", "audit", "unverified")
        assert (r.node == "") == r.source.startswith("unverified:")
    attacked = {a.identity for a in quick.attacks}
    for source, nodes_seen in nodes.items():
        if source not in attacked and not source.startswith("unverified:"):
            assert 1 <= len(nodes_seen) <= 2, (source, nodes_seen)
    new = [r.ts for r in quick.records if r.source == spiffe(NEW_SERVICE)]
    assert new and day_of(min(new)) > day_of(quick.start) + 2  # it appears mid-trace
    windows = [(a.identity, a.start, a.end) for a in quick.attacks]
    denied = [r for r in quick.records if r.decision == "deny"
              and not any(r.source == who and start <= r.ts <= end for who, start, end in windows)]
    assert denied  # benign denials exist
    kinds = {e.kind for e in quick.events}
    assert {"new_service", "oncall_night", "misconfigured_client", "deploy_new_peer"} <= kinds


def test_attacks_are_labelled_inside_the_window_on_top_of_benign_traffic(quick: Trace) -> None:
    assert sorted({a.kind for a in quick.attacks}) == sorted(KINDS)
    assert all(sum(a.kind == k for a in quick.attacks) == 3 for k in KINDS)
    assert len({a.name for a in quick.attacks}) == len(quick.attacks)
    learned = quick.start + quick.learn_days * DAY
    for a in quick.attacks:
        assert learned < a.start <= a.end < quick.end, a
        assert a.slow_and_low == (a.kind == "slow_and_low")
        mine = [r for r in quick.records if r.source == a.identity]
        assert any(r.ts == a.start for r in mine), a  # its first record is the labelled start
        same_day = [r for r in mine if day_of(r.ts) == day_of(a.start) and not a.start <= r.ts <= a.end]
        assert same_day, a  # its own benign traffic goes on that day
        if a.kind == "odd_hours":
            assert int(a.start % DAY // 3600) == 3
        if a.kind == "slow_and_low":
            assert a.end - a.start >= 2 * 3600
        if a.kind in ("new_peer", "volume", "deny_burst"):
            assert a.destination, a  # the one destination it targets
            assert any(r.ts == a.start and r.destination == a.destination for r in mine), a
        if a.kind == "credential_replay":
            before = {r.node for r in mine if r.ts < a.start}
            during = {r.node for r in mine if a.start <= r.ts <= a.end}
            assert during - before, a
    slots = [(a.identity, day_of(a.start)) for a in quick.attacks]
    assert len(slots) == len(set(slots))  # at most one attack per identity and day


def test_benign_identity_days_are_as_defined(quick: Trace) -> None:
    first = day_of(quick.start) + quick.learn_days
    active = {(r.source, day_of(r.ts)) for r in quick.records if day_of(r.ts) >= first}
    spoiled = {(a.identity, d) for a in quick.attacks for d in range(day_of(a.start), day_of(a.end + GRACE) + 1)}
    assert quick.benign == frozenset(active - spoiled)
    assert quick.benign_identity_days == len(quick.benign)
    assert all(day >= first for _, day in quick.benign)
    assert not {(a.identity, day_of(a.start)) for a in quick.attacks} & quick.benign


def test_a_short_trace_still_has_attacks_after_learning(small: Trace) -> None:
    assert small.attacks
    assert all(a.start > small.start + small.learn_days * DAY for a in small.attacks)


def test_start_must_be_a_utc_midnight() -> None:
    with pytest.raises(ValueError, match="midnight"):
        generate(1, identities=3, days=2, start=1793577600.0 + 3600)
