"""The agent's flow reporter: decisions and refusals counted, sent, and kept when a send fails."""

from __future__ import annotations

import logging

import grpc
import pytest

from trustmesh._proto.trustmesh.v1 import node_pb2, types_pb2
from trustmesh.agent.proxy.reporter import MAX_KEYS, MAX_REFUSAL_KEYS, FlowReporter
from trustmesh.metrics import Registry
from trustmesh.policy import Decision
from trustmesh.spiffeid import SpiffeId

LEDGER = SpiffeId.parse("spiffe://example.org/ledger")


class Sender:
    def __init__(self) -> None:
        self.sent: list[node_pb2.ReportFlowsRequest] = []
        self.fail = False

    async def __call__(self, request: node_pb2.ReportFlowsRequest) -> object:
        if self.fail:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "server down")
        self.sent.append(request)
        return node_pb2.ReportFlowsResponse()


async def test_refusals_are_counted_sent_and_kept_across_a_failed_send() -> None:
    send, metrics = Sender(), Registry()
    reporter = FlowReporter(send, metrics)
    reporter.report(SpiffeId.parse("spiffe://example.org/frontend"), LEDGER, 9443,
                    Decision(False, "default deny", "no rule"))
    for _ in range(3):
        reporter.refused("handshake", str(LEDGER), "10.0.0.9", "no client certificate")
    send.fail = True
    await reporter.flush()
    reporter.refused("handshake", str(LEDGER), "10.0.0.9", "no client certificate")
    send.fail = False
    await reporter.flush()
    assert len(send.sent) == 1
    (request,) = send.sent
    assert [(c.source_id, c.count, c.decision) for c in request.counters] == [
        ("spiffe://example.org/frontend", 1, node_pb2.FLOW_DECISION_DENY)]
    assert [(r.kind, r.subject, r.peer, r.reason, r.count) for r in request.refusals] == [
        ("handshake", str(LEDGER), "10.0.0.9", "no client certificate", 4)]  # none lost, none twice
    assert 'trustmesh_connections_refused_total{kind="handshake",reason="no client certificate"} 4.0' \
        in metrics.render()
    await reporter.flush()
    assert len(send.sent) == 1  # nothing pending, nothing sent


@pytest.mark.parametrize("extra", [1, 50])
async def test_a_flood_of_refusal_keys_is_bounded(extra: int) -> None:
    send = Sender()
    reporter = FlowReporter(send, Registry())
    for i in range(MAX_REFUSAL_KEYS + extra):
        reporter.refused("handshake", str(LEDGER), f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "unknown CA")
    await reporter.flush()
    assert len(send.sent[0].refusals) == MAX_REFUSAL_KEYS


async def test_bytes_join_their_connections_key_and_survive_a_failed_send() -> None:
    send = Sender()
    reporter = FlowReporter(send, Registry())
    payments = SpiffeId.parse("spiffe://example.org/payments")
    key = reporter.report(payments, LEDGER, 9443, Decision(True, "ledger allow[0]", "ok"))
    reporter.traffic(key, 100, 2_000)  # a long-lived connection's first minute
    send.fail = True
    await reporter.flush()
    reporter.traffic(key, 5, 7)  # its close, while the server is away
    reporter.traffic(key, 0, 0)  # nothing moved: nothing counted
    send.fail = False
    await reporter.flush()
    [counter] = send.sent[0].counters
    assert (counter.count, counter.bytes_in, counter.bytes_out) == (1, 105, 2_007)
    # Bytes after a flush come under the same key without counting another connection.
    reporter.traffic(key, 1, 1)
    await reporter.flush()
    [later] = send.sent[1].counters
    assert (later.count, later.bytes_in, later.bytes_out, later.rule) == (0, 1, 1, "ledger allow[0]")


async def test_decisions_audit_mode_and_unverified_callers_on_the_wire() -> None:
    send = Sender()
    reporter = FlowReporter(send, Registry())
    web = SpiffeId.parse("spiffe://example.org/web")
    reporter.report(web, LEDGER, 1, Decision(True, "ledger allow[0]", "ok"))
    reporter.report(web, LEDGER, 1, Decision(True, "ledger (audit mode)", "would deny", audit_only=True))
    reporter.report(web, LEDGER, 1, Decision(False, "default deny", "no rule"))
    key = reporter.unverified(LEDGER, 1, "10.0.0.7")
    reporter.unverified(LEDGER, 1, "10.0.0.7")  # the same client again: one key, two connections
    reporter.traffic(key, 18, 0)
    await reporter.flush()
    got = {(c.decision, c.mode, c.source_id, c.source_address, c.count, c.bytes_in) for c in send.sent[0].counters}
    assert got == {
        (node_pb2.FLOW_DECISION_ALLOW, types_pb2.POLICY_MODE_ENFORCE, str(web), "", 1, 0),
        (node_pb2.FLOW_DECISION_ALLOW, types_pb2.POLICY_MODE_AUDIT, str(web), "", 1, 0),
        (node_pb2.FLOW_DECISION_DENY, types_pb2.POLICY_MODE_ENFORCE, str(web), "", 1, 0),
        (node_pb2.FLOW_DECISION_UNVERIFIED, types_pb2.POLICY_MODE_UNSPECIFIED, "", "10.0.0.7", 2, 18)}


async def test_a_full_table_drops_new_edges_first_and_keeps_counting_known_ones() -> None:
    send, metrics = Sender(), Registry()
    reporter = FlowReporter(send, metrics)
    keys = [reporter.unverified(LEDGER, 1, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}") for i in range(MAX_KEYS)]
    reporter.unverified(LEDGER, 1, "192.0.2.1")  # one edge too many: dropped, counted
    reporter.unverified(LEDGER, 1, keys[0][5])  # a known edge: still counted
    reporter.traffic(keys[1], 10, 10)
    await reporter.flush()
    counters = {c.source_address: c for r in send.sent for c in r.counters}
    assert len(counters) == MAX_KEYS and "192.0.2.1" not in counters
    assert counters[keys[0][5]].count == 2 and counters[keys[1][5]].bytes_in == 10
    assert 'trustmesh_flow_keys_dropped_total{table="decisions"} 1.0' in metrics.render()


async def test_a_full_table_goes_out_in_reports_the_server_accepts() -> None:
    from trustmesh.agent.proxy.reporter import BATCH
    from trustmesh.controlplane.issuance import MAX_FLOW_COUNTERS

    send = Sender()
    reporter = FlowReporter(send, Registry())
    for i in range(MAX_KEYS):
        reporter.unverified(LEDGER, 1, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    for i in range(MAX_REFUSAL_KEYS):
        reporter.refused("handshake", str(LEDGER), f"192.0.{i // 256}.{i % 256}", "unknown CA")
    await reporter.flush()
    sizes = [len(r.counters) + len(r.refusals) for r in send.sent]
    assert max(sizes) <= BATCH <= MAX_FLOW_COUNTERS and sum(sizes) == MAX_KEYS + MAX_REFUSAL_KEYS


async def test_keys_counted_during_a_failed_send_do_not_push_the_table_past_its_bound() -> None:
    metrics = Registry()
    hosts = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(MAX_KEYS)]

    class Flooded(Sender):
        async def __call__(self, request: node_pb2.ReportFlowsRequest) -> object:
            # While the send is in flight (the table empty): a known edge and a flood of new ones.
            reporter.unverified(LEDGER, 1, hosts[0])
            for i in range(3):
                reporter.unverified(LEDGER, 1, f"192.0.2.{i}")
            return await super().__call__(request)

    send = Flooded()
    reporter = FlowReporter(send, metrics)
    for host in hosts:
        reporter.unverified(LEDGER, 1, host)
    send.fail = True
    await reporter.flush()
    send.fail = False
    await reporter.flush()
    counters = {c.source_address: c.count for r in send.sent for c in r.counters}
    # The waiting edges all kept, the known one counted again, the new ones of the failed send dropped.
    assert sum(len(r.counters) for r in send.sent) == len(counters) == MAX_KEYS
    assert set(counters) == set(hosts) and counters[hosts[0]] == 2
    assert 'trustmesh_flow_keys_dropped_total{table="decisions"} 3.0' in metrics.render()


async def test_requests_are_counted_per_route_apart_from_connections() -> None:
    send = Sender()
    reporter = FlowReporter(send, Registry())
    web = SpiffeId.parse("spiffe://example.org/web")
    allow = Decision(True, "ledger allow[0]", "ok")
    connection = reporter.report(web, LEDGER, 8443, allow, "10.0.0.5")
    listed = reporter.report(web, LEDGER, 8443, allow, "10.0.0.5", "GET /transactions/*", "r-1")
    assert reporter.report(web, LEDGER, 8443, allow, "10.0.0.5", "GET /transactions/*", "r-2") == listed
    reporter.report(web, LEDGER, 8443, allow, "10.0.0.5", "POST /transactions")
    plain = reporter.unverified(LEDGER, 8443, "10.0.0.7", "GET *")
    assert connection[6] == "" and listed[6] == "GET /transactions/*" and plain[6] == "GET *"
    reporter.traffic(listed, 30, 4_000)  # a request's bytes join its route's key
    await reporter.flush()
    got = {(c.route, c.source_address, c.count, c.bytes_out) for c in send.sent[0].counters}
    assert got == {("", "10.0.0.5", 1, 0), ("GET /transactions/*", "10.0.0.5", 2, 4_000),
                   ("POST /transactions", "10.0.0.5", 1, 0), ("GET *", "10.0.0.7", 1, 0)}


async def test_a_denied_request_is_logged_with_its_route_and_request_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trustmesh.flows")
    reporter = FlowReporter(Sender(), Registry())
    web = SpiffeId.parse("spiffe://example.org/web")
    reporter.report(web, LEDGER, 8443, Decision(False, "default deny", "no rule"), "10.0.0.5", "DELETE",
                    "4f0c2a9e")
    reporter.report(web, LEDGER, 8443, Decision(True, "ledger (audit mode)", "would deny", audit_only=True),
                    route="GET /admin/*", request_id="77aa")
    reporter.report(web, LEDGER, 8443, Decision(False, "default deny", "no rule"))  # a connection
    reporter.report(web, LEDGER, 8443, Decision(True, "ledger allow[0]", "ok"), route="GET *", request_id="x")
    lines = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    assert [(event, f.get("route"), f.get("request_id")) for event, f in lines] == [
        ("connection_denied", "DELETE", "4f0c2a9e"), ("audit_would_deny", "GET /admin/*", "77aa"),
        ("connection_denied", None, None)]  # an allowed request is not logged; a connection has no route
