"""Agents' flow reports in the audit log: one aggregated, labelled event per agent per interval."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.unit.server_runtime import Clock, audit_events, server_runtime
from trustmesh.controlplane.flow_audit import MAX_KEYS, FlowAudit, FlowCounter, RefusalCounter
from trustmesh.controlplane.runtime import ServerRuntime

AGENT = "spiffe://example.org/agent/node-1"
OTHER = "spiffe://example.org/agent/node-2"


def denied(source: str = "spiffe://example.org/frontend", count: int = 1, *, audit_mode: bool = False,
           allowed: bool = False) -> FlowCounter:
    return FlowCounter(source_id=source, destination_id="spiffe://example.org/ledger", port=9443,
                       denied=not allowed and not audit_mode, audit_mode=audit_mode, rule="default deny",
                       count=count, first_seen=1_800_000_000, last_seen=1_800_000_060)


def refusal(peer: str = "10.0.0.9:4000", reason: str = "unknown CA") -> RefusalCounter:
    return RefusalCounter(kind="handshake", subject="spiffe://example.org/ledger", peer=peer, reason=reason,
                          count=3, first_seen=1_800_000_000, last_seen=1_800_000_001)


async def _events(rt: ServerRuntime) -> list[dict[str, Any]]:
    return [{"actor": e.actor, "outcome": e.outcome, **e.details}
            for e in await audit_events(rt, "flows.reported")]


async def test_a_flood_of_reports_is_one_event_at_once_then_one_per_interval(tmp_path: Path) -> None:
    clock = Clock(now=1000.0)
    async with server_runtime(tmp_path) as rt:
        flows = FlowAudit(rt.audit, interval=60, clock=clock)
        for i in range(2_000):
            await flows.add(AGENT, [denied(f"spiffe://example.org/x{i % 50}")], [])
        events = await _events(rt)
        assert len(events) == 1  # the first report, at once; the rest wait for the interval
        assert events[0]["actor"] == AGENT and events[0]["denied"] == 1
        assert events[0]["claim"] == "reported by the agent; not observed by the server"
        assert events[0]["first_seen"] == "2027-01-15T08:00:00Z"
        await flows.flush_due()
        assert len(await _events(rt)) == 1  # not due yet
        clock.now += 60
        await flows.flush_due()
        events = await _events(rt)
        assert len(events) == 2 and events[1]["denied"] == 1_999
        assert events[1]["distinct_flows"] == 50 and len(events[1]["flows"]) == 20
        assert events[1]["unlisted"] == 1_999 - sum(f["count"] for f in events[1]["flows"])
        # Quiet since: the next report is audited at once again.
        clock.now += 120
        await flows.flush_due()
        await flows.add(AGENT, [denied()], [])
        assert len(await _events(rt)) == 3


async def test_allowed_traffic_is_not_audited_and_agents_are_rate_limited_apart(tmp_path: Path) -> None:
    clock = Clock(now=1000.0)
    async with server_runtime(tmp_path) as rt:
        flows = FlowAudit(rt.audit, interval=60, clock=clock)
        await flows.add(AGENT, [denied(allowed=True, count=500)], [])
        assert await _events(rt) == []
        await flows.add(AGENT, [denied(audit_mode=True)], [])
        await flows.add(OTHER, [], [refusal()])
        events = await _events(rt)
        assert [(e["actor"], e["outcome"]) for e in events] == [(AGENT, "would-deny"), (OTHER, "refused")]
        assert events[0]["would_deny"] == 1 and events[1]["refused"] == 3
        assert events[1]["refusals"] == [{"kind": "handshake", "subject": "spiffe://example.org/ledger",
                                          "peer": "10.0.0.9:4000", "reason": "unknown CA", "count": 3}]


async def test_memory_is_bounded_and_claimed_text_is_clipped(tmp_path: Path) -> None:
    clock = Clock(now=1000.0)
    async with server_runtime(tmp_path) as rt:
        flows = FlowAudit(rt.audit, interval=60, clock=clock)
        await flows.add(AGENT, [denied()], [])  # the leading event
        await flows.add(AGENT, [denied(f"spiffe://example.org/{i}-" + "a" * 2000) for i in range(MAX_KEYS + 500)],
                        [refusal(peer=f"10.1.{i // 250}.{i % 250}:1") for i in range(MAX_KEYS + 10)])
        pending = flows._window.pending(AGENT)  # noqa: SLF001 - the bound is the point of this test
        assert len(pending.flows) <= MAX_KEYS and len(pending.refusals) <= MAX_KEYS
        clock.now += 60
        await flows.flush_due()
        event = (await _events(rt))[1]
        assert event["denied"] == MAX_KEYS + 500 and event["refused"] == 3 * (MAX_KEYS + 10)
        assert event["unlisted"] == event["denied"] + event["refused"] - 20 - 3 * 20
        assert all(len(f["source"]) == 256 and f["source"].endswith("...") for f in event["flows"])


async def test_a_failed_write_keeps_the_report_for_the_next_tick(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(now=1000.0)
    async with server_runtime(tmp_path) as rt:
        flows = FlowAudit(rt.audit, interval=60, clock=clock)
        real = rt.audit.record

        async def store_down(*args: Any, **kwargs: Any) -> Any:
            raise OSError("disk I/O error")

        monkeypatch.setattr(rt.audit, "record", store_down)
        await flows.add(AGENT, [denied(count=4)], [])  # accepted: the agent must not resend it
        await flows.add(AGENT, [denied(count=2)], [])
        monkeypatch.setattr(rt.audit, "record", real)
        await flows.flush_due()
        events = await _events(rt)
        assert len(events) == 1 and events[0]["denied"] == 6


async def test_run_writes_what_is_pending_when_stopped(tmp_path: Path) -> None:
    async with server_runtime(tmp_path) as rt:
        flows = FlowAudit(rt.audit, interval=3600)
        await flows.add(AGENT, [denied()], [])
        await flows.add(AGENT, [denied(count=7)], [])
        stop = asyncio.Event()
        task = asyncio.create_task(flows.run(stop))
        stop.set()
        await task
        assert [e["denied"] for e in await _events(rt)] == [1, 7]
