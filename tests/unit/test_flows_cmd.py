"""`trustmesh flows`: the server's edges read back with their routes, and the table's route
column, shown only when HTTP listeners reported requests."""

from __future__ import annotations

import pytest

from trustmesh.cli.flows_cmd import _table, flow_from_pb
from trustmesh.controlplane.api.convert import flow_to_pb
from trustmesh.flows import Flow

WEB, LEDGER = "spiffe://example.org/web", "spiffe://example.org/ledger"
T0 = 1_800_000_000.0
CONNECTION = Flow(WEB, LEDGER, 8443, "allow", "ledger allow[0]", 2, 10, 20, T0, T0 + 60)
REQUEST = Flow(WEB, LEDGER, 8443, "deny", "default deny", 5, 0, 0, T0, T0 + 60, route="POST")


def test_an_edge_crosses_the_admin_api_with_its_route() -> None:
    assert [flow_from_pb(flow_to_pb(f)) for f in (CONNECTION, REQUEST)] == [CONNECTION, REQUEST]


def test_the_route_column_appears_only_when_a_flow_has_a_route(capsys: pytest.CaptureFixture[str]) -> None:
    _table([CONNECTION])
    header, row = capsys.readouterr().out.splitlines()
    assert "ROUTE" not in header and header.split()[3:5] == ["DECISION", "CONNS"]
    _table([CONNECTION, REQUEST])
    header, connection, request = capsys.readouterr().out.splitlines()
    assert header.split()[3:6] == ["ROUTE", "DECISION", "CONNS/REQS"]
    assert connection.split()[3:6] == ["-", "allow", "2"] and request.split()[3:6] == ["POST", "deny", "5"]
