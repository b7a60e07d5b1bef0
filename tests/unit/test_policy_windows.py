"""Time windows on allow rules: matching (midnight, daylight saving with a fake clock), the
denial's reason, loading and lint problems, the wire form and the agents that cannot use it,
`policy test --at`, `policy simulate` and `policy diff`."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from tests.unit.test_sync_delta import FEDERATED, OWN_BUNDLE, entry
from trustmesh.cli.main import main
from trustmesh.controlplane import sync_delta
from trustmesh.controlplane.policy_store import diff_text
from trustmesh.flows import Flow
from trustmesh.policy import Policy, PolicyError, load_text
from trustmesh.policy.loader import allow_rule_to_dict, to_document
from trustmesh.policy.suggest import simulate
from trustmesh.policy.windows import EVERY_DAY, TimeWindow, parse_window
from trustmesh.policy.wire import policy_from_pb, policy_to_pb
from trustmesh.spiffeid import SpiffeId
from trustmesh.wire import bundle_to_pb

UTC = timezone.utc
NOW = datetime(2026, 12, 1, tzinfo=UTC)
PAYMENTS = SpiffeId.parse("spiffe://example.org/payments")
LEDGER = SpiffeId.parse("spiffe://example.org/ledger")
WEEKDAYS = 0b0011111


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def w(hours: str, tz: str = "UTC", days: list[str] | None = None) -> TimeWindow:
    raw: dict[str, object] = {"hours": hours, "timezone": tz}
    if days is not None:
        raw["days"] = days
    return parse_window(raw)


def minutes_open(window: TimeWindow, start: datetime, hours: int) -> list[datetime]:
    """Every whole UTC minute in [start, start + hours) at which `window` holds: the fake clock."""
    return [t for t in (start + timedelta(minutes=m) for m in range(hours * 60)) if window.holds(t)]


# --- matching ------------------------------------------------------------------------------------

def test_office_hours_on_weekdays() -> None:
    office = w("08:00-19:00", "Europe/London", ["mon", "tue", "wed", "thu", "fri"])
    assert office.days == WEEKDAYS and str(office) == "mon-fri 08:00-19:00 Europe/London"
    assert office.holds(at("2026-12-01T08:00:00+00:00"))  # Tuesday, GMT
    assert not office.holds(at("2026-12-01T07:59:59+00:00"))
    assert office.holds(at("2026-12-01T18:59:59+00:00"))
    assert not office.holds(at("2026-12-01T19:00:00+00:00"))  # the end is exclusive
    assert not office.holds(at("2026-12-05T12:00:00+00:00"))  # Saturday


def test_a_window_crossing_midnight_belongs_to_the_day_it_starts() -> None:
    settlement = w("22:00-02:00", "UTC", ["fri"])
    assert settlement.crosses_midnight
    assert settlement.holds(at("2026-12-04T22:00:00+00:00"))  # Friday night
    assert settlement.holds(at("2026-12-05T01:59:00+00:00"))  # Saturday small hours: still Friday's window
    assert not settlement.holds(at("2026-12-05T02:00:00+00:00"))
    assert not settlement.holds(at("2026-12-05T23:00:00+00:00"))  # Saturday's own night: not listed
    assert not settlement.holds(at("2026-12-04T01:00:00+00:00"))  # Friday 01:00 belongs to Thursday's window
    # Sunday night's window runs into Monday: the week wraps.
    assert w("23:00-01:00", "UTC", ["sun"]).holds(at("2026-12-07T00:30:00+00:00"))


def test_an_end_at_midnight_is_the_end_of_the_day() -> None:
    noon_on = w("12:00-00:00", "UTC", ["mon"])
    assert noon_on == w("12:00-24:00", "UTC", ["mon"]) and not noon_on.crosses_midnight
    assert noon_on.holds(at("2026-11-30T23:59:00+00:00")) and not noon_on.holds(at("2026-12-01T00:00:00+00:00"))


def test_whole_day_and_every_day() -> None:
    whole = w("00:00-24:00", "Asia/Kolkata")
    assert whole.days == EVERY_DAY and str(whole) == "00:00-24:00 Asia/Kolkata"
    assert len(minutes_open(whole, at("2026-12-01T00:00:00+00:00"), 24)) == 24 * 60


def test_parse_window_names_its_first_problem() -> None:
    with pytest.raises(PolicyError, match="hours: '25:00-26:00': hours are 00:00 to 23:59"):
        parse_window({"hours": "25:00-26:00", "timezone": "UTC"})
    with pytest.raises(PolicyError, match="unknown field 'zone'"):
        parse_window({"hours": "08:00-09:00", "zone": "UTC"})
    with pytest.raises(PolicyError, match="must be a mapping"):
        parse_window("08:00-09:00")


def test_days_are_shown_as_ranges() -> None:
    assert str(w("08:00-09:00", days=["mon", "wed", "thu", "fri"])) == "mon,wed-fri 08:00-09:00 UTC"
    assert str(w("08:00-09:00", days=["sun", "sat"])) == "sat,sun 08:00-09:00 UTC"


# --- daylight saving (the rule: instants are converted, never local times) -------------------------

def test_london_office_hours_follow_the_wall_clock_across_both_transitions() -> None:
    office = w("08:00-19:00", "Europe/London")
    # Before spring-forward (GMT) 08:00 local is 08:00 UTC; after it (BST) it is 07:00 UTC.
    assert office.holds(at("2026-03-28T08:00:00+00:00")) and not office.holds(at("2026-03-28T07:59:00+00:00"))
    assert office.holds(at("2026-03-30T07:00:00+00:00")) and not office.holds(at("2026-03-30T06:59:00+00:00"))
    assert not office.holds(at("2026-03-30T18:00:00+00:00"))  # 19:00 BST
    # Back to GMT after the last Sunday of October.
    assert not office.holds(at("2026-10-26T07:00:00+00:00")) and office.holds(at("2026-10-26T08:00:00+00:00"))
    # The day of each change is still 11 hours of wall clock.
    assert len(minutes_open(office, at("2026-03-29T00:00:00+00:00"), 24)) == 11 * 60
    assert len(minutes_open(office, at("2026-10-25T00:00:00+00:00"), 24)) == 11 * 60


def test_london_spring_forward_gap_opens_at_its_end() -> None:
    # 2026-03-29 01:00 GMT the clocks jump to 02:00 BST: local 01:00-02:00 never happens.
    start = at("2026-03-29T00:00:00+00:00")
    straddling = minutes_open(w("01:30-02:30", "Europe/London"), start, 3)
    assert straddling[0] == at("2026-03-29T01:00:00+00:00")  # = 02:00 BST, the first instant after the gap
    assert straddling[-1] == at("2026-03-29T01:29:00+00:00") and len(straddling) == 30
    assert minutes_open(w("01:10-01:50", "Europe/London"), start, 3) == []  # wholly inside the gap
    closing = minutes_open(w("00:30-01:30", "Europe/London"), start, 3)  # ends inside the gap: at its start
    assert (closing[0], closing[-1]) == (at("2026-03-29T00:30:00+00:00"), at("2026-03-29T00:59:00+00:00"))


def test_london_fall_back_repeated_hour_is_inside_both_times() -> None:
    # 2026-10-25 02:00 BST the clocks go back to 01:00 GMT: local 01:00-02:00 happens twice.
    opened = minutes_open(w("01:00-01:30", "Europe/London"), at("2026-10-24T23:00:00+00:00"), 4)
    assert len(opened) == 60  # two half hours of real time
    assert opened[0] == at("2026-10-25T00:00:00+00:00") and opened[29] == at("2026-10-25T00:29:00+00:00")
    assert opened[30] == at("2026-10-25T01:00:00+00:00") and opened[-1] == at("2026-10-25T01:29:00+00:00")


def test_new_york_transitions() -> None:
    # 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
    gap = minutes_open(w("02:15-02:45", "America/New_York"), at("2026-03-08T05:00:00+00:00"), 5)
    assert gap == []
    opening = minutes_open(w("02:30-04:00", "America/New_York"), at("2026-03-08T05:00:00+00:00"), 5)
    assert opening[0] == at("2026-03-08T07:00:00+00:00") and len(opening) == 60  # 03:00-04:00 EDT only
    repeated = minutes_open(w("01:00-02:00", "America/New_York"), at("2026-11-01T04:00:00+00:00"), 4)
    assert (repeated[0], repeated[-1], len(repeated)) == (at("2026-11-01T05:00:00+00:00"),
                                                          at("2026-11-01T06:59:00+00:00"), 120)
    trading = w("09:30-16:00", "America/New_York", ["mon", "tue", "wed", "thu", "fri"])
    assert trading.holds(at("2026-03-06T14:30:00+00:00")) and not trading.holds(at("2026-03-06T13:30:00+00:00"))
    assert trading.holds(at("2026-03-09T13:30:00+00:00")) and not trading.holds(at("2026-03-09T20:00:00+00:00"))


# --- decisions -------------------------------------------------------------------------------------

RULES = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access}}
spec:
  destination: spiffe://example.org/ledger
  mode: {mode}
  allow:
    - from: spiffe://example.org/payments
{when}
"""
OFFICE = '      when: {days: [mon, tue, wed, thu, fri], hours: "08:00-19:00", timezone: Europe/London}'


def policy(when: str = OFFICE, mode: str = "enforce") -> Policy:
    loaded = load_text(RULES.format(when=when, mode=mode), "p.yaml", NOW)
    assert loaded.ok, [str(p) for p in loaded.problems]
    return loaded.policy


def test_a_rule_allows_inside_its_window_and_says_why_it_denies_outside() -> None:
    p = policy()
    assert p.decide(PAYMENTS, LEDGER, 9443, at("2026-12-01T09:00:00+00:00")).allowed
    denied = p.decide(PAYMENTS, LEDGER, 9443, at("2026-12-01T20:00:00+00:00"))
    assert not denied.allowed and denied.rule == "default deny"
    assert denied.reason == (f"no active rule allows {PAYMENTS}; ledger-access allow[0] outside window "
                             "mon-fri 08:00-19:00 Europe/London")
    # Audit mode lets it through, and says what enforce would do.
    audit = policy(mode="audit").decide(PAYMENTS, LEDGER, 9443, at("2026-12-01T20:00:00+00:00"))
    assert audit.allowed and audit.audit_only


def test_any_window_of_a_list_allows_and_the_reason_names_them_all() -> None:
    p = policy('      when:\n        - {days: [sat], hours: "10:00-12:00", timezone: UTC}\n'
               '        - {hours: "22:00-02:00", timezone: UTC}')
    assert p.decide(PAYMENTS, LEDGER, None, at("2026-12-05T11:00:00+00:00")).allowed
    assert p.decide(PAYMENTS, LEDGER, None, at("2026-12-01T01:00:00+00:00")).allowed
    reason = p.decide(PAYMENTS, LEDGER, None, at("2026-12-01T12:00:00+00:00")).reason
    assert reason.endswith("allow[0] outside windows sat 10:00-12:00 UTC, 22:00-02:00 UTC")


def test_another_rule_without_a_window_still_allows() -> None:
    text = RULES.format(when=OFFICE, mode="enforce") + "    - from: spiffe://example.org/payments\n" \
                                                       "      expires: 2031-01-01T00:00:00Z\n"
    p = load_text(text, "p.yaml", NOW).policy
    decision = p.decide(PAYMENTS, LEDGER, None, at("2026-12-01T20:00:00+00:00"))
    assert decision.allowed and decision.rule == "ledger-access allow[1]"


# --- loading and lint --------------------------------------------------------------------------------

@pytest.mark.parametrize(("when", "message"), [
    ('{hours: "08:00-19:00", timezone: Mars/Olympus}',
     "spec.allow[0].when.timezone: unknown time zone 'Mars/Olympus': use an IANA name like Europe/London or UTC"),
    ('{hours: "08:00-19:00", timezone: "../../etc/passwd"}',
     "spec.allow[0].when.timezone: '../../etc/passwd' is not a time zone: use an IANA name like Europe/London or UTC"),
    ('{hours: "8:00-19:00", timezone: UTC}',
     "spec.allow[0].when.hours: '8:00-19:00' is not hours: use \"HH:MM-HH:MM\""),
    ('{hours: "08:00-25:00", timezone: UTC}', "'08:00-25:00': hours are 00:00 to 23:59 (and 24:00 as an end)"),
    ('{hours: "08:00-08:00", timezone: UTC}', "'08:00-08:00' starts and ends at the same time: use \"00:00-24:00\""),
    ('{days: [mon, funday], hours: "08:00-19:00", timezone: UTC}',
     "spec.allow[0].when.days[1]: unknown day 'funday': use mon, tue, wed"),
    ('{days: [mon, mon], hours: "08:00-19:00", timezone: UTC}', "spec.allow[0].when.days: mon is listed twice"),
    ('{days: [], hours: "08:00-19:00", timezone: UTC}', "spec.allow[0].when.days: must be a non-empty list"),
    ('{hours: "08:00-19:00"}', "spec.allow[0].when.timezone: is required"),
    ('{timezone: UTC}', "spec.allow[0].when.hours: is required"),
    ('{hours: "08:00-19:00", timezone: UTC, day: mon}',
     "spec.allow[0].when.day: unknown key; allowed here: days, hours, timezone"),
    ("[]", "spec.allow[0].when: must be a window {days: [mon, ...] (optional)"),
    ('[{hours: "08:00-19:00", timezone: UTC}, {days: [mon, tue, wed, thu, fri, sat, sun], hours: "08:00-19:00", '
     'timezone: UTC}]', "spec.allow[0].when[1]: duplicates spec.allow[0].when[0] (08:00-19:00 UTC)"),
    ('[{hours: "08:00-19:00", timezone: UTC}, {hours: "x", timezone: UTC}]',
     "spec.allow[0].when[1].hours: 'x' is not hours"),
])
def test_bad_windows_are_problems_on_their_field(when: str, message: str) -> None:
    loaded = load_text(RULES.format(when=f"      when: {when}", mode="enforce"), "p.yaml", NOW)
    assert not loaded.ok
    assert any(message in str(p) for p in loaded.problems), [str(p) for p in loaded.problems]


def test_lint_reports_a_bad_zone_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(RULES.format(when='      when: {hours: "08:00-19:00", timezone: Europe/Londn}', mode="enforce"))
    assert main(["policy", "lint", str(path)]) == 1
    out = capsys.readouterr().out
    assert "spec.allow[0].when.timezone: unknown time zone 'Europe/Londn'" in out and "1 problem(s)" in out
    path.write_text(RULES.format(when=OFFICE, mode="enforce"))
    assert main(["policy", "lint", str(path)]) == 0


def test_the_same_source_in_two_windows_is_no_duplicate() -> None:
    text = RULES.format(when=OFFICE, mode="enforce") + \
        '    - from: spiffe://example.org/payments\n      when: {days: [sat], hours: "10:00-12:00", timezone: UTC}\n'
    assert load_text(text, "p.yaml", NOW).ok


def test_documents_round_trip_with_their_windows() -> None:
    p = policy('      when:\n        - {days: [sun, sat], hours: "10:00-12:00", timezone: UTC}\n'
               '        - {hours: "22:00-02:00", timezone: America/New_York}')
    rule = p.allowlists[0].allow[0]
    assert allow_rule_to_dict(rule)["when"] == [{"days": ["sat", "sun"], "hours": "10:00-12:00", "timezone": "UTC"},
                                                {"hours": "22:00-02:00", "timezone": "America/New_York"}]
    again = load_text(yaml.safe_dump(to_document(p.allowlists[0])), "again.yaml", NOW).policy
    assert again.allowlists == p.allowlists
    single = allow_rule_to_dict(policy().allowlists[0].allow[0])["when"]
    assert single == {"days": ["mon", "tue", "wed", "thu", "fri"], "hours": "08:00-19:00",
                      "timezone": "Europe/London"}


# --- the wire, and agents that cannot evaluate windows ------------------------------------------------

def test_windows_survive_the_wire() -> None:
    p = policy('      when:\n        - {days: [fri], hours: "22:00-24:00", timezone: Europe/London}\n'
               '        - {hours: "00:00-02:00", timezone: UTC}')
    message = policy_to_pb(p)
    assert [(x.days, x.start_minute, x.end_minute, x.timezone) for x in message.rules[0].allow[0].windows] == [
        (0b0010000, 22 * 60, 24 * 60, "Europe/London"), (EVERY_DAY, 0, 120, "UTC")]
    assert policy_from_pb(message).allowlists == p.allowlists


def test_a_window_an_agent_cannot_evaluate_refuses_the_policy_never_widens_it() -> None:
    message = policy_to_pb(policy())
    message.rules[0].allow[0].windows[0].timezone = "Mars/Olympus"
    with pytest.raises(PolicyError, match=r"ledger-access allow\[0\] has a time window this agent cannot use: "
                                          r"unknown time zone 'Mars/Olympus'"):
        policy_from_pb(message)
    message.rules[0].allow[0].windows[0].timezone = "UTC"
    message.rules[0].allow[0].windows[0].days = 0
    with pytest.raises(PolicyError, match="days bitmask 0"):
        policy_from_pb(message)


def test_an_agent_without_the_feature_gets_no_windowed_rule_and_denies() -> None:
    """An agent of a release before windows would read a windowed rule as allowing at every
    time: it is sent none of them (fail closed) and denies what only they allow."""
    w1 = SpiffeId.parse("spiffe://example.org/w1")
    text = RULES.format(when=OFFICE, mode="enforce").replace("/ledger", "/w1") + \
        "    - from: spiffe://example.org/frontend\n"
    p = load_text(text, "p.yaml", NOW).policy
    inside = at("2026-12-01T09:00:00+00:00")

    def sent(time_windows: bool) -> Policy:
        state = sync_delta.agent_state([entry(1)], own_bundle=bundle_to_pb(OWN_BUNDLE), federated=FEDERATED,
                                       policy=p, revoked_serials=frozenset(), revision=3, time_windows=time_windows)
        return policy_from_pb(state.policy)

    assert [str(r.source) for r in sent(True).allowlists[0].allow] == [str(PAYMENTS), "spiffe://example.org/frontend"]
    assert sent(True).decide(PAYMENTS, w1, None, inside).allowed
    old = sent(False)
    assert [str(r.source) for r in old.allowlists[0].allow] == ["spiffe://example.org/frontend"]
    assert not old.decide(PAYMENTS, w1, None, inside).allowed
    assert old.decide(SpiffeId.parse("spiffe://example.org/frontend"), w1, None, inside).allowed
    assert p.without_windows().without_windows() == p.without_windows()
    plain = load_text(RULES.format(when="", mode="enforce"), "p.yaml", NOW).policy
    assert plain.without_windows() is plain


def test_the_agent_advertises_windows() -> None:
    source = (Path(__file__).parents[2] / "agent" / "sync.py").read_text()
    assert "features=[HTTP_ROUTES, TIME_WINDOWS]" in source


# --- the CLI ----------------------------------------------------------------------------------------

def test_policy_test_at_honours_windows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(RULES.format(when=OFFICE, mode="enforce"))
    base = ["policy", "test", str(path), "--from", str(PAYMENTS), "--to", str(LEDGER), "--at"]
    assert main([*base, "2027-01-04T09:00:00Z"]) == 0  # a Monday
    assert "ALLOW  ledger-access allow[0]" in capsys.readouterr().out
    assert main([*base, "2027-01-04T19:30:00Z"]) == 1
    assert "outside window mon-fri 08:00-19:00 Europe/London" in capsys.readouterr().out
    assert main([*base, "2027-07-05T07:30:00Z"]) == 0  # 08:30 BST


def flow(first: str, last: str | None = None) -> Flow:
    start = at(first).timestamp()
    end = at(last).timestamp() if last else start
    return Flow(str(PAYMENTS), str(LEDGER), 9443, "allow", "old allow[0]", 1, 10, 10, start, end)


def test_simulate_judges_each_flow_at_its_own_time() -> None:
    observed = [flow("2026-11-30T10:00:00+00:00"), flow("2026-11-30T21:00:00+00:00"),
                flow("2026-11-30T18:00:00+00:00", "2026-11-30T19:30:00+00:00")]
    result = simulate(policy(), observed, NOW)
    assert result.judged == 3
    assert [(r.flow.first_seen, r.reason) for r in result.would_deny] == [
        (at("2026-11-30T21:00:00+00:00").timestamp(),
         f"no active rule allows {PAYMENTS}; ledger-access allow[0] outside window mon-fri 08:00-19:00 Europe/London"),
        (at("2026-11-30T18:00:00+00:00").timestamp(),
         f"no active rule allows {PAYMENTS}; ledger-access allow[0] outside window mon-fri 08:00-19:00 Europe/London"),
    ]
    assert result.unused_rules == []


def test_a_diff_shows_a_window_change() -> None:
    before, after = policy(), policy('      when: {days: [mon, tue, wed, thu, fri], hours: "08:00-20:00", '
                                     'timezone: Europe/London}')
    text = diff_text(before, after, "current", "proposed")
    assert "-    hours: 08:00-19:00" in text and "+    hours: 08:00-20:00" in text, text
