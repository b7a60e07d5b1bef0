"""The agent's flow reporter: decisions and refusals counted, sent, and kept when a send fails."""

from __future__ import annotations

import grpc
import pytest

from trustmesh._proto.trustmesh.v1 import node_pb2
from trustmesh.agent.proxy.reporter import MAX_REFUSAL_KEYS, FlowReporter
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
