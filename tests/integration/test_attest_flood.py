"""Anonymous attestation failures cannot flood the audit log (issue 14, hole 8): per source
address, a token bucket refuses attempts that come too often (RESOURCE_EXHAUSTED), and the
failures that reach the checks become one audit event at once and one summary per interval,
each naming the source, their counts exact."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc

from tests.etcd_process import free_port
from tests.integration.harness import ServerProcess
from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc

ATTEMPTS = 300


async def _attempt(stub: node_pb2_grpc.NodeStub, i: int) -> grpc.StatusCode:
    # The request goes as an iterator: gRPC writes it in the background, so a call the server
    # refuses before reading ends with the server's status, not a failed write of ours.
    call = stub.Attest(iter([node_pb2.AttestRequest(csr=b"", join_token=f"tmjt_guess-{i}")]), timeout=20)
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for _ in call:
            pass
    code: grpc.StatusCode = await call.code()
    return code


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _attest_events(server: ServerProcess) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads(
        server.cli("audit", "show", "--json", "--kind", "node.attest", check=True).stdout)
    return events


async def test_a_flood_of_bad_attestations_is_limited_and_aggregated(
        make_server: Callable[..., ServerProcess]) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    server = make_server(extra=["--metrics", metrics])
    async with server.node_channel() as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        codes: Counter[grpc.StatusCode] = Counter()
        for start in range(0, ATTEMPTS, 25):
            codes.update(await asyncio.gather(*(_attempt(stub, i) for i in range(start, start + 25))))
    checked, limited = codes[grpc.StatusCode.PERMISSION_DENIED], codes[grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert checked + limited == ATTEMPTS and limited > 0 and checked > 0, codes

    # The metrics count every attempt.
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert _metric(text, 'trustmesh_node_attestations_total{method="join_token",outcome="denied"}') == checked
    assert _metric(text, "trustmesh_attestations_rate_limited_total") == limited

    # The first failure was audited at once, with the source; the rest wait for the interval.
    [first] = _attest_events(server)
    assert first["outcome"] == "denied" and first["details"]["count"] == 1
    assert first["source"] == "127.0.0.1" and "unknown or already used" in first["details"]["reason"]

    # A server that stops writes what is pending: one summary for everything else.
    server.stop()
    server.start()
    events = _attest_events(server)
    assert len(events) == 2, events
    summary = events[1]["details"]
    assert summary["source"] == "127.0.0.1" and summary["rate_limited"] == limited
    assert sum(e["details"]["count"] for e in events) == checked
