"""Continuous verification: the detection engine on a labelled synthetic trace.

The trace is benchmarks/detect_trace.py's (40 identities x 28 days, or 12 x 14 with --quick;
seven kinds of attack, three of each, injected on top of benign traffic after day 10). The
engine (trustmesh/detect/engine.py) replays it in time order with 7 days of learning and a
Response document that alerts at 0.5 and quarantines at 0.9 (and, unless --untuned, ignores the
on-call identity's night work, as a team would after its first replay), in dry run: a quarantine is
counted, not enacted, so one does not blind the engine to a later scenario on the same
identity.

Measured:
  * per scenario: detected (an alert on the attacking identity from the attack's start to
    start + 5 min, trace time), time to detect (first alert - start), detected at all before
    the attack's end + 1 h, the detectors that fired;
  * overall: % of the non-slow scenarios detected within 5 min; slow-and-low apart (before
    end + 1 h);
  * on the benign part (benign identity-days as detect_trace.py defines them): false alerts
    per 1,000 identity-days, % of identity-days with an alert, false quarantines per 1,000;
  * replay speed on one core (CPU time of this one-threaded process): the engine alone over
    the records in memory, and `read_trace` + engine over the JSONL text (as `trustmesh detect
    replay` reads it), against `read_trace` alone in the same run.

    python -m benchmarks.detection [--quick] [--seed 1] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import row  # noqa: E402
from benchmarks.detect_trace import GRACE, BenignEvent, Trace, day_of, generate  # noqa: E402
from trustmesh.clock import format_utc  # noqa: E402
from trustmesh.detect.engine import Alert, Engine  # noqa: E402
from trustmesh.detect.trace import TraceRecord, read_trace  # noqa: E402
from trustmesh.policy import load_text  # noqa: E402
from trustmesh.policy.responses import ResponsePolicy  # noqa: E402

WITHIN = 300.0  # "detected": an alert within 5 minutes of trace time
GOAL_DETECTED = 95.0  # % of non-slow scenarios within WITHIN
GOAL_FALSE_QUARANTINES = 1.0  # per 1,000 benign identity-days
GOAL_ALERTED_DAYS = 1.0  # % of benign identity-days with an alert
GOAL_RATE = 50_000.0  # records/s on one core
# Which detector each kind of attack is meant for (the table says which fired).
EXPECTED = {"new_peer": "new_peer", "sweep": "sweep", "volume": "volume", "odd_hours": "odd_hours",
            "credential_replay": "new_node", "deny_burst": "deny_burst", "slow_and_low": "slow_sweep"}

RESPONSES = """\
apiVersion: trustmesh/v1
kind: Response
metadata: {name: detection-benchmark, owner: security}
spec:
  dry_run: true
  rules:
    - {identity: "*", detectors: ["*"], action: alert, above: 0.5}
    - {identity: "*", detectors: ["*"], action: quarantine, above: 0.9}
"""
# What a team sees in its first replay of its own history and declares normal (README:
# "tuning on your own history"): the on-call identity works at night now and then. --untuned
# leaves it out.
TUNING = """\
    - {identity: "spiffe://example.org/ns/ops/*", detectors: [odd_hours, volume], action: ignore}
"""


def response_policy(tuned: bool = True) -> ResponsePolicy:
    """RESPONSES (and TUNING) through the policy loader, as `trustmesh detect replay --config`
    reads it."""
    loaded = load_text(RESPONSES + (TUNING if tuned else ""), "benchmarks/detection.py", reject_expired=False)
    if not loaded.ok:
        raise RuntimeError(f"the benchmark's Response document does not load: {loaded.problems[0]}")
    return loaded.policy.responses


@dataclass
class Replay:
    alerts: list[Alert]
    records: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.records / self.cpu if self.cpu > 0 else 0.0


def replay(records: Iterable[TraceRecord], responses: ResponsePolicy, learn: float) -> Replay:
    """The records through a fresh engine, timed (wall and this process's CPU)."""
    engine = Engine(responses=responses, learn=learn)
    observe = engine.observe
    alerts: list[Alert] = []
    count = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for record in records:
        count += 1
        found = observe(record)
        if found:
            alerts.extend(found)
    return Replay(alerts, count, time.perf_counter() - wall, time.process_time() - cpu)


def parse_only(path: Path) -> Replay:
    count = 0
    wall, cpu = time.perf_counter(), time.process_time()
    with path.open("rb") as lines:
        for _ in read_trace(lines, str(path)):
            count += 1
    return Replay([], count, time.perf_counter() - wall, time.process_time() - cpu)


def replay_file(path: Path, responses: ResponsePolicy, learn: float) -> Replay:
    with path.open("rb") as lines:
        return replay(read_trace(lines, str(path)), responses, learn)


# --- scoring --------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    kind: str
    identity: str
    start: float
    end: float
    slow_and_low: bool
    description: str
    first_alert: float | None  # ts of the first alert from start to end + GRACE
    detectors: list[str]  # that fired from start to end + GRACE, first first
    within: bool  # an alert from start to start + WITHIN
    score: float
    quarantine: bool
    note: str = ""  # volume: the baseline it had to stand out from

    @property
    def detected(self) -> bool:
        return self.first_alert is not None

    @property
    def time_to_detect(self) -> float | None:
        return None if self.first_alert is None else self.first_alert - self.start

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "identity": self.identity, "start": format_utc(self.start),
                "end": format_utc(self.end), "slow_and_low": self.slow_and_low, "description": self.description,
                "detected_within_5min": self.within, "detected_before_end_1h": self.detected,
                "time_to_detect_s": self.time_to_detect, "detectors": self.detectors, "max_score": self.score,
                "would_quarantine": self.quarantine, "expected_detector": EXPECTED.get(self.kind, ""),
                "note": self.note}


@dataclass
class FalseAlert:
    alert: Alert
    explained_by: str  # the benign event around it, if any

    def to_dict(self) -> dict[str, object]:
        a = self.alert
        return {"ts": format_utc(a.ts), "day": format_utc(a.ts)[:10], "identity": a.identity, "node": a.node,
                "detector": a.detector, "score": a.score, "action": a.action, "reason": a.reason,
                "benign_event": self.explained_by}


@dataclass
class Evaluation:
    scenarios: list[Scenario]
    false_alerts: list[FalseAlert]
    benign_days: int
    alerted_days: int  # benign identity-days with at least one alert
    learning_alerts: int  # alerts before the end of learning (not scored)
    other_alerts: int  # on an attack identity-day, outside every attack window (not scored)
    alerts: int
    by_detector: dict[str, int] = field(default_factory=dict)

    def fast(self) -> list[Scenario]:
        return [s for s in self.scenarios if not s.slow_and_low]

    def slow(self) -> list[Scenario]:
        return [s for s in self.scenarios if s.slow_and_low]

    @property
    def detected_pct(self) -> float:
        fast = self.fast()
        return 100.0 * sum(s.within for s in fast) / len(fast) if fast else 0.0

    @property
    def detected_late_pct(self) -> float:
        fast = self.fast()
        return 100.0 * sum(s.detected for s in fast) / len(fast) if fast else 0.0

    @property
    def slow_pct(self) -> float:
        slow = self.slow()
        return 100.0 * sum(s.detected for s in slow) / len(slow) if slow else 0.0

    def per_1000(self, count: int) -> float:
        return 1000.0 * count / self.benign_days if self.benign_days else 0.0

    @property
    def false_quarantines(self) -> int:
        return sum(f.alert.action == "quarantine" for f in self.false_alerts)

    @property
    def alerted_pct(self) -> float:
        return 100.0 * self.alerted_days / self.benign_days if self.benign_days else 0.0


def _explain(alert: Alert, events: list[BenignEvent]) -> str:
    """The latest benign event of the alert's identity under way when it was raised."""
    around = [e for e in events if e.identity == alert.identity and e.start - 60 <= alert.ts <= e.end + GRACE]
    if not around:
        return ""
    e = max(around, key=lambda e: e.start)
    return f"{e.kind}: {e.description}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def volume_notes(trace: Trace) -> dict[str, str]:
    """Per volume scenario: its identity's 10-minute windows (aligned, as the volume baseline
    keeps them) with the destination before the attack, against the attack's own windows."""
    attacks = {(a.identity, a.destination): a for a in trace.attacks if a.kind == "volume" and a.destination}
    before: dict[str, dict[int, int]] = {a.name: {} for a in attacks.values()}
    during: dict[str, dict[int, int]] = {a.name: {} for a in attacks.values()}
    first5: dict[str, int] = {a.name: 0 for a in attacks.values()}
    for r in trace.records:
        a = attacks.get((r.source, r.destination))
        if a is None:
            continue
        window, moved = int(r.ts // 600), r.bytes_in + r.bytes_out
        if window < int(a.start // 600):
            before[a.name][window] = before[a.name].get(window, 0) + moved
        elif window <= int(a.end // 600):
            during[a.name][window] = during[a.name].get(window, 0) + moved
            if a.start <= r.ts <= a.start + WITHIN:
                first5[a.name] += moved
    notes = {}
    for a in attacks.values():
        base = sorted(before[a.name].values())
        if not base:
            continue
        p50, p99 = base[len(base) // 2], base[min(len(base) - 1, int(0.99 * len(base)))]
        sums = [v for _, v in sorted(during[a.name].items())]
        notes[a.name] = (f"{a.name}: {len(base)} earlier 10-min windows with {a.destination}: p50 {_mb(p50)}, "
                         f"p99 {_mb(p99)}; the attack's aligned windows: {' + '.join(_mb(v) for v in sums)} "
                         f"(max {max(sums) / p99:.1f}x p99); its first 5 min: {_mb(first5[a.name])} "
                         f"({first5[a.name] / p99:.1f}x p99)")
    return notes


def evaluate(trace: Trace, alerts: list[Alert]) -> Evaluation:
    by_identity: dict[str, list[Alert]] = {}
    for a in alerts:
        by_identity.setdefault(a.identity, []).append(a)
    scenarios = []
    notes = volume_notes(trace)
    in_windows: set[int] = set()
    for attack in trace.attacks:
        mine = [a for a in by_identity.get(attack.identity, ()) if attack.start <= a.ts <= attack.end + GRACE]
        in_windows.update(id(a) for a in mine)
        detectors: list[str] = []
        for a in mine:
            if a.detector not in detectors:
                detectors.append(a.detector)
        scenarios.append(Scenario(
            attack.name, attack.kind, attack.identity, attack.start, attack.end, attack.slow_and_low,
            attack.description, mine[0].ts if mine else None, detectors,
            any(a.ts <= attack.start + WITHIN for a in mine), max((a.score for a in mine), default=0.0),
            any(a.action == "quarantine" for a in mine), notes.get(attack.name, "")))
    learned_from = day_of(trace.start) + trace.learn_days
    false_alerts, alerted, learning, other = [], set(), 0, 0
    for a in alerts:
        day = day_of(a.ts)
        if (a.identity, day) in trace.benign:
            false_alerts.append(FalseAlert(a, _explain(a, trace.events)))
            alerted.add((a.identity, day))
        elif day < learned_from:
            learning += 1
        elif id(a) not in in_windows:
            other += 1
    by_detector: dict[str, int] = {}
    for f in false_alerts:
        by_detector[f.alert.detector] = by_detector.get(f.alert.detector, 0) + 1
    return Evaluation(scenarios, false_alerts, trace.benign_identity_days, len(alerted), learning, other,
                      len(alerts), by_detector)


# --- output ---------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _short(identity: str) -> str:
    return identity.removeprefix("spiffe://example.org/")


def scenario_table(ev: Evaluation) -> str:
    rows = [("scenario", "identity", "start (UTC)", "<= 5 min", "time to detect", "by end + 1 h", "detectors",
             "max score", "what")]
    for s in ev.scenarios:
        ttd = s.time_to_detect
        rows.append((s.name + (" (slow)" if s.slow_and_low else ""), _short(s.identity), format_utc(s.start)[5:16],
                     "yes" if s.within else "NO", "-" if ttd is None else f"{ttd:.0f} s",
                     "yes" if s.detected else "NO", ", ".join(s.detectors) or "-",
                     f"{s.score:.2f}" + (" Q" if s.quarantine else ""), s.description))
    return _table(rows)


def false_alert_table(ev: Evaluation, limit: int = 200) -> str:
    rows = [("day", "time", "identity", "detector", "score", "action", "benign event", "reason")]
    for f in ev.false_alerts[:limit]:
        a = f.alert
        rows.append((format_utc(a.ts)[:10], format_utc(a.ts)[11:16], _short(a.identity), a.detector,
                     f"{a.score:.2f}", a.action, f.explained_by.split(":")[0] or "-", a.reason))
    more = f"\n({len(ev.false_alerts) - limit} more)" if len(ev.false_alerts) > limit else ""
    return _table(rows) + more


def summary_rows(ev: Evaluation, engine: Replay, parsed: Replay, parse: Replay) -> list[tuple[str, str, str]]:
    fast, slow = ev.fast(), ev.slow()
    ttd = [s.time_to_detect for s in fast if s.within and s.time_to_detect is not None]

    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    return [
        ("measure", "value", "goal"),
        ("non-slow scenarios detected within 5 min", f"{ev.detected_pct:.1f}% ({sum(s.within for s in fast)}/"
                                                     f"{len(fast)})", f">= {GOAL_DETECTED:.0f}%: "
                                                                      f"{met(ev.detected_pct >= GOAL_DETECTED)}"),
        ("non-slow detected before end + 1 h", f"{ev.detected_late_pct:.1f}%", "report"),
        ("time to detect (within 5 min), median / max", f"{statistics.median(ttd):.0f} s / {max(ttd):.0f} s"
         if ttd else "-", "report"),
        ("slow-and-low detected before end + 1 h", f"{ev.slow_pct:.1f}% ({sum(s.detected for s in slow)}/"
                                                   f"{len(slow)})", "report"),
        ("benign identity-days", str(ev.benign_days), ""),
        ("false alerts per 1,000 benign identity-days", f"{ev.per_1000(len(ev.false_alerts)):.1f} "
                                                        f"({len(ev.false_alerts)})", "report"),
        ("benign identity-days with an alert", f"{ev.alerted_pct:.2f}% ({ev.alerted_days})",
         f"<= {GOAL_ALERTED_DAYS:.0f}%: {met(ev.alerted_pct <= GOAL_ALERTED_DAYS)}"),
        ("false quarantines per 1,000 benign identity-days", f"{ev.per_1000(ev.false_quarantines):.2f} "
                                                             f"({ev.false_quarantines})",
         f"<= {GOAL_FALSE_QUARANTINES:.0f}: {met(ev.per_1000(ev.false_quarantines) <= GOAL_FALSE_QUARANTINES)}"),
        ("replay, engine only (records in memory)", f"{engine.rate:,.0f} records/s",
         f">= {GOAL_RATE:,.0f}/core: {met(engine.rate >= GOAL_RATE)}"),
        ("replay, read_trace + engine (JSONL)", f"{parsed.rate:,.0f} records/s",
         f">= {GOAL_RATE:,.0f}/core: {met(parsed.rate >= GOAL_RATE)}"),
        ("read_trace alone (reference)", f"{parse.rate:,.0f} records/s", "reference"),
    ]


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class Measured:
    trace: Trace
    generated: float  # seconds to generate it
    jsonl_bytes: int
    engine: Replay  # the records in memory through the engine
    parse: Replay  # read_trace alone over the JSONL
    parsed: Replay  # read_trace + engine over the JSONL
    evaluation: Evaluation


def measure(seed: int, identities: int, days: int, tuned: bool = True) -> Measured:
    started = time.perf_counter()
    trace = generate(seed, identities, days)
    generated = time.perf_counter() - started
    responses = response_policy(tuned)
    learn = trace.learn_days * 86400.0
    # As `trustmesh detect replay` does with the records it holds: the trace in memory is not
    # walked by the cyclic collector while the engine and the parser allocate.
    gc.collect()
    gc.freeze()
    engine = replay(trace.records, responses, learn)
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-detect-") as tmp:
        path = Path(tmp) / "trace.jsonl"
        size = trace.write_jsonl(path)
        parse = parse_only(path)
        parsed = replay_file(path, responses, learn)
    if parsed.alerts != engine.alerts:
        raise RuntimeError(f"the JSONL replay raised {len(parsed.alerts)} alerts, the in-memory one "
                           f"{len(engine.alerts)}: the trace format does not round-trip")
    return Measured(trace, generated, size, engine, parse, parsed, evaluate(trace, engine.alerts))


def run(quick: bool, seed: int = 1, identities: int | None = None, days: int | None = None,
        *, echo: bool = True, tuned: bool = True) -> list[dict[str, object]]:
    identities = identities or (12 if quick else 40)
    days = days or (14 if quick else 28)
    got = measure(seed, identities, days, tuned)
    trace, ev, engine, parsed, parse = got.trace, got.evaluation, got.engine, got.parsed, got.parse
    if echo:
        print(f"[detection] {len(trace.records):,} records, {len(trace.identities)} identities x {trace.days} days "
              f"(seed {seed}, generated in {got.generated:.1f} s, {got.jsonl_bytes / 1e6:.0f} MB of JSONL), "
              f"{len(trace.attacks)} scenarios, {ev.benign_days} benign identity-days, {ev.alerts} alerts "
              f"({ev.learning_alerts} while learning, {ev.other_alerts} on attack days outside the attacks)")
        print(scenario_table(ev))
        for s in ev.scenarios:
            if s.note:
                print("  " + s.note)
        print(_table(summary_rows(ev, engine, parsed, parse)))
        print(f"false alerts on benign identity-days ({len(ev.false_alerts)}; by detector: "
              f"{', '.join(f'{k} {v}' for k, v in sorted(ev.by_detector.items())) or 'none'}):")
        print(false_alert_table(ev) if ev.false_alerts else "none")
    params: dict[str, object] = {
        "seed": seed, "identities": len(trace.identities), "days": trace.days, "records": len(trace.records),
        "learn_days": trace.learn_days, "scenarios": len(trace.attacks), "benign_identity_days": ev.benign_days,
        "responses": "alert >= 0.5, quarantine >= 0.9 (dry run: counted, not enacted)",
        "trace": "benchmarks/detect_trace.py"}
    fast, slow = ev.fast(), ev.slow()
    ttd = [s.time_to_detect for s in fast if s.within and s.time_to_detect is not None]
    per_kind = {k: f"{sum(s.within for s in fast if s.kind == k)}/{sum(s.kind == k for s in fast)}"
                for k in dict.fromkeys(s.kind for s in fast)}
    missed = [s.name for s in ev.scenarios if not (s.detected if s.slow_and_low else s.within)]
    speed = {**params, "timing": "CPU time of this process (one thread, so one core); wall in params",
             "engine_cpu_s": round(engine.cpu, 2), "engine_wall_s": round(engine.wall, 2),
             "parse_and_engine_cpu_s": round(parsed.cpu, 2), "parse_and_engine_wall_s": round(parsed.wall, 2),
             "parse_cpu_s": round(parse.cpu, 2), "jsonl_bytes": got.jsonl_bytes, "alerts": ev.alerts}
    results = [
        row("detection.detected_within_5min", ev.detected_pct, "% of non-slow scenarios", "goal", GOAL_DETECTED,
            f">= {GOAL_DETECTED:.0f}%", {**params, "per_kind": per_kind, "missed": missed,
                                         "detected_before_end_1h_pct": round(ev.detected_late_pct, 1)}),
        row("detection.time_to_detect_p50", statistics.median(ttd) if ttd else 0.0, "s",
            "the 5-minute window", WITHIN, "report", {**params, "max_s": max(ttd) if ttd else None}),
        row("detection.slow_and_low_detected", ev.slow_pct, "% of slow-and-low scenarios (before end + 1 h)",
            "the non-slow scenarios, within 5 min", ev.detected_pct, "report",
            {**params, "scenarios_slow": len(slow)}),
        row("detection.false_alerts_per_1000_identity_days", ev.per_1000(len(ev.false_alerts)), "alerts",
            "goal for identity-days with an alert, per 1,000", GOAL_ALERTED_DAYS * 10, "report",
            {**params, "false_alerts": len(ev.false_alerts), "by_detector": ev.by_detector}),
        row("detection.benign_days_alerted", ev.alerted_pct, "% of benign identity-days", "goal",
            GOAL_ALERTED_DAYS, f"<= {GOAL_ALERTED_DAYS:.0f}%", {**params, "alerted_days": ev.alerted_days}),
        row("detection.false_quarantines_per_1000_identity_days", ev.per_1000(ev.false_quarantines), "quarantines",
            "goal", GOAL_FALSE_QUARANTINES, f"<= {GOAL_FALSE_QUARANTINES:.0f}",
            {**params, "false_quarantines": ev.false_quarantines}),
        row("detection.replay.engine", engine.rate, "records/s", "read_trace alone (JSON parse + checks), same run",
            parse.rate, f">= {GOAL_RATE:,.0f} records/s/core", speed),
        row("detection.replay.parse_and_engine", parsed.rate, "records/s",
            "read_trace alone (JSON parse + checks), same run", parse.rate, f">= {GOAL_RATE:,.0f} records/s/core",
            speed),
    ]
    out = Path(os.environ.get("TRUSTMESH_BENCH_OUT", HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "detection.json").write_text(json.dumps({
        "params": params, "summary": {r["name"]: r["value"] for r in results},
        "scenarios": [s.to_dict() for s in ev.scenarios],
        "false_alerts": [f.to_dict() for f in ev.false_alerts],
        "benign_events": [e.to_dict() for e in trace.events]}, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the detection engine on a labelled synthetic trace")
    parser.add_argument("--quick", action="store_true", help="12 identities x 14 days")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--identities", type=int)
    parser.add_argument("--days", type=int)
    parser.add_argument("--json", action="store_true", help="print the result rows as JSON after the tables")
    parser.add_argument("--untuned", action="store_true",
                        help="without the one ignore rule for the on-call identity (the Response rules alone)")
    args = parser.parse_args(argv)
    results = run(args.quick, args.seed, args.identities, args.days, tuned=not args.untuned)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
