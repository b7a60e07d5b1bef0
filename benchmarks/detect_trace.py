"""A synthetic per-minute flow trace with labelled attacks: what benchmarks/detection.py replays.

    python -m benchmarks.detect_trace --seed 1 --out trace.jsonl          # 40 identities x 28 days
    python -m benchmarks.detect_trace --seed 1 --identities 12 --days 14 --json

The trace is in the format of trustmesh/detect/trace.py (one record per minute and flow key,
only minutes with traffic), deterministic for a seed. What it models:

* roles: frontends and services (always on: a daily rhythm with busy business hours and quiet,
  non-zero nights; weekends at 45%), business-hours tools (08:00-18:00 UTC on weekdays only),
  batch jobs (a nightly run of 40-80 min at a fixed time, some also a short midday run; high
  volume to their peers, nothing in between), an operator (`ns/ops/oncall`: business hours,
  plus a few short night-time sessions after learning), a new service that appears mid-trace
  (and one caller that starts using it), and a legacy unverified caller
  (`unverified:<address>`, node "") polling through a permissive listener;
* per identity: 1-2 fixed nodes (the node the source runs on), 2-6 fixed peers on fixed ports
  (services on 8443/50051/9000, data stores on their own ports, telemetry with a flat rate);
  per peer and hour a Poisson rate times a lognormal burst factor (sigma 0.45), a record only
  for minutes with at least one connection, bytes per connection lognormal; one peer
  destination in audit mode (decision "audit"), one deprecated endpoint steadily denied;
* deploys on about one weekday in four (1-4 silent minutes; after learning a few add one
  new allowed peer), a misconfigured client denied a few times a minute for 8-25 minutes
  after a deploy (twice), a 2-hour traffic surge for the frontends (once).

Attacks are injected on top of the attacking identity's own traffic, from day 10 on (or the
day after learning in a short trace), at most one per identity and day, at an hour the
identity is normally active (except odd_hours):

  new_peer           a peer's admin port (9901, 15000, 8081) it never used, allowed or denied
  sweep              12-30 distinct destination ports in 2-4 minutes, mostly denied
  volume             about 20x its mean bytes per active 10 minutes with its biggest peer, over 10 min
  odd_hours          a business-hours-only identity busy on its usual peers at 03:00 on a weekday
  credential_replay  its usual peers from a node it never ran on, while it runs on its own
  deny_burst         30-320 denied connections to one data store it never used, in 2-4 minutes
  slow_and_low       4-6 denied probes to distinct new targets, 35-85 minutes apart

A benign identity-day is an (identity, UTC day) with at least one record, on or after the end
of learning (`learn_days`), and no attack of that identity between its start and its end + 1 h.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from operator import attrgetter
from pathlib import Path
from random import Random

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trustmesh.clock import format_utc  # noqa: E402
from trustmesh.detect.trace import TraceRecord, record_to_line  # noqa: E402

TD = "example.org"
DAY = 86400
MINUTES_PER_DAY = 1440
DEFAULT_START = 1793577600.0  # 2026-11-02T00:00:00Z, a Monday
LEARN_DAYS = 7
ATTACK_AFTER_DAYS = 10
ATTACKS_PER_KIND = 3
GRACE = 3600.0  # alerts of an attack count until its end + GRACE; those identity-days are not benign
KINDS = ("new_peer", "sweep", "volume", "odd_hours", "credential_replay", "deny_burst", "slow_and_low")
BURST_SIGMA = 0.45  # the per-(peer, hour) lognormal burst factor
WEEKEND = 0.45

FRONTEND, SERVICE, BUSINESS, BATCH, ONCALL, NEW, LEGACY = (
    "frontend", "service", "business", "batch", "oncall", "new", "legacy")
ALWAYS_ON = (FRONTEND, SERVICE, NEW)
# Always-on services over the UTC day (peak 1.0).
RHYTHM = (0.12, 0.1, 0.08, 0.08, 0.09, 0.13, 0.22, 0.42, 0.72, 0.93, 1.0, 1.0,
          0.95, 0.98, 1.0, 0.96, 0.9, 0.8, 0.66, 0.52, 0.42, 0.32, 0.23, 0.16)

CATALOGUE: tuple[tuple[str, str], ...] = (
    ("web", FRONTEND), ("payments", SERVICE), ("ns/internal/backoffice", BUSINESS), ("ledger", SERVICE),
    ("orders", SERVICE), ("ns/internal/reports", BUSINESS), ("ns/batch/settlement", BATCH),
    ("ns/internal/support-tool", BUSINESS), ("api-gateway", FRONTEND), ("inventory", SERVICE), ("catalog", SERVICE),
    ("users", SERVICE), ("ns/batch/reconcile", BATCH), ("search", SERVICE),
    ("notifications", SERVICE), ("shipping", SERVICE), ("pricing", SERVICE), ("cart", SERVICE),
    ("checkout", SERVICE), ("ns/batch/etl-nightly", BATCH), ("fraud", SERVICE),
    ("ns/internal/bi-dashboard", BUSINESS), ("recommendations", SERVICE), ("auth", SERVICE), ("billing", SERVICE),
    ("ns/ci/deployer", BUSINESS), ("invoices", SERVICE), ("ns/batch/backup", BATCH), ("reviews", SERVICE),
    ("email", SERVICE), ("mobile-bff", FRONTEND), ("ns/internal/admin-console", BUSINESS), ("risk", SERVICE),
    ("media", SERVICE), ("geo", SERVICE), ("ns/batch/invoice-run", BATCH), ("audit-log", SERVICE),
    ("tax", SERVICE), ("ns/internal/finance-portal", BUSINESS), ("currency", SERVICE),
    ("ns/batch/search-indexer", BATCH), ("subscriptions", SERVICE), ("ns/internal/crm", BUSINESS),
)
NEW_SERVICE = "ns/payments/payouts-v2"
ONCALL_NAME = "ns/ops/oncall"
LEGACY_SOURCE = "unverified:10.20.3.41"
# Destinations that never call anyone: data stores and infrastructure, on their own ports.
DATASTORES: tuple[tuple[str, int], ...] = (
    ("ns/data/postgres-payments", 5432), ("ns/data/postgres-orders", 5432), ("ns/data/redis", 6379),
    ("ns/data/kafka", 9092), ("ns/data/elasticsearch", 9200), ("ns/data/object-store", 443),
    ("ns/data/postgres-users", 5432), ("ns/data/clickhouse", 9440))
TELEMETRY = ("ns/infra/otel-collector", 4317)
VAULT = ("ns/infra/vault", 8200)
AUDIT_MODE_DESTINATION = "ns/data/elasticsearch"  # its allowlist is still in audit mode
DEPRECATED = ("legacy-billing", 8443)  # an endpoint one service still tries, always denied
SERVICE_PORTS = (8443, 8443, 8443, 50051, 9000)
ADMIN_PORTS = (9901, 15000, 8081)
PROBE_PORTS = (22, 80, 443, 2379, 3306, 5432, 6379, 8080, 8443, 9000, 9090, 9200, 9901, 11211, 27017)


Cell = tuple[int, str, str, int, str, int, int, int]  # minute, node, destination, port, decision, counts


def spiffe(path: str) -> str:
    return f"spiffe://{TD}/{path}"


@dataclass(frozen=True)
class Attack:
    name: str  # kind-N
    kind: str
    identity: str
    start: float  # ts of its first record (the end of its first minute)
    end: float  # ts of its last record
    slow_and_low: bool
    description: str = ""
    destination: str = ""  # the one destination it targets (new_peer, volume, deny_burst), else ""
    node: str = ""  # the node its records come from

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "identity": self.identity, "start": format_utc(self.start),
                "end": format_utc(self.end), "slow_and_low": self.slow_and_low, "description": self.description,
                "destination": self.destination, "node": self.node}


@dataclass(frozen=True)
class BenignEvent:
    """Something unusual but legitimate, labelled so a false alert can be explained."""
    kind: str  # deploy_new_peer, new_service, oncall_night, misconfigured_client, traffic_surge
    identity: str
    start: float
    end: float
    description: str

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "identity": self.identity, "start": format_utc(self.start),
                "end": format_utc(self.end), "description": self.description}


@dataclass
class Trace:
    records: list[TraceRecord]
    attacks: list[Attack]
    benign_identity_days: int
    benign: frozenset[tuple[str, int]]  # (identity, UTC day number = int(ts // 86400))
    events: list[BenignEvent]
    identities: list[str]
    start: float
    days: int
    learn_days: int
    seed: int

    @property
    def end(self) -> float:
        return self.start + self.days * DAY

    def write_jsonl(self, path: str | Path) -> int:
        """The records, one JSON line each (record_to_line); returns the bytes written."""
        size = 0
        with open(path, "w", encoding="utf-8") as out:
            for record in self.records:
                line = record_to_line(record)
                size += len(line)
                out.write(line)
        return size

    def summary(self) -> dict[str, object]:
        return {"seed": self.seed, "records": len(self.records), "identities": len(self.identities),
                "days": self.days, "start": format_utc(self.start), "end": format_utc(self.end),
                "learn_days": self.learn_days, "benign_identity_days": self.benign_identity_days,
                "attacks": [a.to_dict() for a in self.attacks], "benign_events": [e.to_dict() for e in self.events]}


def day_of(ts: float) -> int:
    """The UTC day number of a timestamp, as Trace.benign holds it."""
    return int(ts // DAY)


# --- the model ------------------------------------------------------------------------------


@dataclass
class _Peer:
    destination: str  # a SPIFFE ID
    port: int
    lam: float  # connections per minute at the peak of its identity's rhythm
    bytes_in: float  # per connection, source to destination
    bytes_out: float
    decision: str = "allow"
    flat: bool = False  # the same rate day and night (telemetry, secrets, polling)
    first_minute: int = 0  # added later (a deploy, a new service)


@dataclass
class _Profile:
    source: str
    role: str
    nodes: list[str]
    peers: list[_Peer] = field(default_factory=list)
    open_hour: int = 8  # business hours
    close_hour: int = 18
    windows: list[tuple[int, int]] = field(default_factory=list)  # batch runs: (minute of day, minutes)
    first_minute: int = 0
    silent: set[int] = field(default_factory=set)  # minutes without traffic (deploys)

    def rhythm(self, weekday: int, hour: int) -> float:
        if self.role in ALWAYS_ON:
            return RHYTHM[hour] * (WEEKEND if weekday >= 5 else 1.0)
        if self.role in (BUSINESS, ONCALL):
            if weekday >= 5 or not self.open_hour <= hour <= self.close_hour:
                return 0.0
            if hour == self.open_hour:
                return 0.4
            if hour == self.close_hour:
                return 0.3
            return 0.7 if hour == 12 else 1.0
        if self.role == LEGACY:
            return 1.0
        return 0.0  # batch: only in its windows

    def active_hours(self, weekday: int) -> list[int]:
        """Hours it is normally busy in on such a day (where an attack can hide)."""
        if self.role == BATCH:
            return sorted({(start + m) // 60 for start, length in self.windows for m in range(0, length, 10)})
        return [h for h in range(24) if self.rhythm(weekday, h) >= 0.3]

    def usual_peers(self) -> list[_Peer]:
        return [p for p in self.peers if p.decision != "deny" and p.first_minute == 0]


class _Flows:
    """One identity's per-minute counters, merged by flow key as an agent's rollup would."""

    __slots__ = ("cells",)

    def __init__(self) -> None:
        self.cells: dict[tuple[int, str, str, int, str], list[int]] = {}

    def add(self, minute: int, node: str, destination: str, port: int, decision: str, connections: int,
            bytes_in: int, bytes_out: int) -> None:
        key = (minute, node, destination, port, decision)
        cell = self.cells.get(key)
        if cell is None:
            self.cells[key] = [connections, bytes_in, bytes_out]
        else:
            cell[0] += connections
            cell[1] += bytes_in
            cell[2] += bytes_out


def _poisson(rng: Random, mu: float) -> int:
    if mu <= 0:
        return 0
    if mu < 15:
        limit, k, p = math.exp(-mu), 0, rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        return k
    return max(0, int(rng.gauss(mu, math.sqrt(mu)) + 0.5))


def _lognormal(rng: Random, median: float, sigma: float) -> float:
    return median * math.exp(rng.gauss(0.0, sigma))


class _World:
    def __init__(self, seed: int, identities: int, days: int, start: float, learn_days: int) -> None:
        self.seed, self.days, self.start, self.learn_days = seed, days, start, learn_days
        self.rng = Random(f"trustmesh-trace:{seed}")
        self.weekday0 = datetime.fromtimestamp(start, timezone.utc).weekday()
        self.minutes = days * MINUTES_PER_DAY - 1  # minute m ends at start + 60 (m + 1): all inside the window
        self.profiles: list[_Profile] = []
        self.service_port: dict[str, int] = {}  # destination ID -> its service port
        self.events: list[BenignEvent] = []
        self.surge: set[int] = set()  # hours (from start) of the frontends' surge
        # Cells added on top of an identity's steady traffic (on-call nights, misconfigurations).
        self.extra: dict[str, list[Cell]] = {}
        # (destination, port)s an identity's attacks and misconfigurations used: each attack's are
        # new to it, so one scenario does not spoil the next on the same identity.
        self.touched: dict[str, set[tuple[str, int]]] = {}
        self._roster(identities)

    def weekday(self, day: int) -> int:
        return (self.weekday0 + day) % 7

    def ts(self, minute: int) -> float:
        return self.start + 60.0 * (minute + 1)

    # -- who talks to whom --------------------------------------------------------------------

    def _roster(self, count: int) -> None:
        rng = self.rng
        specials: list[tuple[str, str]] = []
        if count >= 5:
            specials.append((NEW_SERVICE, NEW))
        if count >= 6:
            specials.append((ONCALL_NAME, ONCALL))
        if count >= 10:
            specials.append((LEGACY_SOURCE, LEGACY))
        regular: list[tuple[str, str]] = []
        for i in range(max(0, count - len(specials))):
            name, role = CATALOGUE[i % len(CATALOGUE)]
            regular.append((name if i < len(CATALOGUE) else f"{name}-{i // len(CATALOGUE) + 1}", role))
        node_count = max(3, (count + 2) // 3)
        nodes = [f"node-{i}" for i in range(1, node_count + 1)]
        self.nodes = nodes
        services = [spiffe(n) for n, r in regular + specials if r in (SERVICE, NEW)]
        for s in services:
            self.service_port[s] = rng.choice(SERVICE_PORTS)
        stores = [(spiffe(d), p) for d, p in DATASTORES]
        for name, role in regular + specials:
            source = name if role == LEGACY else spiffe(name)
            mine = rng.sample(nodes, 2 if role in ALWAYS_ON and rng.random() < 0.4 else 1)
            profile = _Profile(source, role, [] if role == LEGACY else mine)
            others = [s for s in services if s != source and s != spiffe(NEW_SERVICE)]
            self._peers(profile, others, stores)
            self.profiles.append(profile)
        self._deprecated_endpoint()

    def _service_peer(self, rng: Random, destination: str, lam: tuple[float, float]) -> _Peer:
        return _Peer(destination, self.service_port[destination], rng.uniform(*lam),
                     _lognormal(rng, 1500, 0.8), _lognormal(rng, 8000, 1.0))

    def _store_peer(self, rng: Random, store: tuple[str, int], lam: tuple[float, float]) -> _Peer:
        decision = "audit" if store[0] == spiffe(AUDIT_MODE_DESTINATION) else "allow"
        return _Peer(store[0], store[1], rng.uniform(*lam), _lognormal(rng, 600, 0.6),
                     _lognormal(rng, 20000, 1.2), decision)

    def _peers(self, p: _Profile, services: list[str], stores: list[tuple[str, int]]) -> None:
        rng = Random(f"{self.rng.random()}")
        total = rng.randint(2, 6)
        if p.role == FRONTEND:
            total = max(total, 4)
            for s in rng.sample(services, min(total, len(services))):
                p.peers.append(self._service_peer(rng, s, (0.8, 5.0)))
            for store in rng.sample(stores, max(0, total - len(p.peers))):
                p.peers.append(self._store_peer(rng, store, (0.3, 2.0)))
        elif p.role in (SERVICE, NEW):
            n_stores = rng.randint(1, 2)
            for store in rng.sample(stores, n_stores):
                p.peers.append(self._store_peer(rng, store, (0.05, 1.5)))
            for s in rng.sample(services, min(len(services), max(0, total - n_stores - 1))):
                p.peers.append(self._service_peer(rng, s, (0.03, 1.0)))
            if rng.random() < 0.6:  # telemetry export: flat, day and night
                p.peers.append(_Peer(spiffe(TELEMETRY[0]), TELEMETRY[1], rng.uniform(0.05, 0.2),
                                     _lognormal(rng, 30000, 0.4), 200, flat=True))
            elif len(p.peers) < 2:
                p.peers.append(_Peer(spiffe(VAULT[0]), VAULT[1], rng.uniform(0.01, 0.05), 900, 2500, flat=True))
        elif p.role in (BUSINESS, ONCALL):
            p.open_hour, p.close_hour = rng.choice((7, 8, 8)), rng.choice((17, 18, 18, 19))
            total = min(total, 4)
            if p.role == ONCALL:
                for s in rng.sample(services, min(3, len(services))):
                    p.peers.append(_Peer(s, ADMIN_PORTS[0], rng.uniform(0.03, 0.15), 400, 30000))
            else:
                for s in rng.sample(services, min(len(services), max(1, total - 1))):
                    p.peers.append(self._service_peer(rng, s, (0.1, 1.2)))
            if len(p.peers) < 2 or p.role == BUSINESS:
                p.peers.append(self._store_peer(rng, stores[-1] if p.role == BUSINESS else stores[2], (0.05, 0.6)))
        elif p.role == BATCH:
            start_minute = rng.choice((0, 1, 1, 2, 3)) * 60 + rng.choice((0, 15, 30))
            p.windows.append((start_minute, rng.randint(40, 80)))
            if rng.random() < 0.5:
                p.windows.append((rng.choice((12, 13)) * 60, rng.randint(15, 30)))
            for store in rng.sample(stores, rng.randint(2, 3)):
                peer = self._store_peer(rng, store, (8.0, 30.0))
                peer.bytes_out *= 5
                p.peers.append(peer)
            if services and rng.random() < 0.7:
                p.peers.append(self._service_peer(rng, rng.choice(services), (3.0, 12.0)))
        elif p.role == LEGACY:
            for s in rng.sample(services, min(2, len(services))):
                p.peers.append(_Peer(s, self.service_port[s], rng.uniform(0.1, 0.3), 300, 1200, "unverified",
                                     flat=True))

    def _deprecated_endpoint(self) -> None:
        services = [p for p in self.profiles if p.role == SERVICE]
        if len(services) >= 3:  # one service still calls an endpoint it lost access to, all day
            services[2].peers.append(_Peer(spiffe(DEPRECATED[0]), DEPRECATED[1], 0.03, 0, 0, "deny", flat=True))

    # -- benign events --------------------------------------------------------------------------

    def schedule_benign(self, busy: set[tuple[str, int]]) -> None:
        """Deploys, the new service, on-call nights, a misconfigured client, a surge; none on an
        (identity, day) with an attack."""
        rng = Random(f"trustmesh-trace:{self.seed}:benign")
        learn = self.learn_days
        services = list(self.service_port)
        added = 0
        for p in self.profiles:
            if p.role not in (FRONTEND, SERVICE, BUSINESS, NEW):
                continue
            for day in range(self.days):
                if self.weekday(day) >= 5 or rng.random() >= 0.22:
                    continue
                minute = day * MINUTES_PER_DAY + rng.randint(10 * 60, 16 * 60)
                p.silent.update(range(minute, minute + rng.randint(1, 4)))
                if day < learn or (p.source, day) in busy or added >= max(2, len(self.profiles) // 8):
                    continue
                if rng.random() < 0.15 and p.role != NEW:
                    used = {q.destination for q in p.peers}
                    choices = [s for s in services if s not in used and s != p.source and s != spiffe(NEW_SERVICE)]
                    if not choices:
                        continue
                    destination = rng.choice(choices)
                    peer = self._service_peer(rng, destination, (0.1, 1.0))
                    peer.first_minute = minute + 5
                    p.peers.append(peer)
                    added += 1
                    self.events.append(BenignEvent("deploy_new_peer", p.source, self.ts(minute + 5),
                                                   self.ts(minute + 5) + 3 * DAY,
                                                   f"a deploy adds {destination} port {peer.port} (allowed)"))
        self._new_service(rng, busy)
        self._oncall_nights(rng)
        self._misconfigured(rng, busy)
        self._surge(rng)

    def _new_service(self, rng: Random, busy: set[tuple[str, int]]) -> None:
        new = next((p for p in self.profiles if p.role == NEW), None)
        if new is None:
            return
        day = max(1, round(self.days * 0.45))
        while day < self.days - 1 and self.weekday(day) >= 5:
            day += 1
        new.first_minute = day * MINUTES_PER_DAY + 10 * 60 + rng.randint(0, 59)
        for peer in new.peers:
            peer.first_minute = new.first_minute
        self.events.append(BenignEvent("new_service", new.source, self.ts(new.first_minute),
                                       self.ts(new.first_minute) + self.learn_days * DAY,
                                       f"{new.source} goes live (first seen; its own learning starts)"))
        callers = [p for p in self.profiles if p.role in (SERVICE, FRONTEND) and (p.source, day) not in busy]
        if callers:
            caller = rng.choice(callers)
            peer = self._service_peer(rng, new.source, (0.2, 1.0))
            peer.first_minute = new.first_minute + rng.randint(30, 120)
            caller.peers.append(peer)
            self.events.append(BenignEvent("deploy_new_peer", caller.source, self.ts(peer.first_minute),
                                           self.ts(peer.first_minute) + 3 * DAY,
                                           f"a deploy starts calling the new service {new.source} port {peer.port}"))

    def _oncall_nights(self, rng: Random) -> None:
        oncall = next((p for p in self.profiles if p.role == ONCALL), None)
        if oncall is None or self.days <= self.learn_days:
            return
        nights = sorted(rng.sample(range(self.learn_days, self.days), min(3, self.days - self.learn_days)))
        for day in nights:
            minute = day * MINUTES_PER_DAY + rng.randint(60, 4 * 60 + 30)
            length = rng.randint(10, 40)
            for m in range(minute, minute + length):
                for peer in oncall.peers[:2]:
                    if rng.random() < 0.35:
                        connections = rng.randint(1, 4)
                        self.extra.setdefault(oncall.source, []).append(
                            (m, oncall.nodes[0], peer.destination, peer.port, "allow", connections,
                             connections * 400, connections * int(_lognormal(rng, 30000, 0.6))))
            self.events.append(BenignEvent("oncall_night", oncall.source, self.ts(minute), self.ts(minute + length),
                                           "an operator paged at night uses its usual admin endpoints"))

    def _misconfigured(self, rng: Random, busy: set[tuple[str, int]]) -> None:
        services = [p for p in self.profiles if p.role == SERVICE]
        if not services or self.days <= self.learn_days:
            return
        client = services[min(1, len(services) - 1)]
        days = [d for d in range(self.learn_days, self.days) if self.weekday(d) < 5 and (client.source, d) not in busy]
        for day in sorted(rng.sample(days, min(2, len(days)))):
            minute = day * MINUTES_PER_DAY + rng.randint(10 * 60, 16 * 60)
            usual = rng.choice(client.usual_peers())
            port = 8080 if usual.port != 8080 else 8081  # a typo in its config: the wrong port
            length = rng.randint(8, 25)
            self.touched.setdefault(client.source, set()).add((usual.destination, port))
            for m in range(minute, minute + length):
                if rng.random() < 0.8:
                    self.extra.setdefault(client.source, []).append(
                        (m, client.nodes[0], usual.destination, port, "deny", rng.randint(1, 3), 0, 0))
            self.events.append(BenignEvent("misconfigured_client", client.source, self.ts(minute),
                                           self.ts(minute + length),
                                           f"after a deploy it calls {usual.destination} on port {port} "
                                           f"(denied) until the config is fixed"))

    def _surge(self, rng: Random) -> None:
        if self.days <= self.learn_days:
            return
        day = rng.randrange(self.learn_days, self.days)
        hour = rng.randint(11, 18)
        self.surge = {day * 24 + hour, day * 24 + hour + 1}
        for p in self.profiles:
            if p.role == FRONTEND:
                self.events.append(BenignEvent("traffic_surge", p.source, self.ts(day * 1440 + hour * 60 - 1),
                                               self.ts(day * 1440 + hour * 60 + 119),
                                               "a sale: 2.5x the usual traffic for 2 hours"))

    # -- benign traffic ---------------------------------------------------------------------------

    def benign(self, p: _Profile, flows: _Flows) -> None:
        rng = Random(f"trustmesh-trace:{self.seed}:{p.source}")
        nodes = p.nodes or [""]
        for peer in p.peers:
            if p.role == BATCH:
                self._batch(rng, p, peer, nodes, flows)
            else:
                self._steady(rng, p, peer, nodes, flows)
        for cell in self.extra.get(p.source, ()):
            flows.add(*cell)

    def _steady(self, rng: Random, p: _Profile, peer: _Peer, nodes: list[str], flows: _Flows) -> None:
        first = max(peer.first_minute, p.first_minute)
        silent, last = p.silent, self.minutes
        add, gauss, rand, log, exp = flows.add, rng.gauss, rng.random, math.log, math.exp
        two = len(nodes) > 1
        denied = peer.decision == "deny"
        for day in range(self.days):
            weekday = self.weekday(day)
            for hour in range(24):
                base = day * MINUTES_PER_DAY + hour * 60
                if base + 60 <= first or base >= last:
                    continue
                mult = 1.0 if peer.flat else p.rhythm(weekday, hour)
                if mult <= 0.0:
                    continue
                if day * 24 + hour in self.surge and p.role == FRONTEND:
                    mult *= 2.5
                lam = peer.lam * mult * exp(gauss(0.0, BURST_SIGMA))
                p_active = 1.0 - exp(-lam)
                if p_active <= 1e-9:
                    continue
                extra_mu = lam / p_active - 1.0
                log_q = log(1.0 - p_active) if p_active < 0.999 else 0.0
                m = -1
                while True:
                    if log_q:
                        m += 1 + int(log(1.0 - rand()) / log_q)
                    else:
                        m += 1
                    if m >= 60:
                        break
                    minute = base + m
                    if minute < first or minute >= last or minute in silent:
                        continue
                    connections = 1 + _poisson(rng, extra_mu)
                    node = nodes[rand() < 0.5] if two else nodes[0]
                    if denied:
                        add(minute, node, peer.destination, peer.port, peer.decision, connections, 0, 0)
                    else:
                        add(minute, node, peer.destination, peer.port, peer.decision, connections,
                            int(connections * peer.bytes_in * exp(gauss(0.0, 0.5))),
                            int(connections * peer.bytes_out * exp(gauss(0.0, 0.7))))

    def _batch(self, rng: Random, p: _Profile, peer: _Peer, nodes: list[str], flows: _Flows) -> None:
        for day in range(self.days):
            for start, length in p.windows:
                load = math.exp(rng.gauss(0.0, 0.25))  # some nights have more to do
                length_today = max(5, int(length * load))
                for m in range(length_today):
                    minute = day * MINUTES_PER_DAY + start + m
                    if minute >= self.minutes:
                        return
                    if rng.random() > 0.9:
                        continue
                    connections = 1 + _poisson(rng, peer.lam * load)
                    flows.add(minute, nodes[0], peer.destination, peer.port, peer.decision, connections,
                              int(connections * peer.bytes_in * math.exp(rng.gauss(0.0, 0.4))),
                              int(connections * peer.bytes_out * math.exp(rng.gauss(0.0, 0.5))))

    # -- attacks ----------------------------------------------------------------------------------

    def schedule_attacks(self, per_kind: int) -> list[tuple[str, int, _Profile, int]]:
        """(kind, instance, identity, first minute): at most one per (identity, day)."""
        rng = Random(f"trustmesh-trace:{self.seed}:attacks")
        first_day = ATTACK_AFTER_DAYS if self.days >= ATTACK_AFTER_DAYS + 4 else self.learn_days + 1
        days = list(range(first_day, self.days))
        targets = [p for p in self.profiles if p.role in (FRONTEND, SERVICE, BUSINESS, BATCH)]
        taken: set[tuple[str, int]] = set()
        count: dict[str, int] = {}
        plans: list[tuple[str, int, _Profile, int]] = []
        def free(kind: str) -> list[tuple[_Profile, int]]:
            return [(p, d) for p in targets for d in days if (p.source, d) not in taken and self._hours(kind, p, d)]

        for instance in range(per_kind):
            for kind in sorted(KINDS, key=lambda k: len(free(k))):  # the kind with the fewest places first
                slots = free(kind)
                if not slots:
                    continue
                # Spread: an identity not yet attacked this way, then the least attacked one.
                again = {q.source for k, _, q, _ in plans if k == kind}
                load = {p.source: (p.source in again, count.get(p.source, 0)) for p, _ in slots}
                fewest = min(load.values())
                p, day = rng.choice([(p, d) for p, d in slots if load[p.source] == fewest])
                hour = rng.choice(self._hours(kind, p, day))
                minute = day * MINUTES_PER_DAY + hour * 60 + rng.randrange(20 if kind == "odd_hours" else 60)
                taken.add((p.source, day))
                count[p.source] = count.get(p.source, 0) + 1
                plans.append((kind, instance, p, minute))
        return plans

    def _hours(self, kind: str, p: _Profile, day: int) -> list[int]:
        """Hours an attack of `kind` may start in on `day`; [] when it does not fit."""
        if kind == "odd_hours":
            return [3] if p.role == BUSINESS and self.weekday(day) < 5 else []  # on top of a working day
        if kind == "credential_replay" and p.role == BATCH:
            return []
        latest = 15 if kind == "slow_and_low" else 21  # the attack and its hour of grace end that day
        return [h for h in p.active_hours(self.weekday(day)) if h <= latest]

    def inject(self, kind: str, p: _Profile, minute: int, index: int, flows: _Flows) -> Attack:
        rng = Random(f"trustmesh-trace:{self.seed}:attack:{kind}:{index}:{p.source}:{minute}")
        cells: list[tuple[int, str, str, int, str, int, int, int]] = []
        describe = ATTACKS[kind](self, rng, p, minute, index, cells, flows)
        cells = [c for c in cells if c[0] < self.minutes]
        self.touched.setdefault(p.source, set()).update((c[2], c[3]) for c in cells)
        for cell in cells:
            flows.add(*cell)
        first, last = min(c[0] for c in cells), max(c[0] for c in cells)
        destinations, nodes = {c[2] for c in cells}, {c[1] for c in cells}
        return Attack(f"{kind}-{index + 1}", kind, p.source, self.ts(first), self.ts(last),
                      kind == "slow_and_low", describe, destinations.pop() if len(destinations) == 1 else "",
                      nodes.pop() if len(nodes) == 1 else "")

    @staticmethod
    def usual_10min(flows: _Flows, destination: str, before: int) -> float:
        """The mean bytes of the 10-minute windows (aligned) in which the identity exchanged
        anything with `destination` before minute `before`: its usual volume with that peer."""
        windows: dict[int, int] = {}
        for (minute, _, dst, _, _), (_, bytes_in, bytes_out) in flows.cells.items():
            if dst == destination and minute < before:
                windows[(minute + 1) // 10] = windows.get((minute + 1) // 10, 0) + bytes_in + bytes_out
        return sum(windows.values()) / len(windows) if windows else 0.0

    def foreign_targets(self, p: _Profile, rng: Random, count: int) -> list[tuple[str, int]]:
        used = {(q.destination, q.port) for q in p.peers} | self.touched.get(p.source, set())
        destinations = list(self.service_port) + [spiffe(d) for d, _ in DATASTORES]
        out: list[tuple[str, int]] = []
        while len(out) < count:
            target = (rng.choice(destinations), rng.choice(PROBE_PORTS))
            if target not in used and target not in out:
                out.append(target)
        return out


def _new_peer(w: _World, rng: Random, p: _Profile, minute: int, index: int,
              cells: list[Cell], flows: _Flows) -> str:
    peers = [q for q in p.usual_peers() if q.destination in w.service_port] or p.usual_peers()
    peer = rng.choice(peers)
    used = {q.port for q in p.peers if q.destination == peer.destination}
    used |= {port for destination, port in w.touched.get(p.source, ()) if destination == peer.destination}
    port = next((a for a in ADMIN_PORTS if a not in used), 10000 + rng.randrange(1000))
    decision = "deny" if index % 2 == 0 else "allow"
    for m in range(minute, minute + rng.randint(1, 3)):
        connections = rng.randint(1, 3)
        bytes_in, bytes_out = (0, 0) if decision == "deny" else (connections * 600, connections * rng.randint(
            20_000, 400_000))
        cells.append((m, p.nodes[0], peer.destination, port, decision, connections, bytes_in, bytes_out))
    return f"{peer.destination} admin port {port} ({decision})"


def _sweep(w: _World, rng: Random, p: _Profile, minute: int, index: int,
           cells: list[Cell], flows: _Flows) -> str:
    targets = w.foreign_targets(p, rng, rng.randint(12, 30))
    spread = rng.randint(2, 4)
    own = rng.sample(p.usual_peers(), min(len(p.usual_peers()), rng.randint(1, 3)))
    for i, (destination, port) in enumerate(targets):
        cells.append((minute + i * spread // len(targets), p.nodes[0], destination, port, "deny",
                      rng.randint(1, 2), 0, 0))
    for peer in own:
        cells.append((minute + rng.randrange(spread), p.nodes[0], peer.destination, peer.port, peer.decision, 1,
                      300, 900))
    return f"{len(targets)} denied targets + {len(own)} allowed in {spread} min"


def _volume(w: _World, rng: Random, p: _Profile, minute: int, index: int,
            cells: list[Cell], flows: _Flows) -> str:
    peers = [q for q in p.usual_peers() if not q.flat] or p.usual_peers()
    usual = {q.destination: w.usual_10min(flows, q.destination, minute) for q in peers}
    peer = max(peers, key=lambda q: usual[q.destination])  # its biggest peer
    pull = index % 2 == 0  # pulls (bytes_out) or sends (bytes_in)
    total = 0
    for m in range(minute, minute + 10):  # on top of its own traffic: about 20x in all
        moved = int(1.9 * usual[peer.destination] * rng.uniform(0.8, 1.2))
        total += moved
        connections = rng.randint(1, 3)
        cells.append((m, p.nodes[0], peer.destination, peer.port, peer.decision, connections,
                      connections * 500 if pull else moved, moved if pull else connections * 2000))
    return (f"{'pulls from' if pull else 'sends to'} {peer.destination}: +{total / 1e6:.1f} MB in 10 min "
            f"(its mean is {usual[peer.destination] / 1e6:.2f} MB per active 10 min)")


def _odd_hours(w: _World, rng: Random, p: _Profile, minute: int, index: int,
               cells: list[Cell], flows: _Flows) -> str:
    length = rng.randint(20, 45)
    peers = p.usual_peers()
    for m in range(minute, minute + length):
        for peer in peers:
            if rng.random() < 1.0 - math.exp(-peer.lam * 0.6):
                connections = 1 + _poisson(rng, peer.lam * 0.3)
                cells.append((m, p.nodes[0], peer.destination, peer.port, peer.decision, connections,
                              int(connections * peer.bytes_in), int(connections * peer.bytes_out)))
    if not any(c[0] == minute for c in cells):  # it starts with a connection at the labelled start
        peer = peers[0]
        cells.append((minute, p.nodes[0], peer.destination, peer.port, peer.decision, 1, int(peer.bytes_in),
                      int(peer.bytes_out)))
    return f"{length} min on its {len(peers)} usual peers from 03:{minute % 60:02d} UTC"


def _credential_replay(w: _World, rng: Random, p: _Profile, minute: int, index: int,
                       cells: list[Cell], flows: _Flows) -> str:
    node = rng.choice([n for n in w.nodes if n not in p.nodes])
    peers = rng.sample(p.usual_peers(), min(2, len(p.usual_peers())))
    length = rng.randint(15, 30)
    for m in range(minute, minute + length):
        for i, peer in enumerate(peers):
            if m == minute and i == 0 or rng.random() < 0.6:
                connections = rng.randint(1, 4)
                cells.append((m, node, peer.destination, peer.port, peer.decision, connections,
                              int(connections * peer.bytes_in), int(connections * peer.bytes_out)))
    return f"from {node} (it runs on {', '.join(p.nodes)}) to {len(peers)} usual peer(s) for {length} min"


def _deny_burst(w: _World, rng: Random, p: _Profile, minute: int, index: int,
                cells: list[Cell], flows: _Flows) -> str:
    used = {q.destination for q in p.peers} | {d for d, _ in w.touched.get(p.source, ())}
    stores = [(spiffe(d), port) for d, port in DATASTORES if spiffe(d) not in used] or [
        (spiffe(d), port) for d, port in DATASTORES if spiffe(d) not in {q.destination for q in p.peers}]
    destination, port = rng.choice(stores)
    spread = rng.randint(2, 4)
    total = 0
    for m in range(minute, minute + spread):
        connections = rng.randint(15, 80)
        total += connections
        cells.append((m, p.nodes[0], destination, port, "deny", connections, 0, 0))
    return f"{total} denied connections to {destination} port {port} in {spread} min"


def _slow_and_low(w: _World, rng: Random, p: _Profile, minute: int, index: int,
                  cells: list[Cell], flows: _Flows) -> str:
    probes = rng.randint(4, 6)
    m = minute
    for destination, port in w.foreign_targets(p, rng, probes):
        cells.append((m, p.nodes[0], destination, port, "deny", rng.randint(1, 2), 0, 0))
        m += rng.randint(35, 85)
    return f"{probes} denied probes to distinct new targets over {(cells[-1][0] - minute) / 60:.1f} h"


ATTACKS: dict[str, Callable[[_World, Random, _Profile, int, int, list[Cell], _Flows], str]] = {
    "new_peer": _new_peer, "sweep": _sweep, "volume": _volume, "odd_hours": _odd_hours,
    "credential_replay": _credential_replay, "deny_burst": _deny_burst, "slow_and_low": _slow_and_low}


# --- the generator ----------------------------------------------------------------------------


def generate(seed: int, identities: int = 40, days: int = 28, start: float = DEFAULT_START, *,
             learn_days: int = LEARN_DAYS, per_kind: int = ATTACKS_PER_KIND) -> Trace:
    """A trace of `identities` sources over `days` days from `start` (a UTC midnight), with
    up to `per_kind` attacks of each kind; the same for the same arguments."""
    if identities < 1 or days < 1:
        raise ValueError("a trace needs at least one identity and one day")
    if start % DAY:
        raise ValueError(f"start must be a UTC midnight, got {format_utc(start)}")
    world = _World(seed, identities, days, start, learn_days)
    plans = world.schedule_attacks(per_kind)
    busy = {(p.source, m // MINUTES_PER_DAY) for _, _, p, m in plans}
    world.schedule_benign(busy)
    ts_of = [world.ts(m) for m in range(world.minutes)]  # shared floats: less memory per record
    records: list[TraceRecord] = []
    attacks: list[Attack] = []
    active: set[tuple[str, int]] = set()
    start_day = day_of(start)
    for p in world.profiles:
        flows = _Flows()
        world.benign(p, flows)
        for kind, instance, target, minute in plans:
            if target is p:
                attacks.append(world.inject(kind, p, minute, instance, flows))
        source = p.source
        for (minute, node, destination, port, decision), (conns, bytes_in, bytes_out) in flows.cells.items():
            if 0 <= minute < world.minutes:
                records.append(TraceRecord(ts_of[minute], node, source, destination, port, decision, conns,
                                           bytes_in, bytes_out))
                active.add((source, start_day + (minute + 1) // MINUTES_PER_DAY))
    records.sort(key=attrgetter("ts"))
    attacks.sort(key=lambda a: (a.start, a.name))
    benign = frozenset(benign_days(active, attacks, start_day + learn_days))
    return Trace(records, attacks, len(benign), benign, sorted(world.events, key=lambda e: (e.start, e.identity)),
                 [p.source for p in world.profiles], start, days, learn_days, seed)


def benign_days(active: set[tuple[str, int]], attacks: list[Attack], first_day: int) -> set[tuple[str, int]]:
    """The (identity, day)s with records, from `first_day` on, that no attack (start to end +
    GRACE) of that identity overlaps."""
    out = {(identity, day) for identity, day in active if day >= first_day}
    for a in attacks:
        for day in range(day_of(a.start), day_of(a.end + GRACE) + 1):
            out.discard((a.identity, day))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="generate a labelled synthetic flow trace (JSON lines)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--identities", type=int, default=40)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--out", help="write the trace here (JSON lines, the `trustmesh detect replay` format)")
    parser.add_argument("--json", action="store_true", help="print the summary (attacks, benign events) as JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    trace = generate(args.seed, args.identities, args.days)
    elapsed = time.perf_counter() - started
    size = trace.write_jsonl(args.out) if args.out else 0
    if args.json:
        print(json.dumps(trace.summary() | {"generated_s": round(elapsed, 2), "bytes": size}, indent=2))
        return 0
    print(f"{len(trace.records):,} records, {len(trace.identities)} identities, {trace.days} days from "
          f"{format_utc(trace.start)}, generated in {elapsed:.1f} s"
          + (f"; wrote {args.out} ({size / 1e6:.0f} MB)" if args.out else ""))
    print(f"benign identity-days (from day {trace.learn_days}): {trace.benign_identity_days}; "
          f"benign events: {len(trace.events)}")
    for a in trace.attacks:
        print(f"  {a.name:<20} {a.identity:<45} {format_utc(a.start)} .. {format_utc(a.end)}  {a.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
