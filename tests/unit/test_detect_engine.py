"""The detection engine: each detector catches what it must and leaves normal traffic alone;
learning, adaptation, responses and determinism."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from trustmesh.detect.engine import Alert, Engine
from trustmesh.detect.trace import TraceRecord, record_to_line
from trustmesh.policy import load_text
from trustmesh.policy.responses import ResponsePolicy, Verdict

DAY = 86400
START = 1_767_225_600  # 2026-01-01T00:00:00Z, a Thursday
PAY = "spiffe://example.org/payments"
LEDGER = "spiffe://example.org/ledger"
FRAUD = "spiffe://example.org/fraud"
LEARN = 7 * DAY


def rec(ts: float, dst: str = LEDGER, port: int = 8443, decision: str = "allow", conns: int = 10,
        nbytes: int = 50_000, node: str = "node-1", src: str = PAY) -> TraceRecord:
    return TraceRecord(ts, node, src, dst, port, decision, conns, nbytes, nbytes // 5)


def business(days: int, seed: int = 1, start: float = START) -> list[TraceRecord]:
    """payments -> ledger and fraud, every minute of 08:00-19:00 UTC, with noise."""
    rng = random.Random(seed)
    out = []
    for minute in range(days * 1440):
        hour = (minute // 60) % 24
        if not 8 <= hour < 19:
            continue
        ts = start + 60 * (minute + 1)
        out.append(rec(ts, conns=rng.randint(5, 15), nbytes=rng.randint(30_000, 70_000)))
        if minute % 3 == 0:
            out.append(rec(ts, dst=FRAUD, port=9000, conns=rng.randint(1, 4), nbytes=rng.randint(2_000, 6_000)))
    return out


def run(records: list[TraceRecord], engine: Engine | None = None) -> list[Alert]:
    engine = engine or Engine(learn=LEARN)
    return [a for r in sorted(records, key=lambda r: r.ts) for a in engine.observe(r)]


@pytest.fixture(scope="module")
def normal() -> list[TraceRecord]:
    return business(14)


def at(day: int, hour: int, minute: int = 0) -> float:
    return START + day * DAY + hour * 3600 + minute * 60


def detectors(alerts: list[Alert]) -> set[str]:
    return {a.detector for a in alerts}


def test_normal_traffic_raises_nothing(normal: list[TraceRecord]) -> None:
    assert run(normal) == []
    # nor does a second, differently seeded fortnight of the same rhythm
    assert run(business(21, seed=7)) == []


def test_new_port_of_a_known_peer_is_caught_and_explained(normal: list[TraceRecord]) -> None:
    probe = rec(at(10, 11, 30) + 5, port=22, decision="deny", conns=1, nbytes=0)
    alerts = run([*normal, probe])
    assert [(a.detector, a.identity, a.ts) for a in alerts] == [("new_peer", PAY, probe.ts)]
    assert f"{LEDGER} port 22 (deny)" in alerts[0].reason and "never used" in alerts[0].reason
    assert alerts[0].score >= 0.75


def test_new_peer_is_not_alerted_while_learning(normal: list[TraceRecord]) -> None:
    early = rec(at(2, 11, 30) + 5, dst="spiffe://example.org/new", port=443)
    assert run([*normal, early]) == []


def test_a_new_peer_alerts_once_then_becomes_normal_after_days_without_alerts(normal: list[TraceRecord]) -> None:
    later = [rec(at(d, 12) + 1, port=7000) for d in range(9, 14)]  # a port of the ledger nobody uses
    alerts = run([*normal, *later])
    assert [(a.detector, a.score) for a in alerts] == [("new_peer", 0.7)]
    assert "a port of spiffe://example.org/ledger that no identity uses" in alerts[0].reason
    engine = Engine(learn=LEARN)
    run([*normal, *later], engine)
    # days 10, 11 and 12 without an alert promote it; day 9 raised the alert and is not counted
    assert (LEDGER, 7000) in engine._ids[PAY].peers.learned  # noqa: SLF001


def test_a_new_dependency_or_a_new_service_scores_below_the_default_alert(normal: list[TraceRecord]) -> None:
    reports = "spiffe://example.org/reports"
    other = [rec(at(d, 12) + 5, src=f"spiffe://example.org/{name}", dst=reports, port=7000)
             for d in range(12) for name in ("billing", "risk", "fx")]
    engine = Engine(learn=LEARN)
    run([*normal, *other], engine)
    anomalies = engine._detect(engine._ids[PAY], rec(at(12, 13) + 1, dst=reports, port=7000), True)  # noqa: SLF001
    assert [(a.detector, a.score) for a in anomalies] == [("new_peer", 0.45)]
    assert "an endpoint 3 other identities use but it never did" in anomalies[0].reason
    assert run([*normal, *other, rec(at(12, 13) + 1, dst=reports, port=7000)]) == []
    # An endpoint only one other identity uses (an admin port, say) is still worth an alert.
    few = [r for r in other if r.source.endswith("/billing")]
    assert [(a.detector, a.score) for a in run([*normal, *few, rec(at(12, 13) + 1, dst=reports, port=7000)])] \
        == [("new_peer", 0.6)]
    fresh = engine._detect(engine._ids[PAY], rec(at(12, 14) + 1, dst="spiffe://example.org/v2", port=1),  # noqa: SLF001
                           True)
    assert [a.score for a in fresh] == [0.45] and "a service no identity used before" in fresh[0].reason


def test_sweep_is_caught_and_a_busy_allowed_fan_out_is_not(normal: list[TraceRecord]) -> None:
    t = at(10, 14)
    sweep = [rec(t + i * 10, dst=f"spiffe://example.org/svc{i % 4}", port=1000 + i, decision="deny", conns=1,
                 nbytes=0) for i in range(9)]
    alerts = run([*normal, *sweep])
    assert "sweep" in detectors(alerts)
    first = next(a for a in alerts if a.detector == "sweep")
    assert first.ts - t <= 300 and "distinct destination ports" in first.reason
    # The same fan-out, allowed (a service with many peers), is new peers at most, never a sweep.
    fan_out = [rec(t + i * 10, dst=f"spiffe://example.org/svc{i % 4}", port=1000 + i) for i in range(9)]
    assert "sweep" not in detectors(run([*normal, *fan_out]))


def test_sweep_needs_no_baseline() -> None:
    sweep = [rec(START + 60 + i, dst=f"spiffe://example.org/s{i}", decision="deny", conns=1, nbytes=0,
                 src="unverified:10.0.0.9") for i in range(8)]
    alerts = run(sweep)
    assert [a.detector for a in alerts] == ["sweep"] and alerts[0].identity == "unverified:10.0.0.9"


def test_volume_far_outside_the_identitys_own_distribution(normal: list[TraceRecord]) -> None:
    t = at(10, 15, 3)
    exfil = [rec(t + 60 * i, nbytes=40_000_000) for i in range(3)]
    alerts = run([*normal, *exfil])
    volume = [a for a in alerts if a.detector == "volume"]
    assert len(volume) == 1 and volume[0].ts == exfil[0].ts  # in its first minute
    assert f"moved 49 MB with {LEDGER} in 10 min; its 30-day p99 at this time of day is 741 kB" in volume[0].reason
    # twice the usual is within its own distribution
    assert run([*normal, rec(t, nbytes=140_000)]) == []


def test_a_sustained_excess_alerts_in_its_fourth_minute_and_one_big_minute_does_not(
        normal: list[TraceRecord]) -> None:
    t = at(10, 15, 3)
    steady = [rec(t + 60 * i, nbytes=300_000) for i in range(6)]
    volume = [a for a in run([*normal, *steady]) if a.detector == "volume"]
    assert [a.ts for a in volume] == [steady[3].ts]
    assert "(4 such minutes in a row)" in volume[0].reason and "p90 at this time of day" in volume[0].reason
    spikes = [rec(t + 600 * i, nbytes=600_000) for i in range(4)]  # big minutes, never two in a row
    assert [a for a in run([*normal, *spikes]) if a.detector == "volume"] == []


def test_a_sporadic_peer_busy_every_minute_stands_out(normal: list[TraceRecord]) -> None:
    # payments -> fraud is busy one minute in three; its idle minutes count in its baseline,
    # so the same modest volume every minute for five minutes is an excess.
    t = at(10, 15, 4) + 30
    busy = [rec(t + 60 * i, dst=FRAUD, port=9000, conns=3, nbytes=40_000) for i in range(6)]
    volume = [a for a in run([*normal, *busy]) if a.detector == "volume"]
    assert len(volume) == 1 and volume[0].ts <= busy[4].ts and f"with {FRAUD} in 1 min" in volume[0].reason
    # The same minutes at its usual pace (one in three) are nothing.
    sporadic = [rec(t + 180 * i, dst=FRAUD, port=9000, conns=3, nbytes=40_000) for i in range(6)]
    assert run([*normal, *sporadic]) == []


def test_volume_windows_that_alerted_are_not_learned(normal: list[TraceRecord]) -> None:
    engine = Engine(learn=LEARN)
    t = at(10, 15, 3)
    run([*normal[: len(normal) // 2]], engine)
    scales = engine._ids[PAY].volume  # noqa: SLF001
    def baselines() -> list[float]:
        return [h[0].quantile(0.99) for scale in scales for key, h in sorted(scale.parts.items()) if key[0] == LEDGER]

    before = baselines()
    for day in range(3):  # three days in a row of 40 MB minutes: each alerts, none is learned
        run([rec(t + day * DAY + 60 * i, nbytes=40_000_000) for i in range(10)], engine)
        run([rec(t + day * DAY + 3600 + 60 * i) for i in range(30)], engine)  # and back to normal
    after = baselines()
    assert before == after and max(after) < 1_000_000


def test_odd_hours_is_caught_and_neighbouring_hours_are_not(normal: list[TraceRecord]) -> None:
    night = rec(at(10, 3, 10))
    alerts = run([*normal, night])
    assert [a.detector for a in alerts] == ["odd_hours"]
    assert "03:00 UTC" in alerts[0].reason
    assert run([*normal, rec(at(10, 19, 20))]) == []  # just after hours: next to an hour it is active in


def test_credential_replay_from_a_new_node(normal: list[TraceRecord]) -> None:
    t = at(10, 12, 0) + 30
    replay = rec(t, node="node-66")
    alerts = run([*normal, replay])
    assert [a.detector for a in alerts] == ["new_node"]
    assert alerts[0].node == "node-66" and "while active on node-1" in alerts[0].reason
    assert alerts[0].score > 0.8  # concurrent use from two nodes
    # a record without a node (an inbound listener saw it) says nothing about nodes
    assert run([*normal, rec(t, node="")]) == []


def test_deny_burst_and_a_few_benign_denials(normal: list[TraceRecord]) -> None:
    t = at(10, 13)
    burst = [rec(t + 20 * i, port=8443, decision="deny", conns=12, nbytes=0) for i in range(4)]
    alerts = run([*normal, *burst])
    assert "deny_burst" in detectors(alerts)
    deny = next(a for a in alerts if a.detector == "deny_burst")
    assert "connections denied in 5 min" in deny.reason and deny.ts - t <= 300
    few = [rec(t + 600 * i, port=8443, decision="deny", conns=2, nbytes=0) for i in range(3)]
    assert "deny_burst" not in detectors(run([*normal, *few]))


def test_slow_and_low_probe(normal: list[TraceRecord]) -> None:
    t = at(10, 9)
    probes = [rec(t + 1500 * i + 7, dst=f"spiffe://example.org/db{i}", port=5432, decision="deny", conns=1,
                  nbytes=0) for i in range(5)]
    alerts = run([*normal, *probes])
    slow = [a for a in alerts if a.detector == "slow_sweep"]
    assert len(slow) == 1 and "spread over" in slow[0].reason
    assert "sweep" not in detectors(alerts)


QUARANTINE = """\
apiVersion: trustmesh/v1
kind: Response
metadata: {name: containment, owner: security}
spec:
  rules:
    - identity: spiffe://example.org/*
      detectors: [sweep]
      action: quarantine
      above: 0.7
    - identity: spiffe://example.org/payments
      detectors: [odd_hours]
      action: ignore
"""


def responses(text: str = QUARANTINE) -> ResponsePolicy:
    loaded = load_text(text, "r.yaml")
    assert loaded.ok, loaded.problems
    return loaded.policy.responses


def sweep_at(t: float) -> list[TraceRecord]:
    return [rec(t + i, dst=f"spiffe://example.org/x{i}", decision="deny", conns=1, nbytes=0) for i in range(8)]


def test_quarantine_by_response_rule_and_silence_after_it(normal: list[TraceRecord]) -> None:
    alerts = run([*normal, *sweep_at(at(10, 14)), *sweep_at(at(10, 14, 20))], Engine(responses(), learn=LEARN))
    quarantines = [a for a in alerts if a.action == "quarantine"]
    assert len(quarantines) == 1 and quarantines[0].rule == "containment rules[0]"
    assert all(a.ts <= quarantines[0].ts for a in alerts)  # nothing more once it is contained


def test_nothing_is_quarantined_while_learning() -> None:
    early = business(3)
    alerts = run([*early, *sweep_at(at(2, 14))], Engine(responses(), learn=LEARN))
    assert [a.action for a in alerts if a.detector == "sweep"] == ["alert"]


def test_dry_run_reports_and_keeps_watching(normal: list[TraceRecord]) -> None:
    dry = QUARANTINE.replace("spec:\n", "spec:\n  dry_run: true\n")
    alerts = run([*normal, *sweep_at(at(10, 14)), *sweep_at(at(10, 14, 20))], Engine(responses(dry), learn=LEARN))
    sweeps = [a for a in alerts if a.detector == "sweep"]
    assert len(sweeps) == 2 and all(a.action == "quarantine" and a.dry_run for a in sweeps)


def test_ignore_rule_silences_and_learns(normal: list[TraceRecord]) -> None:
    engine = Engine(responses(), learn=LEARN)
    nights = [rec(at(d, 3, 10)) for d in range(10, 14)]
    assert run([*normal, *nights], engine) == []
    assert 3 in engine._ids[PAY].hours.learned  # noqa: SLF001


def test_release_resumes_detection(normal: list[TraceRecord]) -> None:
    engine = Engine(responses(), learn=LEARN)
    run([*normal, *sweep_at(at(10, 14))], engine)
    assert run(sweep_at(at(10, 15)), engine) == []
    engine.set_quarantined([])
    assert [a.action for a in run(sweep_at(at(10, 16)), engine) if a.detector == "sweep"] == ["quarantine"]


def test_deterministic_for_a_trace_and_configuration(normal: list[TraceRecord]) -> None:
    attack = [*sweep_at(at(10, 14)), rec(at(11, 3)), rec(at(12, 12, 0) + 1, node="node-9"),
              rec(at(12, 15), nbytes=90_000_000)]
    first = run([*normal, *attack], Engine(learn=LEARN))
    second = run([*normal, *attack], Engine(learn=LEARN))
    assert first == second
    assert {"new_peer", "sweep", "odd_hours", "new_node", "volume"} <= detectors(first)


def test_identities_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import trustmesh.detect.engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_IDENTITIES", 3)
    engine = Engine(learn=0)
    for i in range(10):
        engine.observe(rec(START + i, src=f"spiffe://example.org/s{i}"))
    assert engine.identities() == 3 and engine.dropped == 7


def test_response_rules_pick_the_strongest_action_reached() -> None:
    policy = responses(QUARANTINE + """\
    - identity: "*"
      detectors: ["*"]
      action: alert
      above: 0.9
""")
    assert policy.verdict(PAY, "sweep", 0.75).action == "quarantine"
    assert policy.verdict(PAY, "sweep", 0.5).action == "ignore"  # matched, below every threshold
    assert policy.verdict(PAY, "volume", 0.95).action == "alert"
    assert policy.verdict("unverified:10.1.1.1", "sweep", 0.99).action == "alert"  # spiffe:// prefix only
    exception = responses(QUARANTINE + """\
    - identity: "*"
      detectors: ["*"]
      action: alert
      above: 0.1
""")
    # the ignore rule for payments' odd hours wins over the broad alert rule
    assert exception.verdict(PAY, "odd_hours", 0.99) == Verdict("ignore", "containment rules[1]")
    assert exception.verdict(PAY, "volume", 0.2).action == "alert"
    assert ResponsePolicy().verdict(PAY, "volume", 0.5).action == "alert"  # the built-in default
    assert ResponsePolicy().verdict(PAY, "volume", 0.49).action == "ignore"


@pytest.mark.parametrize(("rule", "message"), [
    ("{identity: '*', detectors: [nope], action: alert, above: 0.5}", "unknown detector 'nope'"),
    ("{identity: '*', action: quarantine, above: 1.5}", "must be a score from 0 to 1"),
    ("{identity: '*', action: block, above: 0.5}", "must be one of ignore, alert, quarantine"),
    ("{identity: '*', action: alert, above: 0.5, target: node}", "node is a quarantine target"),
    ("{identity: 'spiffe://x/*/y', action: alert, above: 0.5}", "wildcard is only allowed"),
    ("{identity: '*', action: alert, above: 0.5, when: now}", "unknown key"),
])
def test_response_documents_are_linted(rule: str, message: str) -> None:
    text = f"apiVersion: trustmesh/v1\nkind: Response\nmetadata: {{name: r}}\nspec:\n  rules:\n    - {rule}\n"
    loaded = load_text(text, "r.yaml")
    assert not loaded.ok and any(message in p.message for p in loaded.problems), loaded.problems


def test_two_response_documents_with_one_name_are_refused() -> None:
    one = "apiVersion: trustmesh/v1\nkind: Response\nmetadata: {name: r}\nspec:\n  rules: [{identity: '*', " \
          "action: alert, above: 0.5}]\n"
    loaded = load_text(one + "---\n" + one, "r.yaml")
    assert any("also defined" in p.message for p in loaded.problems)


def replay(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustmesh.cli.main", "detect", "replay", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_replay_cli_prints_json_alerts_in_time_order(tmp_path: Path, normal: list[TraceRecord]) -> None:
    trace = tmp_path / "trace.jsonl"
    attack = sweep_at(at(10, 14))
    # out of order in the file: the replay sorts by time
    trace.write_text("".join(record_to_line(r) for r in [*attack, *normal]))
    config = tmp_path / "responses.yaml"
    config.write_text(QUARANTINE)
    done = replay([str(trace), "--config", str(config), "--json"])
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(x["detector"], x["action"]) for x in lines] == [("new_peer", "alert"), ("sweep", "quarantine")]
    assert set(lines[1]) == {"ts", "identity", "node", "detector", "score", "action", "reason"}
    assert lines[1]["ts"].endswith("Z") and lines[1]["identity"] == PAY
    assert "alert(s), quarantined 1" in done.stderr
    text = replay([str(trace), "--config", str(config), "--dry-run"])
    assert "would quarantine" in text.stdout and "would have quarantined 1" in text.stderr


@pytest.mark.parametrize(("content", "message"), [
    ('{"ts": "yesterday", "source": "a", "destination": "b", "port": 1, "decision": "allow"}\n',
     "line 1: 'ts' must be an ISO 8601"),
    ("not json\n", "line 1: not JSON"),
    ('{"ts": "2026-01-01T00:00:00Z", "source": "a", "destination": "b", "port": 70000, "decision": "allow"}\n',
     "'port' must be a whole number"),
    ('{"ts": "2026-01-01T00:00:00Z", "source": "a", "destination": "b", "port": 1, "decision": "maybe"}\n',
     "'decision' must be one of"),
])
def test_replay_cli_refuses_a_bad_trace_in_one_line(tmp_path: Path, content: str, message: str) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text(content)
    done = replay([str(trace)])
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_replay_cli_refuses_bad_config_and_learn(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text("")
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: trustmesh/v1\nkind: Response\nmetadata: {name: r}\nspec: {rules: [{action: x}]}\n")
    done = replay([str(trace), "--config", str(bad)])
    assert done.returncode == 2 and "bad.yaml: document 1" in done.stderr
    done = replay([str(trace), "--learn", "forever"])
    assert done.returncode == 2 and "--learn 'forever'" in done.stderr
    assert replay([str(tmp_path / "missing.jsonl")]).returncode == 2


def test_state_survives_a_restart_and_a_tampered_state_is_refused(normal: list[TraceRecord]) -> None:
    from trustmesh.detect.engine import StateError, engine_state, restore_engine

    engine = Engine(learn=LEARN)
    run(normal, engine)
    saved = json.loads(json.dumps(engine_state(engine)))
    restarted = Engine(learn=LEARN)
    restore_engine(restarted, saved)
    attack = [rec(at(14, 11) + 5, port=22, decision="deny", conns=1, nbytes=0), rec(at(14, 12), nbytes=60_000_000)]
    assert run(attack, restarted) == run(attack, engine) != []
    saved["identities"][PAY]["hours"]["learned"] = ["not an hour", None]
    with pytest.raises(StateError):
        restore_engine(Engine(), saved)
    with pytest.raises(StateError):
        restore_engine(Engine(), {"version": 99})
