"""The server side of detection: a report's counters as trace records, with the node the
source ran on."""

from __future__ import annotations

from trustmesh.controlplane.detection import NodeAddresses, report_records
from trustmesh.controlplane.flow_audit import FlowCounter
from trustmesh.controlplane.store.records import AttestedNode
from trustmesh.spiffeid import SpiffeId

PAY, LEDGER = "spiffe://example.org/payments", "spiffe://example.org/ledger"


def node(name: str, address: str) -> AttestedNode:
    return AttestedNode(spiffe_id=SpiffeId.parse(f"spiffe://example.org/agent/{name}"), node_name=name,
                        attestation_type="join_token", cert_serial="01", cert_not_after=0.0, banned=False,
                        created_at=0.0, updated_at=0.0, renewed_from=address)


def counter(source: str = PAY, address: str = "", *, denied: bool = False, unverified: bool = False) -> FlowCounter:
    return FlowCounter(source_id=source, destination_id=LEDGER, port=8443, denied=denied, audit_mode=False, rule="",
                       count=3, first_seen=0, last_seen=0, bytes_in=10, bytes_out=20, unverified=unverified,
                       source_address=address)


def test_the_node_is_where_the_source_ran() -> None:
    now = [100.0]
    nodes = [node("node-1", "10.0.0.1"), node("node-2", "10.0.0.2"), node("node-3", "10.0.0.9"),
             node("node-4", "10.0.0.9")]
    node_at = NodeAddresses(lambda: nodes, lambda: now[0])
    records = report_records("node-2", 100.0, [
        (counter(), True),  # the reporting agent runs the source
        (counter(address="10.0.0.1"), False),  # seen by an inbound listener: the caller's node
        (counter(address="192.0.2.7"), False),  # no node of ours there: the address itself
        (counter(address="10.0.0.9"), False),  # two nodes behind one address: unknown
        (counter(address=""), False),
        (counter(source="", address="10.0.0.1", unverified=True), False),
        (counter(denied=True, address="10.0.0.1"), False),
    ], node_at)
    assert [r.node for r in records] == ["node-2", "node-1", "192.0.2.7", "", "", "", "node-1"]
    assert records[5].source == "unverified:10.0.0.1" and records[5].decision == "unverified"
    assert records[6].decision == "deny" and records[0].connections == 3 and records[0].bytes_out == 20
    assert node_at("not an address") == ""
    # the map is rebuilt at most every REFRESH_SECONDS
    nodes.append(node("node-5", "192.0.2.7"))
    assert node_at("192.0.2.7") == "192.0.2.7"
    now[0] += NodeAddresses.REFRESH_SECONDS + 1
    assert node_at("192.0.2.7") == "node-5"
