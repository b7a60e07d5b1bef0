"""Flow rollups on a real SQLite store: sums per edge and hour, what a replica keeps of an
agent's report, restarts, every replica's view, retention, and the store's own bounds."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest

from tests.unit.server_runtime import TD, Clock, server_runtime
from trustmesh.controlplane.flow_audit import FlowCounter
from trustmesh.controlplane.flow_store import HOUR, SHARDS, FlowQuery, FlowRollups, decision_of
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.kv import Put
from trustmesh.controlplane.store.records import FlowShard, RegistrationEntry
from trustmesh.errors import InvalidArgumentError
from trustmesh.flows import Flow
from trustmesh.spiffeid import SpiffeId

AGENT = f"spiffe://{TD.name}/agent/node-1"
WEB = f"spiffe://{TD.name}/web"
LEDGER = f"spiffe://{TD.name}/ledger"
OTHER = f"spiffe://{TD.name}/other"


@dataclasses.dataclass
class _Entry:
    spiffe_id: SpiffeId


class _View:
    """The entries each agent may use (the registry view's answer), set by the test."""

    def __init__(self, entries: dict[str, list[str]]) -> None:
        self.entries = entries

    def authorized_for(self, agent: str) -> list[RegistrationEntry]:
        return [_Entry(SpiffeId.parse(i)) for i in self.entries.get(agent, [])]  # type: ignore[misc]


def counter(src: str = WEB, dst: str = LEDGER, *, count: int = 1, port: int = 8443, denied: bool = False,
            audit: bool = False, rule: str = "ledger allow[0]", at: float = 0.0, bytes_in: int = 0,
            bytes_out: int = 0, unverified: bool = False, address: str = "", route: str = "") -> FlowCounter:
    return FlowCounter(source_id=src, destination_id=dst, port=port, denied=denied, audit_mode=audit, rule=rule,
                       count=count, first_seen=int(at), last_seen=int(at), bytes_in=bytes_in, bytes_out=bytes_out,
                       unverified=unverified, source_address=address, route=route)


def _with(rt: ServerRuntime, **options: object) -> ServerRuntime:
    return dataclasses.replace(rt, config=dataclasses.replace(rt.config, **options))


def _counted(rt: ServerRuntime, name: str, **labels: str) -> float:
    return rt.metrics.counter(name, "", list(labels)).value(**labels)


def test_decisions_follow_the_agents_encoding() -> None:
    assert decision_of(counter()) == "allow"
    assert decision_of(counter(denied=True)) == "deny"
    assert decision_of(counter(audit=True)) == "audit"  # allowed only because of audit mode
    assert decision_of(counter(src="", unverified=True, address="10.0.0.7")) == "unverified"


async def test_counters_sum_per_edge_and_only_the_agents_own_are_kept(tmp_path: Path) -> None:
    clock = Clock(1_000 * HOUR + 600)
    async with server_runtime(tmp_path, clock) as rt:
        rollups = FlowRollups(rt, _View({AGENT: [WEB]}), "r1")
        now = clock.now
        rollups.add(AGENT, [counter(count=2, at=now, bytes_in=100, bytes_out=1_000),
                            counter(count=3, at=now, bytes_in=5, bytes_out=7),
                            counter(denied=True, rule="default deny", at=now),
                            # Traffic between two services this agent does not run: a claim about others.
                            counter(src=OTHER, dst=LEDGER, count=50, at=now)])
        window = await rollups.query(FlowQuery())
        assert [(f.source, f.decision, f.connections, f.bytes_in, f.bytes_out) for f in window.flows] == [
            (WEB, "allow", 5, 105, 1_007), (WEB, "deny", 1, 0, 0)]
        assert _counted(rt, "trustmesh_flow_counters_dropped_total", reason="not_the_agents") == 1
        assert (await rollups.query(FlowQuery(decision="deny"))).flows[0].rule == "default deny"
        assert (await rollups.query(FlowQuery(source=OTHER))).flows == []
        with pytest.raises(InvalidArgumentError, match="--decision"):
            await rollups.query(FlowQuery(decision="maybe"))


async def test_times_come_from_the_servers_clock(tmp_path: Path) -> None:
    clock = Clock(1_000 * HOUR + 600)
    async with server_runtime(tmp_path, clock) as rt:
        rollups = FlowRollups(rt, _View({AGENT: [WEB]}), "r1")
        # An agent claiming last year or next year lands within the last interval of this hour.
        rollups.add(AGENT, [counter(at=clock.now - 365 * 86400), counter(port=1, at=clock.now + 86400)])
        for flow in (await rollups.query(FlowQuery())).flows:
            assert 1_000 * HOUR <= flow.first_seen <= flow.last_seen <= clock.now


async def test_a_restart_keeps_what_was_flushed_and_replicas_see_each_other(tmp_path: Path) -> None:
    clock = Clock(1_000 * HOUR + 600)
    async with server_runtime(tmp_path, clock) as rt:
        view = _View({AGENT: [WEB]})
        first = FlowRollups(rt, view, "r1")
        first.add(AGENT, [counter(count=4, at=clock.now)])
        await first.flush()
        first.add(AGENT, [counter(count=1, at=clock.now)])  # not flushed: lost with the process
        # The next process (a new replica name) and another replica both see the flushed sums.
        second = FlowRollups(rt, view, "r2")
        second.add(AGENT, [counter(count=10, at=clock.now)])
        assert (await second.query(FlowQuery())).flows[0].connections == 14
        # The first replica reads its own unflushed sums instead of its stored ones (no double count).
        assert (await first.query(FlowQuery())).flows[0].connections == 5
        await second.flush()
        third = FlowRollups(rt, view, "r3")
        assert (await third.query(FlowQuery())).flows[0].connections == 14


async def test_writes_are_bounded_by_shards_not_by_traffic(tmp_path: Path) -> None:
    clock = Clock(1_000 * HOUR + 600)
    async with server_runtime(tmp_path, clock) as rt:
        agents = {f"spiffe://{TD.name}/agent/n{i}": [f"spiffe://{TD.name}/svc{i}"] for i in range(200)}
        rollups = FlowRollups(rt, _View(agents), "r1")
        for agent, (own,) in agents.items():
            rollups.add(agent, [counter(src=own, dst=f"{LEDGER}{j}", count=100, at=clock.now) for j in range(20)])
        await rollups.flush()
        assert _counted(rt, "trustmesh_flow_rollup_writes_total") == SHARDS  # 4,000 edges, 16 records
        await rollups.flush()  # nothing new: nothing written
        assert _counted(rt, "trustmesh_flow_rollup_writes_total") == SHARDS
        assert len((await rollups.query(FlowQuery())).flows) == 4_000


async def test_the_window_and_retention(tmp_path: Path) -> None:
    clock = Clock(1_000 * HOUR + 600)
    async with server_runtime(tmp_path, clock) as base:
        rt = _with(base, flow_retention=timedelta(hours=3))
        view = _View({AGENT: [WEB]})
        rollups = FlowRollups(rt, view, "r1")
        for hour in range(6):
            rollups.add(AGENT, [counter(port=8000 + hour, at=clock.now)])
            await rollups.flush()
            clock.now += HOUR
        # Now in hour 1006: retention 3 h keeps hours 1003 (partly) to 1005.
        assert sorted(f.port for f in (await rollups.query(FlowQuery())).flows) == [8003, 8004, 8005]
        since = clock.now - 2 * HOUR
        assert sorted(f.port for f in (await rollups.query(FlowQuery(since=since))).flows) == [8004, 8005]
        await rollups.prune()
        stored = {s.hour for s in await rt.store.list_flow_shards()}
        assert stored == {1003, 1004, 1005}
        clock.now += HOUR
        await rollups.prune()  # the next round deletes only the hour that fell out since
        assert {s.hour for s in await rt.store.list_flow_shards()} == {1004, 1005}


async def _stored_periods(rt: ServerRuntime) -> dict[str, set[int]]:
    periods: dict[str, set[int]] = {}
    for level, period, _, _ in await rt.store.list_flow_rows(0):
        periods.setdefault(level, set()).add(period)
    return periods


async def test_the_leader_merges_hours_into_days_and_days_into_weeks_without_changing_a_sum(
        tmp_path: Path) -> None:
    day0 = 20_000  # in the week of days 19,999 to 20,005 (weeks of days since the epoch)
    clock = Clock(day0 * 24 * HOUR + 600)
    async with server_runtime(tmp_path, clock) as base:
        rt = _with(base, flow_retention=timedelta(days=60))
        view = _View({AGENT: [WEB], f"{AGENT}-2": [WEB]})
        one, two = FlowRollups(rt, view, "r1"), FlowRollups(rt, view, "r2")
        # 20 days, two replicas, a report every 6 hours: two edges each time.
        for _ in range(20 * 4):
            one.add(AGENT, [counter(count=2, at=clock.now, bytes_in=10), counter(port=1, at=clock.now)])
            two.add(f"{AGENT}-2", [counter(count=3, at=clock.now, bytes_out=7)])
            await one.flush()
            await two.flush()
            clock.now += 6 * HOUR
        before = (await one.query(FlowQuery())).flows
        await one.maintain()
        periods = await _stored_periods(rt)
        now_day = int(clock.now // HOUR) // 24
        # Hours only for the last day or two, days for the last one or two weeks, weeks before.
        assert min(periods["hour"]) // 24 >= now_day - 1
        assert periods["day"] and periods["week"] and max(periods["week"]) * 7 < min(periods["day"])
        after = await one.query(FlowQuery())
        assert after.flows == before  # every sum, first and last seen: the same
        # A window starting inside a merged week starts at that week (and says so).
        inside = await one.query(FlowQuery(since=(day0 + 2) * 24 * HOUR))
        assert inside.since == (day0 // 7) * 7 * 24 * HOUR == min(periods["week"]) * 7 * 24 * HOUR
        edge = next(f for f in after.flows if f.port == 8443)
        assert (edge.connections, edge.bytes_in, edge.bytes_out) == (80 * 5, 80 * 10, 80 * 7)
        await one.maintain()  # within the same hour: nothing read, nothing written
        assert await _stored_periods(rt) == periods


async def test_a_merge_cut_short_is_not_counted_twice(tmp_path: Path) -> None:
    clock = Clock(20_000 * 24 * HOUR + 600)
    async with server_runtime(tmp_path, clock) as base:
        rt = _with(base, flow_retention=timedelta(days=60))
        rollups = FlowRollups(rt, _View({AGENT: [WEB]}), "r1")
        for _ in range(24):
            rollups.add(AGENT, [counter(at=clock.now)])
            await rollups.flush()
            clock.now += HOUR
        clock.now += 3 * HOUR
        before = (await rollups.query(FlowQuery())).flows
        # The leader wrote the day, then died before deleting its hours.
        day = [f for f in before]
        await rt.store.put_flow_shards([FlowShard(20_000, "compacted", 0, tuple(day))], "day")
        assert (await rollups.query(FlowQuery())).flows == before  # the hours under the day are skipped
        await rollups.maintain()  # the next leader only deletes them
        assert (await rollups.query(FlowQuery())).flows == before
        assert "hour" not in await _stored_periods(rt) or \
            all(h // 24 > 20_000 for h in (await _stored_periods(rt))["hour"])


async def test_retention_drops_whole_days_and_weeks(tmp_path: Path) -> None:
    clock = Clock(20_000 * 24 * HOUR + 600)
    async with server_runtime(tmp_path, clock) as base:
        rt = _with(base, flow_retention=timedelta(days=10))
        rollups = FlowRollups(rt, _View({AGENT: [WEB]}), "r1")
        for _ in range(40):
            rollups.add(AGENT, [counter(at=clock.now)])
            await rollups.flush()
            clock.now += 24 * HOUR
        await rollups.maintain()
        cutoff_hour = int(clock.now // HOUR) - 10 * 24
        for level, period, _, _ in await rt.store.list_flow_rows(0):
            span = {"hour": 1, "day": 24, "week": 168}[level]
            assert (period + 1) * span > cutoff_hour  # nothing that ended before the cutoff is kept
        window = await rollups.query(FlowQuery())
        assert window.flows and window.flows[0].connections <= 10 + 7  # at most a week beyond retention


async def test_a_malformed_stored_rollup_is_left_out(tmp_path: Path) -> None:
    async with server_runtime(tmp_path) as rt:
        good = FlowShard(5, "r1", 0, (Flow(WEB, LEDGER, 1, "allow", "", 1, 0, 0, 1.0, 1.0),))
        bad = FlowShard(5, "r1", 1, (Flow(WEB, LEDGER, 1, "maybe", "", 1, 0, 0, 1.0, 1.0),))
        await rt.store.put_flow_shards([good, bad])
        assert await rt.store.list_flow_shards() == [good]
        assert await rt.store.oldest_flow_period() == 5


async def test_permissive_listeners_are_kept_on_the_agents_record_only_when_they_change(tmp_path: Path) -> None:
    from trustmesh.controlplane.attestation import MAX_PERMISSIVE_LISTENERS, NodeAttestor
    from trustmesh.controlplane.store.records import AttestedNode

    async with server_runtime(tmp_path) as rt:
        node = await rt.store.create_attested_node(AttestedNode(
            spiffe_id=SpiffeId.parse(AGENT), node_name="node-1", attestation_type="join_token", cert_serial="01",
            cert_not_after=2e9, banned=False, created_at=1.0, updated_at=1.0))
        attestor = NodeAttestor(rt)
        updated = await attestor.note_permissive_listeners(node, ["fx 0.0.0.0:7000", "fx 0.0.0.0:7000"])
        assert updated is not None and updated.permissive_listeners == ("fx 0.0.0.0:7000",)
        stored = await rt.store.get_attested_node(AGENT)
        assert stored.permissive_listeners == ("fx 0.0.0.0:7000",)
        assert await attestor.note_permissive_listeners(stored, ["fx 0.0.0.0:7000"]) is None  # no write, no event
        events = [e for e in await rt.store.list_audit_events() if e.kind == "agent.permissive_listeners"]
        assert len(events) == 1 and events[0].details["listeners"] == ["fx 0.0.0.0:7000"]
        cleared = await attestor.note_permissive_listeners(stored, [])  # back to strict: recorded too
        assert cleared is not None and cleared.permissive_listeners == ()
        for hostile in (["x"] * (MAX_PERMISSIVE_LISTENERS + 1), ["fx\n0.0.0.0:1"], ["y" * 301]):
            with pytest.raises(InvalidArgumentError, match="permissive_listeners"):
                await attestor.note_permissive_listeners(cleared, [f"{h}{i}" for i, h in enumerate(hostile)])


async def test_each_route_is_an_edge_of_its_own_through_flushes_queries_and_merges(tmp_path: Path) -> None:
    clock = Clock(20_000 * 24 * HOUR + 600)
    async with server_runtime(tmp_path, clock) as base:
        rt = _with(base, flow_retention=timedelta(days=60))
        view = _View({AGENT: [WEB, LEDGER]})
        one, two = FlowRollups(rt, view, "r1"), FlowRollups(rt, view, "r2")
        for _ in range(2 * 24):
            one.add(AGENT, [counter(count=2, at=clock.now),  # connections: no route
                            counter(count=5, at=clock.now, bytes_out=10, route="GET /transactions/*"),
                            counter(count=1, at=clock.now, route="POST /transactions")])
            two.add(AGENT, [counter(count=3, at=clock.now, route="GET /transactions/*"),
                            counter(src="", unverified=True, address="10.0.0.7", rule="", at=clock.now, route="GET *"),
                            counter(denied=True, rule="default deny", at=clock.now, route="DELETE")])
            await one.flush()
            await two.flush()
            clock.now += HOUR
        clock.now += 3 * HOUR
        before = (await FlowRollups(rt, view, "r3").query(FlowQuery())).flows
        assert sorted((f.source_address, f.decision, f.route, f.connections, f.bytes_out) for f in before) == [
            ("", "allow", "", 2 * 48, 0), ("", "allow", "GET /transactions/*", 8 * 48, 10 * 48),
            ("", "allow", "POST /transactions", 48, 0), ("", "deny", "DELETE", 48, 0),
            ("10.0.0.7", "unverified", "GET *", 48, 0)]
        await one.maintain()  # the two days merged: the routes survive the merge
        assert "day" in await _stored_periods(rt)
        assert (await FlowRollups(rt, view, "r3").query(FlowQuery())).flows == before
        assert [f.route for f in (await one.query(FlowQuery(decision="deny"))).flows] == ["DELETE"]


@pytest.mark.parametrize("route", [
    "get /x", "GET /a b", "GET x", "GET /\x00", "GET /\x7f", "GET /é", "GET ", " GET", "GET  /x", "GET\n/x",
    "GET */x", "GET /x\n", "-GET", "1GET", "A" * 33, "GET /" + "a" * 252, "GET /x\t", "GET **"])
async def test_a_malformed_route_drops_its_counter(tmp_path: Path, route: str) -> None:
    async with server_runtime(tmp_path) as rt:
        rollups = FlowRollups(rt, _View({AGENT: [WEB]}), "r1")
        kept = rollups.add(AGENT, [counter(route=route), counter(route="GET /ok", port=1)])
        assert [c.route for c, _ in kept] == ["GET /ok"]
        assert _counted(rt, "trustmesh_flow_counters_dropped_total", reason="malformed") == 1
        assert [f.route for f in (await rollups.query(FlowQuery())).flows] == ["GET /ok"]


@pytest.mark.parametrize("route", ["GET", "GET *", "GET /", "GET /transactions/*", "X-CUSTOM_1 /a/{id}/b?c=d",
                                   "A" * 32, "GET /" + "a" * 251])
async def test_well_formed_routes_are_kept(tmp_path: Path, route: str) -> None:
    async with server_runtime(tmp_path) as rt:
        rollups = FlowRollups(rt, _View({AGENT: [WEB]}), "r1")
        assert len(rollups.add(AGENT, [counter(route=route)])) == 1


async def test_rollups_stored_before_flows_had_routes_still_load(tmp_path: Path) -> None:
    clock = Clock(1_000 * HOUR + 600)
    async with server_runtime(tmp_path, clock) as rt:
        at = clock.now - 60
        old = json.dumps({"v": 1, "hour": 1_000, "replica": "old", "shard": 0, "edges": [
            [WEB, LEDGER, 8443, "allow", "ledger allow[0]", 4, 10, 20, at, at, ""]]}).encode()
        loaded = FlowShard.from_json(old)
        assert loaded.edges == (Flow(WEB, LEDGER, 8443, "allow", "ledger allow[0]", 4, 10, 20, at, at),)
        # Connections are still written so (an older replica reads them); requests carry their route.
        assert FlowShard.from_json(loaded.to_json()) == loaded and json.loads(loaded.to_json())["edges"] == \
            json.loads(old)["edges"]
        routed = dataclasses.replace(loaded, edges=(dataclasses.replace(loaded.edges[0], route="GET *"),))
        assert FlowShard.from_json(routed.to_json()) == routed
        key = rt.store._flow_key("hour", 1_000, "old", 0)  # noqa: SLF001 - a record as an older server wrote it
        await rt.store._kv.txn([], [Put(key, old)])  # noqa: SLF001 - sealed as the store seals its own
        rollups = FlowRollups(rt, _View({AGENT: [WEB]}), "r1")
        rollups.add(AGENT, [counter(count=1, at=clock.now), counter(count=2, at=clock.now, route="GET *")])
        window = await rollups.query(FlowQuery())
        assert [(f.route, f.connections) for f in window.flows] == [("", 5), ("GET *", 2)]
        assert await rt.store.list_flow_shards() == [loaded]
