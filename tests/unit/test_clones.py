"""One agent identity, one place (controlplane/clones.py): the pure rules, the node record's
new fields, and the guard's refusals, marks and audit events against fakes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from trustmesh.controlplane.clones import (
    MAX_REPORTS_PER_AGENT,
    MAX_SUPERSEDED,
    RENEWAL_GRACE,
    CloneGuard,
    SuspectedCloneError,
    judge,
    judge_stream,
    next_superseded,
)
from trustmesh.controlplane.store.records import AttestedNode, NodeStatus, RecordFormatError, SupersededSvid
from trustmesh.errors import ConflictError, PermissionDeniedError
from trustmesh.metrics import Registry
from trustmesh.selectors import Selector
from trustmesh.spiffeid import SpiffeId

A = "spiffe://example.org/agent/node-1"
T0 = 1_800_000_000.0
HOME, AWAY = "10.0.0.1", "10.0.0.2"


@dataclass(frozen=True)
class Peer:
    id: str
    serial: str
    host: str


def renewed(serial: str = "3", previous: tuple[str, ...] = ("2", "1"), at: float = T0, frm: str = HOME) -> AttestedNode:
    """node-1 with `serial` current, renewed at `at` from `frm`, `previous` superseded (newest first)."""
    return AttestedNode(spiffe_id=SpiffeId.parse(A), node_name="node-1", attestation_type="join_token",
                        cert_serial=serial, cert_not_after=at + 3600, banned=False, created_at=T0 - 7200,
                        updated_at=at, selectors=(Selector("node", "name:node-1"),), renewed_from=frm, renewed_at=at,
                        superseded=tuple(SupersededSvid(s, at + 1800) for s in previous))


def test_the_current_svid_from_anywhere_alone_is_admitted() -> None:
    judge(renewed(), Peer(A, "3", HOME), (), T0)
    judge(renewed(), Peer(A, "3", AWAY), (), T0)  # an agent that moved, with nobody live elsewhere
    judge(renewed(), Peer(A, "3", HOME), (HOME,), T0)  # a reconnect beside its own stream


def test_a_second_address_while_live_is_a_clone() -> None:
    with pytest.raises(SuspectedCloneError) as info:
        judge(renewed(), Peer(A, "3", AWAY), (HOME,), T0)
    s = info.value.suspicion
    assert (s.reason, s.first_address, s.second_address) == ("second_address", HOME, AWAY)
    assert isinstance(info.value, PermissionDeniedError) and "in use elsewhere" in str(info.value)


def test_the_previous_svid_right_after_the_renewal_from_the_renewing_address_is_a_retry() -> None:
    judge(renewed(), Peer(A, "2", HOME), (), T0 + RENEWAL_GRACE - 1)
    # Later, or an older one: out of date, refused, but not a clone (same machine).
    for serial, now in (("2", T0 + RENEWAL_GRACE + 1), ("1", T0 + 1)):
        with pytest.raises(PermissionDeniedError, match="superseded") as info:
            judge(renewed(), Peer(A, serial, HOME), (), now)
        assert not isinstance(info.value, SuspectedCloneError)


def test_a_superseded_svid_from_another_address_is_a_clone_at_any_time() -> None:
    for serial, now in (("2", T0 + 1), ("1", T0 + 1), ("2", T0 + RENEWAL_GRACE * 3)):
        with pytest.raises(SuspectedCloneError) as info:
            judge(renewed(), Peer(A, serial, AWAY), (), now)
        s = info.value.suspicion
        assert (s.reason, s.first_address, s.second_address, s.presented_serial, s.current_serial) == (
            "superseded_svid", HOME, AWAY, serial, "3")


def test_an_svid_of_an_earlier_attestation_is_only_out_of_date() -> None:
    with pytest.raises(PermissionDeniedError, match="superseded") as info:
        judge(renewed(), Peer(A, "ff", AWAY), (), T0)
    assert not isinstance(info.value, SuspectedCloneError)


def test_records_without_addresses_are_judged_by_serial_alone() -> None:
    legacy = replace(renewed(), renewed_from="")
    judge(legacy, Peer(A, "2", AWAY), (), T0 + 1)
    judge(legacy, Peer(A, "3", ""), (HOME,), T0)  # no address for the caller: nothing to compare


def test_a_stream_whose_svid_was_renewed_away_elsewhere_is_a_clone() -> None:
    judge_stream(renewed(), Peer(A, "2", HOME))  # the agent itself renewed
    judge_stream(renewed(), Peer(A, "3", AWAY))
    with pytest.raises(SuspectedCloneError):
        judge_stream(renewed(frm=AWAY), Peer(A, "2", HOME))


def test_superseded_svids_are_kept_while_valid_and_bounded() -> None:
    node = renewed(previous=("2", "1"))
    assert [s.serial for s in next_superseded(node, T0 + 10)] == ["3", "2", "1"]
    assert [s.serial for s in next_superseded(node, T0 + 1801)] == ["3"], "expired ones are dropped"
    full = renewed(previous=tuple(str(i) for i in range(MAX_SUPERSEDED)))
    with pytest.raises(PermissionDeniedError, match="renew at half-life"):
        next_superseded(full, T0 + 10)


def test_node_records_carry_status_address_and_superseded_svids() -> None:
    node = replace(renewed(), status=NodeStatus.SUSPECTED_CLONE, status_reason="used from x", status_at=T0 + 5)
    again = AttestedNode.from_json(node.to_json())
    assert again == node and again.status is NodeStatus.SUSPECTED_CLONE
    plain = AttestedNode.from_json(replace(node, status=NodeStatus.ACTIVE, renewed_from="", superseded=()).to_json())
    assert b"status" not in plain.to_json() and b"superseded" not in plain.to_json()
    with pytest.raises(RecordFormatError, match="status 'on-fire'"):
        AttestedNode.from_json(node.to_json().replace(b"suspected-clone", b"on-fire"))
    with pytest.raises(RecordFormatError, match="superseded"):
        AttestedNode.from_json(node.to_json().replace(b'"serial":"2"', b'"serial":2'))


# --- the guard ------------------------------------------------------------------------------


@dataclass
class World:
    """The guard's view, store and audit log, as one fake."""

    node: AttestedNode = field(default_factory=renewed)
    events: list[dict[str, Any]] = field(default_factory=list)
    conflicts: int = 0

    def node_for(self, agent: str) -> AttestedNode:
        return self.node

    def authenticate_stream(self, peer: Any, opened: AttestedNode) -> None:
        pass

    async def node_written(self, node: AttestedNode) -> None:
        self.node = node

    async def get_attested_node(self, spiffe_id: str) -> AttestedNode:
        return self.node

    async def update_attested_node(self, node: AttestedNode, *, expected_revision: int | None = None) -> AttestedNode:
        if self.conflicts:
            self.conflicts -= 1
            raise ConflictError("changed")
        return node

    async def record(self, kind: str, *, actor: str, subject: str = "", outcome: str = "ok",
                     **details: Any) -> object:
        self.events.append({"kind": kind, "subject": subject, "outcome": outcome, **details})
        return None


def guard(world: World) -> CloneGuard:
    return CloneGuard(world, world, world, Registry(), lambda: T0)


async def test_refusals_are_marked_once_and_audited_once_per_pair_of_addresses() -> None:
    world = World(conflicts=1)
    g = guard(world)
    with g.streaming(Peer(A, "3", HOME)):
        for _ in range(5):  # a thief hammering: refused every time
            with pytest.raises(SuspectedCloneError):
                g.authenticate(Peer(A, "3", AWAY))
        with pytest.raises(SuspectedCloneError):
            with g.streaming(Peer(A, "3", AWAY)):
                pytest.fail("a second stream from another address must not open")
        assert g.live_addresses(A) == {HOME}
        while not g._queue.empty():
            await g.record(g._queue.get_nowait())
    assert world.node.status is NodeStatus.SUSPECTED_CLONE and AWAY in world.node.status_reason
    assert [(e["kind"], e["first_address"], e["second_address"], e["marked"]) for e in world.events] == [
        ("agent.suspected_clone", HOME, AWAY, True)]
    assert g.live_addresses(A) == frozenset(), "a closed stream no longer holds its address"

    # Cleared by an operator: the next one is reported again.
    world.node = replace(world.node, status=NodeStatus.ACTIVE)
    with g.streaming(Peer(A, "3", HOME)), pytest.raises(SuspectedCloneError):
        g.authenticate(Peer(A, "3", AWAY))
    await g.record(g._queue.get_nowait())
    assert len(world.events) == 2 and world.events[1]["marked"] is True


async def test_reports_per_agent_are_bounded() -> None:
    world = World()
    g = guard(world)
    with g.streaming(Peer(A, "3", HOME)):
        for i in range(MAX_REPORTS_PER_AGENT + 5):
            with pytest.raises(SuspectedCloneError):
                g.authenticate(Peer(A, "3", f"10.1.0.{i}"))
        while not g._queue.empty():
            await g.record(g._queue.get_nowait())
    assert len(world.events) == MAX_REPORTS_PER_AGENT


async def test_the_guard_task_records_and_stops() -> None:
    world = World()
    g = guard(world)
    stop = asyncio.Event()
    task = asyncio.create_task(g.run(stop))
    with g.streaming(Peer(A, "3", HOME)), pytest.raises(SuspectedCloneError):
        g.authenticate(Peer(A, "2", AWAY))
    async with asyncio.timeout(3):
        while not world.events:
            await asyncio.sleep(0.01)
    assert world.events[0]["reason"] == "superseded_svid"
    stop.set()
    await asyncio.wait_for(task, 3)


def test_an_x509pop_reattestation_from_a_second_address_while_live_is_refused() -> None:
    world = World()
    g = guard(world)
    g.check_reattestation(A, AWAY)  # nobody live: the node moved, or lost its data directory
    with g.streaming(Peer(A, "3", HOME)):
        g.check_reattestation(A, HOME)
        with pytest.raises(SuspectedCloneError) as info:
            g.check_reattestation(A, AWAY)
    assert info.value.suspicion.reason == "second_address"
