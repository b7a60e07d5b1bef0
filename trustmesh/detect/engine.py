"""The detection engine: per-identity baselines learned online from flow records, detectors
that each give a score (0 to 1) and one sentence naming the feature, the baseline and the
observed value, and the response policy that turns a score into an alert or a quarantine.

One engine, fed in time order, is all there is: the server feeds it each flow report as it
arrives, `trustmesh detect replay` feeds it a trace, so both give the same alerts for the
same records and configuration. It is deterministic: no clocks, no randomness, dictionaries
in insertion order.

Baselines (per identity, the flow's source):
  * peers: the (destination, port) pairs it uses; the nodes it runs on; the hours of the day
    (UTC) it is active in;
  * volume: per peer, the distribution of bytes and connections per 10-minute window (a
    log-scale histogram, halved when it holds about 30 days of windows, so it adapts slowly);
  * denials: the distribution of denied connections per 5-minute window.
Learning: for `learn` seconds after an identity is first seen everything is learned and
only the detectors that need no baseline (sweep, deny_burst) can fire; nothing is ever
quarantined automatically in that period. Afterwards something new (a peer, a node, an hour)
raises its alert once, and becomes part of the baseline only after it has been seen on
PROMOTE_DAYS more days without raising one: a record that raised an alert (or comes from a
quarantined identity) is never learned.

Every table is bounded (identities, peers, nodes, windows): a trace or report is hostile
input, and past a bound new keys are not learned rather than memory growing.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from trustmesh.clock import format_utc
from trustmesh.detect.trace import TraceRecord
from trustmesh.policy.responses import ResponsePolicy

DAY = 86400.0
LEARN_DEFAULT = 7 * DAY
# Volume is watched at two scales, each against the identity's own distribution per peer
# (and part of the day): (seconds per window, the quantile of past windows it is measured
# against, observed / that quantile from which a window is above, floors in bytes and
# connections below which nothing is "far outside" (tiny peers vary wildly), windows in a
# row above before it alerts). Minutes count the idle ones of a peer's active 10-minute
# windows as zeros, so a peer busy every minute where it is usually busy one minute in ten
# stands out. An excess kept up minute after minute shows in its fourth minute, long before
# its 10-minute sum does, and one big minute is not enough; a 10-minute sum (sliding) far
# above its own p99 alerts at once. Tuned on seeds 1-3 of benchmarks/detect_trace.py and
# checked on seeds 4-5 (benchmarks/analysis.md).
VOLUME_SCALES = ((60, 0.9, 3.5, 25_000, 20, 4), (600, 0.99, 4.0, 256_000, 100, 1))
MIN_VOLUME_WINDOWS = 24  # active windows of a peer before its volume baseline counts
IDLE_WINDOWS = 10  # idle minutes learned as zeros at most per roll (the longer scale's window)
DENY_WINDOW = 300  # denials: the sliding window of a burst, and the windows of its baseline
SWEEP_WINDOW = 300
SLOW_WINDOW = 6 * 3600.0
PROMOTE_DAYS = 3  # days something new must be seen, without an alert, to become normal
SWEEP_MIN_TARGETS = 6  # distinct denied (destination, port) pairs in SWEEP_WINDOW
SLOW_MIN_TARGETS = 4  # distinct denied targets never used before, in SLOW_WINDOW
DENY_BURST_MIN = 20
DENY_BURST_RATIO = 10.0
HISTORY_SECONDS = 30 * DAY  # a histogram holds about this much before it is halved
ODD_HOURS_COOLDOWN = 6 * 3600.0
BURST_COOLDOWN = 600.0
# A sliding 10-minute sum still holds an excess up to 20 minutes after it began.
VOLUME_COOLDOWN = 2.0 * max(scale[0] for scale in VOLUME_SCALES)
INCIDENT_SECONDS = 600.0  # after an alert, the identity's records are not learned for this long
NEW_PEER_COOLDOWN = 600.0  # one new-peer alert per identity per this long (a sweep is one incident)
CONCURRENT_SECONDS = 600.0  # active on a known node this recently: a new node is concurrent use
COMMON_ENDPOINT_USERS = 3  # identities using a (destination, port) that make it a common service endpoint

MAX_IDENTITIES = 100_000
MAX_PEERS = 1_000  # learned + pending, per identity
MAX_NODES = 256
MAX_RECENT = 2_000  # records in an identity's sweep window


_log2 = math.log2


class _Histogram:
    """Counts of values in log-scale buckets (four per doubling): quantiles to within 19%,
    in constant memory, the same on every run. Added to once per window, asked on nearly every
    record: quantiles are kept until the next add, the buckets' order until a new bucket."""

    __slots__ = ("counts", "total", "_known", "_order", "cap")

    def __init__(self, cap: int = int(HISTORY_SECONDS // 300)) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self._known: dict[float, float] = {}  # quantiles asked since the last add
        self._order: list[int] | None = None  # the buckets, sorted
        self.cap = cap

    def add(self, value: float) -> None:
        b = 0 if value <= 0 else 1 + int(_log2(value) * 4)  # four buckets per doubling
        counts = self.counts
        n = counts.get(b)
        if n is None:
            counts[b] = 1
            self._order = None
        else:
            counts[b] = n + 1
        self.total += 1
        if self._known:
            self._known = {}
        if self.total > self.cap:
            self._halve()

    def _halve(self) -> None:
        # Old windows weigh less: the baseline keeps adapting.
        self.counts = {k: v // 2 for k, v in self.counts.items() if v // 2}
        self.total = sum(self.counts.values())
        self._order = None

    def add_zero(self) -> None:
        """add(0), for the many idle minutes: no logarithm, no new bucket but the first time."""
        counts = self.counts
        n = counts.get(0)
        if n is None:
            counts[0] = 1
            self._order = None
        else:
            counts[0] = n + 1
        self.total += 1
        if self._known:
            self._known = {}
        if self.total > self.cap:
            self._halve()

    @property
    def p99(self) -> float:
        return self.cached(0.99)

    def cached(self, q: float) -> float:
        known = self._known.get(q)
        if known is None:
            known = self._known[q] = self.quantile(q)
        return known

    def quantile(self, q: float) -> float:
        """The upper edge of the bucket holding the q-quantile (0 for an empty histogram)."""
        if not self.total:
            return 0.0
        order = self._order
        if order is None:
            order = self._order = sorted(self.counts)
        rank = q * self.total
        seen = 0
        counts = self.counts
        for b in order:
            seen += counts[b]
            if seen >= rank:
                return 0.0 if b == 0 else 2 ** (b / 4)
        return 2 ** (order[-1] / 4)


class _Novelty:
    """Learned items, and items seen since learning ended, with the days they were seen on
    without raising an alert."""

    __slots__ = ("learned", "pending", "limit")

    def __init__(self, limit: int) -> None:
        self.learned: dict[object, None] = {}
        self.pending: dict[object, set[int]] = {}
        self.limit = limit

    def __contains__(self, item: object) -> bool:
        return item in self.learned

    def learn(self, item: object) -> bool:
        """Learn `item`; whether it is new to the baseline."""
        if item not in self.learned and len(self.learned) + len(self.pending) < self.limit:
            self.learned[item] = None
            return True
        return False

    def is_new(self, item: object) -> bool:
        """Never learned and never seen since: the first sighting, which alerts."""
        return item not in self.learned and item not in self.pending

    def saw(self, item: object, day: int, alerted: bool) -> bool:
        """Count a sighting after learning ended; whether it made `item` part of the baseline."""
        if item in self.learned:
            return False
        days = self.pending.get(item)
        if days is None:
            if len(self.learned) + len(self.pending) >= self.limit:
                return False
            days = self.pending[item] = set()
            if alerted:
                return False  # the first sighting raised the alert: it is not evidence of normal
        if alerted:
            return False
        days.add(day)
        if len(days) >= PROMOTE_DAYS:
            del self.pending[item]
            self.learned[item] = None
            return True
        return False


PART_HOURS = 3
PARTS = 24 // PART_HOURS


def _part(ts: float) -> int:
    return int(ts // 3600) % 24 // PART_HOURS


class _Scale:
    """One identity's volume per peer at one scale: the sums of the current window and the one
    before (a sliding sum, for the long scale), and the distribution of past windows' sums.
    With `sustain` > 1 a window above the threshold alerts only after as many in a row: one
    big minute is noise, the same excess minute after minute is not."""

    __slots__ = ("seconds", "q", "ratio", "floor_bytes", "floor_conns", "sustain", "window", "now", "prev",
                 "alerted", "hist", "parts", "streak")

    def __init__(self, seconds: int, q: float, ratio: float, floor_bytes: int, floor_conns: int,
                 sustain: int) -> None:
        self.seconds, self.q, self.ratio, self.sustain = seconds, q, ratio, sustain
        self.floor_bytes, self.floor_conns = floor_bytes, floor_conns
        self.window = -1
        self.now: dict[str, list[int]] = {}  # destination -> [bytes, connections] this window
        self.prev: dict[str, list[int]] = {}
        self.alerted: set[str] = set()  # destinations whose window raised a volume alert
        # Per destination, and per destination and part of the day (PART_HOURS): traffic has a
        # daily rhythm, and an evening excess is measured against evenings, not the peak.
        self.hist: dict[str, tuple[_Histogram, _Histogram]] = {}
        self.parts: dict[tuple[str, int], tuple[_Histogram, _Histogram]] = {}
        self.streak: dict[str, tuple[int, int]] = {}  # destination -> (last window above, windows in a row)

    def _learn(self, dst: str, part: int, nbytes: int, conns: int) -> None:
        if self.sustain == 1:
            # The whole-day distribution is the fallback for a part of the day not seen yet. A
            # run of minutes is only ever measured against its own part of the day, so the
            # busiest table (one add per peer and minute) keeps no whole-day one.
            hist = self.hist.get(dst)
            if hist is None:
                if len(self.hist) >= MAX_PEERS:
                    return
                cap = int(HISTORY_SECONDS // self.seconds)
                hist = self.hist[dst] = (_Histogram(cap), _Histogram(cap))
            hist[0].add(nbytes)
            hist[1].add(conns)
        of_part = self.parts.get((dst, part))
        if of_part is None:
            if len(self.parts) >= MAX_PEERS * PARTS:
                return
            cap = int(HISTORY_SECONDS // self.seconds // PARTS)
            of_part = self.parts[(dst, part)] = (_Histogram(cap), _Histogram(cap))
        of_part[0].add(nbytes)
        of_part[1].add(conns)

    def roll(self, ts: float, learn: bool, busy: list[str] | None = None) -> None:
        """Close the window if `ts` is past it, learning its sums. `busy`: the peers active in
        the longer scale's windows; their idle minutes are learned as zeros, so a peer that
        is normally busy one minute in ten stands out when it is busy every minute."""
        window = int(ts // self.seconds)
        if window == self.window:
            return
        if self.window >= 0 and learn:
            part = _part(self.window * self.seconds)
            for dst, (nbytes, conns) in self.now.items():
                if dst not in self.alerted:  # a window that raised an alert is not normal
                    self._learn(dst, part, nbytes, conns)
            if busy:
                now = self.now
                idle = [dst for dst in busy if dst not in now]
                for w in range(self.window, min(window, self.window + IDLE_WINDOWS)):
                    part = _part(w * self.seconds)
                    for dst in idle if w == self.window else busy:
                        of_part = self.parts.get((dst, part))
                        if of_part is not None:  # a peer never busy in this part has nothing to compare
                            of_part[0].add_zero()
                            of_part[1].add_zero()
        self.prev = self.now if window == self.window + 1 else {}
        self.window, self.now, self.alerted = window, {}, set()

    def add(self, r: TraceRecord) -> None:
        now = self.now.get(r.destination)
        if now is None:
            self.now[r.destination] = [r.bytes_in + r.bytes_out, r.connections]
        else:
            now[0] += r.bytes_in + r.bytes_out
            now[1] += r.connections

    def check(self, r: TraceRecord) -> tuple[float, str] | None:
        """(score, explanation) when the peer's volume is far outside its own distribution."""
        dst = r.destination
        hist = self.parts.get((dst, _part(r.ts)))
        when = "at this time of day"
        if (hist is None or hist[0].total < MIN_VOLUME_WINDOWS) and self.sustain == 1:
            hist, when = self.hist.get(dst), ""
        if hist is None or hist[0].total < MIN_VOLUME_WINDOWS or dst in self.alerted:
            return None
        nbytes, conns = self.now[dst]
        prev = self.prev.get(dst)
        if prev is not None and self.sustain == 1:
            # A sliding sum over the last `seconds`: the previous window weighs what is left of it.
            weight = 1.0 - (r.ts - self.window * self.seconds) / self.seconds
            nbytes, conns = nbytes + int(prev[0] * weight), conns + int(prev[1] * weight)
        p_bytes, p_conns = hist[0].cached(self.q), hist[1].cached(self.q)
        ratio_bytes = nbytes / max(p_bytes, self.floor_bytes / self.ratio)
        ratio_conns = conns / max(p_conns, self.floor_conns / self.ratio)
        ratio = max(ratio_bytes, ratio_conns)
        if ratio < self.ratio:
            return None
        run = 1
        if self.sustain > 1:
            last, count = self.streak.get(dst, (-2, 0))
            if last == self.window:
                return None  # this window is counted already, and the run is still short
            run = count + 1 if last == self.window - 1 else 1
            self.streak[dst] = (self.window, run)
            if run < self.sustain:
                return None
        self.alerted.add(dst)
        score = min(1.0, 0.5 + 0.25 * math.log2(ratio / self.ratio))
        span = f"{self.seconds // 60} min"
        running = f" ({run} such minutes in a row)" if run > 1 else ""
        baseline = f"its 30-day p{round(self.q * 100)}{' ' + when if when else ''}"
        if ratio_bytes >= ratio_conns:
            return score, (f"{r.source} moved {_size(nbytes)} with {dst} in {span}{running}; {baseline} is "
                           f"{_size(p_bytes)} per {span}")
        return score, (f"{r.source} opened {conns} connections to {dst} in {span}{running}; {baseline} is "
                       f"{p_conns:.0f} per {span}")


class _Identity:
    __slots__ = ("first", "peers", "destinations", "nodes", "node_seen", "hours", "volume",
                 "recent", "deny_window", "deny_now", "deny_hist", "denials",
                 "slow", "until", "quarantined", "incident_until")

    def __init__(self, first: float) -> None:
        self.first = first
        self.peers = _Novelty(MAX_PEERS)  # (destination, port)
        self.destinations: set[str] = set()  # learned destinations, any port
        self.nodes = _Novelty(MAX_NODES)
        self.node_seen: dict[str, float] = {}  # learned node -> last active
        self.hours = _Novelty(24)
        self.volume = tuple(_Scale(*scale) for scale in VOLUME_SCALES)
        self.recent: deque[tuple[float, tuple[str, int], int]] = deque()  # (ts, target, denied)
        self.deny_window = -1
        self.deny_now = 0
        self.deny_hist = _Histogram()
        self.denials: deque[tuple[float, int]] = deque()  # (ts, denied connections), DENY_WINDOW
        self.slow: deque[tuple[float, tuple[str, int]]] = deque()  # denied novel targets
        self.until: dict[str, float] = {}  # detector -> end of its cooldown
        self.quarantined = False
        self.incident_until = 0.0  # records until then belong to an alerted incident: not learned


@dataclass(frozen=True, slots=True)
class Anomaly:
    ts: float
    identity: str
    node: str
    detector: str
    score: float
    reason: str


@dataclass(frozen=True, slots=True)
class Alert:
    ts: float
    identity: str
    node: str
    detector: str
    score: float
    action: str  # alert or quarantine
    reason: str
    target: str = "identity"  # what a quarantine applies to: identity or node
    dry_run: bool = False  # a quarantine the response policy would have made
    rule: str = ""  # the response rule that decided


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.0f} {unit}" if n / scale >= 10 else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _hour_span(hours: Iterable[object]) -> str:
    known = sorted(h for h in hours if isinstance(h, int))
    if not known:
        return "none"
    return ", ".join(f"{h:02d}" for h in known) if len(known) <= 6 else f"{known[0]:02d}–{known[-1]:02d} h"


class Engine:
    def __init__(self, responses: ResponsePolicy | None = None, learn: float = LEARN_DEFAULT) -> None:
        self.responses = responses or ResponsePolicy()
        self.learn = learn
        self._ids: dict[str, _Identity] = {}
        self.dropped = 0  # records of identities past MAX_IDENTITIES
        # Across identities: how many have each (destination, port) in their baseline, and
        # which destinations anyone uses, so a new peer can be told apart as a known service
        # (a new dependency), a new service, or a port of a known service nobody uses.
        self._endpoints: dict[tuple[str, int], int] = {}
        self._destinations: set[str] = set()

    # -- the state the server keeps in step with the registry -------------------------------

    def set_quarantined(self, identities: Iterable[str]) -> None:
        """Quarantine as the registry has it (a release by a person resumes detection)."""
        keep = set(identities)
        for name, ident in self._ids.items():
            ident.quarantined = name in keep

    def identities(self) -> int:
        return len(self._ids)

    # -- one record ------------------------------------------------------------------------

    def observe(self, r: TraceRecord) -> list[Alert]:
        ident = self._ids.get(r.source)
        if ident is None:
            if len(self._ids) >= MAX_IDENTITIES:
                self.dropped += 1
                return []
            ident = self._ids[r.source] = _Identity(r.ts)
        established = r.ts - ident.first >= self.learn
        anomalies = self._detect(ident, r, established)
        alerts = self._respond(ident, r, anomalies, established) if anomalies else []
        if alerts:
            ident.incident_until = r.ts + INCIDENT_SECONDS
        if not ident.quarantined:
            # Ignored anomalies are normal by decision of the response policy: learned too.
            self._learn(ident, r, established, alerted=r.ts < ident.incident_until)
        return alerts

    def _respond(self, ident: _Identity, r: TraceRecord, anomalies: list[Anomaly], established: bool) -> list[Alert]:
        if ident.quarantined:
            return []
        alerts = []
        dry = self.responses.dry_run
        for a in anomalies:
            verdict = self.responses.verdict(a.identity, a.detector, a.score)
            if verdict.action == "ignore":
                continue
            action = verdict.action
            if action == "quarantine" and not established:
                action = "alert"  # nothing quarantines while the identity is still being learned
            if action == "quarantine" and verdict.target == "node" and not a.node:
                action = "alert"  # no node to quarantine: say so rather than guess
            alerts.append(Alert(a.ts, a.identity, a.node, a.detector, round(a.score, 3), action, a.reason,
                                verdict.target if action == "quarantine" else "identity",
                                dry and action == "quarantine", verdict.rule))
        if any(a.action == "quarantine" and not a.dry_run and a.target == "identity" for a in alerts):
            ident.quarantined = True  # its further records are evidence of the same incident
        return alerts

    # -- detectors ---------------------------------------------------------------------------

    def _detect(self, ident: _Identity, r: TraceRecord, established: bool) -> list[Anomaly]:
        out: list[Anomaly] = []
        denied = r.connections if r.decision == "deny" else 0
        target = (r.destination, r.port)
        self._roll_windows(ident, r.ts)
        for scale in ident.volume:
            scale.add(r)
        if denied:
            self._sweep(ident, r, target, denied, out)
            self._deny_burst(ident, r, denied, out)
        if not established:
            return out
        # Novelty needs a baseline to be new against (with --learn 0 there is none at first).
        if ident.peers.is_new(target) and ident.peers.learned and r.ts >= ident.until.get("new_peer", 0.0):
            ident.until["new_peer"] = r.ts + NEW_PEER_COOLDOWN
            self._new_peer(ident, r, target, out)
        if denied and target not in ident.peers:
            self._slow_sweep(ident, r, target, out)
        quiet = r.ts < ident.until.get("volume", 0.0)
        for scale in ident.volume:
            # Checked even while quiet: a window above its threshold is then kept out of the
            # baseline (an excess spread over several windows alerts once, and is learned never).
            found = scale.check(r)
            if found is not None and not quiet:
                # One alert per excess: the next minutes of the same one are the same incident.
                ident.until["volume"] = r.ts + VOLUME_COOLDOWN
                out.append(Anomaly(r.ts, r.source, r.node, "volume", found[0], found[1]))
                quiet = True
        hour = int(r.ts // 3600) % 24
        # Not is_new: an hour stays odd (and alerts again, once per cooldown) until it has been
        # seen on PROMOTE_DAYS days without an alert.
        if ident.hours.learned and hour not in ident.hours and (hour - 1) % 24 not in ident.hours \
                and (hour + 1) % 24 not in ident.hours and r.ts >= ident.until.get("odd_hours", 0.0):
            ident.until["odd_hours"] = r.ts + ODD_HOURS_COOLDOWN
            out.append(Anomaly(r.ts, r.source, r.node, "odd_hours", 0.55,
                               f"{r.source} active at {hour:02d}:00 UTC, an hour it was never active in "
                               f"(its hours: {_hour_span(ident.hours.learned)})"))
        if r.node and ident.nodes.is_new(r.node) and ident.nodes.learned:
            concurrent = [n for n, seen in ident.node_seen.items() if r.ts - seen <= CONCURRENT_SECONDS]
            known = ", ".join(sorted(map(str, ident.nodes.learned))[:5])
            if concurrent:
                out.append(Anomaly(r.ts, r.source, r.node, "new_node", 0.85,
                                   f"{r.source} presented from {r.node}, a node it never ran on, while active on "
                                   f"{', '.join(sorted(concurrent)[:3])} (possible credential replay; "
                                   f"it runs on {known})"))
            else:
                out.append(Anomaly(r.ts, r.source, r.node, "new_node", 0.7,
                                   f"{r.source} presented from {r.node}, a node it never ran on (it runs on {known})"))
        return out

    def _roll_windows(self, ident: _Identity, ts: float) -> None:
        # Windows of an incident (or of a quarantined identity) are not learned.
        learn = not ident.quarantined and ts >= ident.incident_until
        minute, ten = ident.volume
        if int(ts // minute.seconds) != minute.window:
            busy = list(ten.now)
            busy += [dst for dst in ten.prev if dst not in ten.now]
            minute.roll(ts, learn, busy)
        ten.roll(ts, learn)
        dwindow = int(ts // DENY_WINDOW)
        if dwindow != ident.deny_window:
            if ident.deny_window >= 0 and not ident.quarantined and ident.until.get("deny_burst", 0.0) <= ts:
                ident.deny_hist.add(ident.deny_now)
            ident.deny_window, ident.deny_now = dwindow, 0

    def _sweep(self, ident: _Identity, r: TraceRecord, target: tuple[str, int], denied: int,
               out: list[Anomaly]) -> None:
        recent = ident.recent
        recent.append((r.ts, target, denied))
        while recent and (recent[0][0] <= r.ts - SWEEP_WINDOW or len(recent) > MAX_RECENT):
            recent.popleft()
        if r.ts < ident.until.get("sweep", 0.0):
            return
        targets = {t for _, t, _ in recent}
        if len(targets) < SWEEP_MIN_TARGETS:
            return
        ports = len({p for _, p in targets})
        destinations = len({d for d, _ in targets})
        score = min(1.0, 0.7 + 0.05 * (len(targets) - SWEEP_MIN_TARGETS))
        ident.until["sweep"] = r.ts + BURST_COOLDOWN
        out.append(Anomaly(r.ts, r.source, r.node, "sweep", score,
                           f"{r.source} was denied on {len(targets)} distinct destination ports "
                           f"({destinations} destination(s), {ports} port(s)) within {SWEEP_WINDOW // 60} min; "
                           f"it normally uses {len(ident.peers.learned)}"))

    def _deny_burst(self, ident: _Identity, r: TraceRecord, denied: int, out: list[Anomaly]) -> None:
        ident.deny_now += denied
        denials = ident.denials
        denials.append((r.ts, denied))
        while denials and denials[0][0] <= r.ts - DENY_WINDOW:
            denials.popleft()
        if r.ts < ident.until.get("deny_burst", 0.0):
            return
        total = sum(n for _, n in denials)
        p99 = ident.deny_hist.p99
        threshold = max(DENY_BURST_MIN, DENY_BURST_RATIO * p99)
        if total < threshold:
            return
        ident.until["deny_burst"] = r.ts + BURST_COOLDOWN
        score = min(1.0, 0.6 + 0.1 * math.log2(total / threshold))
        out.append(Anomaly(r.ts, r.source, r.node, "deny_burst", score,
                           f"{r.source} had {total} connections denied in {DENY_WINDOW // 60} min (latest to "
                           f"{r.destination} port {r.port}); its p99 is {p99:.0f} per {DENY_WINDOW // 60} min"))

    def _new_peer(self, ident: _Identity, r: TraceRecord, target: tuple[str, int], out: list[Anomaly]) -> None:
        new_destination = r.destination not in ident.destinations
        users = self._endpoints.get(target, 0)
        baseline = f"its baseline: {len(ident.peers.learned)} peer(s)"
        if r.decision == "deny":
            score = 0.8 if new_destination else 0.75
            what = "a destination" if new_destination else f"a port of {r.destination}"
            reason = f"{what} it never used before ({baseline})"
        elif users:
            # A service endpoint many others use: most often a new dependency after a deploy. One
            # that few use (an admin port) is not made ordinary by one other caller.
            score = 0.45 if users >= COMMON_ENDPOINT_USERS else 0.6
            reason = f"an endpoint {users} other identit{'y uses' if users == 1 else 'ies use'} but it never did " \
                     f"({baseline})"
        elif r.destination not in self._destinations:
            score, reason = 0.45, f"a service no identity used before, perhaps a new one ({baseline})"
        else:
            score = 0.7
            reason = f"a port of {r.destination} that no identity uses ({baseline})"
        out.append(Anomaly(r.ts, r.source, r.node, "new_peer", score,
                           f"{r.source} connected to {r.destination} port {r.port} ({r.decision}), {reason}"))

    def _slow_sweep(self, ident: _Identity, r: TraceRecord, target: tuple[str, int], out: list[Anomaly]) -> None:
        slow = ident.slow
        if not any(t == target for _, t in slow):
            slow.append((r.ts, target))
        while slow and slow[0][0] <= r.ts - SLOW_WINDOW:
            slow.popleft()
        if len(slow) < SLOW_MIN_TARGETS or r.ts < ident.until.get("slow_sweep", 0.0):
            return
        if r.ts - slow[0][0] < SWEEP_WINDOW:
            return  # that fast, it is a sweep (its own detector); this one is for the slow kind
        ident.until["slow_sweep"] = r.ts + SLOW_WINDOW
        hours = (r.ts - slow[0][0]) / 3600
        out.append(Anomaly(r.ts, r.source, r.node, "slow_sweep", 0.7,
                           f"{r.source} was denied on {len(slow)} destination ports it never used, spread over "
                           f"{hours:.1f} h (a slow probe)"))

    # -- learning ---------------------------------------------------------------------------

    def _endpoint_learned(self, target: tuple[str, int]) -> None:
        if len(self._endpoints) < MAX_IDENTITIES * 4 or target in self._endpoints:
            self._endpoints[target] = self._endpoints.get(target, 0) + 1
            self._destinations.add(target[0])

    def _learn(self, ident: _Identity, r: TraceRecord, established: bool, alerted: bool) -> None:
        target = (r.destination, r.port)
        hour = int(r.ts // 3600) % 24
        if not established:
            if ident.peers.learn(target):
                self._endpoint_learned(target)
            ident.hours.learn(hour)
            if r.node:
                ident.nodes.learn(r.node)
        else:
            day = int(r.ts // DAY)
            if ident.peers.saw(target, day, alerted):
                self._endpoint_learned(target)
            ident.hours.saw(hour, day, alerted)
            if r.node:
                ident.nodes.saw(r.node, day, alerted)
        if not alerted:
            if target in ident.peers and len(ident.destinations) < MAX_PEERS:
                ident.destinations.add(r.destination)
            if r.node and r.node in ident.nodes:
                ident.node_seen[r.node] = r.ts


def alert_to_dict(alert: Alert) -> dict[str, object]:
    """An alert as `detect replay --json` prints it and webhooks receive it (ts ISO 8601 UTC)."""
    out: dict[str, object] = {"ts": format_utc(alert.ts), "identity": alert.identity, "node": alert.node,
                              "detector": alert.detector, "score": alert.score, "action": alert.action,
                              "reason": alert.reason}
    if alert.action == "quarantine" and alert.target == "node":
        out["target"] = "node"
    if alert.dry_run:
        out["dry_run"] = True  # what the response policy would have done; nothing was quarantined
    return out


# -- the engine's state, to survive a restart -------------------------------------------------

STATE_VERSION = 1


class StateError(ValueError):
    """A saved state that is not one this version wrote; the engine starts learning again."""


def _hist_state(h: _Histogram) -> list[list[int]]:
    return [[b, c] for b, c in h.counts.items()]


def _hist_from(data: object) -> _Histogram:
    h = _Histogram()
    for b, c in _pairs(data):
        if not (isinstance(b, int) and isinstance(c, int) and 0 <= b < 1024 and 0 < c):
            raise StateError("a histogram bucket is out of range")
        h.counts[b] = c
    h.total = sum(h.counts.values())
    return h


def _pairs(data: object) -> list[list[object]]:
    if not isinstance(data, list) or not all(isinstance(p, list) and len(p) == 2 for p in data):
        raise StateError("expected a list of pairs")
    return data


def _novelty_state(n: _Novelty) -> dict[str, object]:
    return {"learned": list(n.learned), "pending": [[k, sorted(v)] for k, v in n.pending.items()]}


def _item(value: object) -> object:
    # Peers are (destination, port) pairs, JSON lists once saved; nodes are text, hours numbers.
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
        return (value[0], value[1])
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return value
    raise StateError("a learned item is neither a peer, a node nor an hour")


def _novelty_from(data: object, limit: int) -> _Novelty:
    if not isinstance(data, dict):
        raise StateError("expected learned and pending items")
    n = _Novelty(limit)
    learned, pending = data.get("learned"), data.get("pending")
    if not isinstance(learned, list) or len(learned) > limit:
        raise StateError("too many learned items")
    for item in learned:
        n.learned[_item(item)] = None
    for item, days in _pairs(pending):
        if not isinstance(days, list) or not all(isinstance(d, int) for d in days):
            raise StateError("pending days are not day numbers")
        n.pending[_item(item)] = set(days)
    if len(n.learned) + len(n.pending) > limit:
        raise StateError("too many items")
    return n


def engine_state(engine: Engine) -> dict[str, object]:
    """What the engine learned, as JSON-ready data (windows in progress are not kept: a
    restart starts new ones)."""
    return {"version": STATE_VERSION, "identities": {
        name: {"first": i.first, "peers": _novelty_state(i.peers), "destinations": sorted(i.destinations),
               "nodes": _novelty_state(i.nodes), "hours": _novelty_state(i.hours),
               "volume": [[[dst, _hist_state(b), _hist_state(c)] for dst, (b, c) in scale.hist.items()]
                          for scale in i.volume],
               "volume_parts": [[[dst, part, _hist_state(b), _hist_state(c)]
                                 for (dst, part), (b, c) in scale.parts.items()] for scale in i.volume],
               "denials": _hist_state(i.deny_hist)}
        for name, i in engine._ids.items()}}


def restore_engine(engine: Engine, data: object) -> None:
    """Load what engine_state saved into a fresh engine; StateError (and nothing loaded) when
    any of it is not what this version writes."""
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise StateError(f"not a version {STATE_VERSION} detection state")
    identities = data.get("identities")
    if not isinstance(identities, dict) or len(identities) > MAX_IDENTITIES:
        raise StateError("the identities are missing or too many")
    loaded: dict[str, _Identity] = {}
    for name, saved in identities.items():
        if not isinstance(saved, dict) or not isinstance(saved.get("first"), (int, float)):
            raise StateError(f"identity {name[:80]!r} is malformed")
        ident = _Identity(float(saved["first"]))
        ident.peers = _novelty_from(saved.get("peers"), MAX_PEERS)
        ident.nodes = _novelty_from(saved.get("nodes"), MAX_NODES)
        ident.hours = _novelty_from(saved.get("hours"), 24)
        destinations = saved.get("destinations")
        if not isinstance(destinations, list) or len(destinations) > MAX_PEERS \
                or not all(isinstance(d, str) for d in destinations):
            raise StateError(f"identity {name[:80]!r}: destinations are malformed")
        ident.destinations = set(destinations)
        volume = saved.get("volume")
        if not isinstance(volume, list) or len(volume) != len(ident.volume):
            raise StateError(f"identity {name[:80]!r}: volume baselines are malformed")
        for scale, peers in zip(ident.volume, volume, strict=True):
            if not isinstance(peers, list) or len(peers) > MAX_PEERS:
                raise StateError(f"identity {name[:80]!r}: volume baselines are malformed")
            for entry in peers:
                if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str):
                    raise StateError(f"identity {name[:80]!r}: a volume baseline is malformed")
                scale.hist[entry[0]] = (_hist_from(entry[1]), _hist_from(entry[2]))
        parts = saved.get("volume_parts")
        if not isinstance(parts, list) or len(parts) != len(ident.volume):
            raise StateError(f"identity {name[:80]!r}: volume baselines are malformed")
        for scale, entries in zip(ident.volume, parts, strict=True):
            if not isinstance(entries, list) or len(entries) > MAX_PEERS * PARTS:
                raise StateError(f"identity {name[:80]!r}: volume baselines are malformed")
            for entry in entries:
                if not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[0], str) \
                        or not isinstance(entry[1], int) or not 0 <= entry[1] < PARTS:
                    raise StateError(f"identity {name[:80]!r}: a volume baseline is malformed")
                scale.parts[(entry[0], entry[1])] = (_hist_from(entry[2]), _hist_from(entry[3]))
        ident.deny_hist = _hist_from(saved.get("denials"))
        loaded[name] = ident
    engine._ids = loaded
    engine._endpoints, engine._destinations = {}, set()
    for ident in loaded.values():
        for peer in ident.peers.learned:
            if isinstance(peer, tuple):
                engine._endpoint_learned(peer)
