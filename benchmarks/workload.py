"""The agent's Workload API under load: rotation fan-out, first-response latency, memory.

A real server and a real agent; clients are this process (one uid), talking to the agent's
unix socket with grpcio and the standard Workload API messages. Measured:

- fan-out: N streams hold FetchX509SVID open; the workload's entry rotates; time from the
  first stream seeing the new SVID to the last. Reference: the same N messages serialised
  in one loop (the bare cost of the bytes the agent must produce).
- first response: p99 over 100 concurrent clients each opening a stream and waiting for its
  first message. Reference: p50 of one client alone, same run.
- memory: the agent's resident set with 1,000 cached SVIDs. Reference: with one.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import create_entries, percentile, row  # noqa: E402
from tests.etcd_process import free_port  # noqa: E402
from tests.integration.harness import AgentProcess, ServerProcess  # noqa: E402

HEADER = (("workload.spiffe.io", "true"),)


def _gauge(address: str, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _first_message(socket_path: Path) -> tuple[float, object]:
    import grpc

    from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc

    started = time.perf_counter()
    # Its own connection, as a separate workload process would have.
    async with grpc.aio.insecure_channel(f"unix:{socket_path}", options=[("grpc.use_local_subchannel_pool", 1)]
                                         ) as channel:
        call = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=60)
        message = await call.read()
        elapsed = time.perf_counter() - started
        call.cancel()
    return elapsed, message


async def _fanout(socket_path: Path, streams: int) -> tuple[float, float]:
    """(spread of the rotation across streams in s, serialise-N-times reference in s)."""
    import grpc

    from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
    from trustmesh.agent.workload_api import MAX_STREAMS_PER_CONNECTION

    # As many connections as the agent's per-connection stream cap needs, as separate workload
    # processes would have: a local subchannel pool keeps grpc from sharing one connection.
    channels = [grpc.aio.insecure_channel(f"unix:{socket_path}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, -(-streams // MAX_STREAMS_PER_CONNECTION)))]
    calls = [workload_pb2_grpc.SpiffeWorkloadAPIStub(channels[i % len(channels)]).FetchX509SVID(
        workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=120) for i in range(streams)]
    firsts = await asyncio.gather(*(c.read() for c in calls))
    serials = {m.svids[0].x509_svid[:64] for m in firsts}
    arrivals: list[float] = []

    async def until_rotated(call: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
        while True:
            message = await call.read()
            if message.svids[0].x509_svid[:64] not in serials:
                arrivals.append(time.perf_counter())
                return

    await asyncio.wait_for(asyncio.gather(*(until_rotated(c) for c in calls)), 60)
    spread = max(arrivals) - min(arrivals)
    started = time.perf_counter()
    for _ in range(streams):
        firsts[0].SerializeToString()
    reference = time.perf_counter() - started
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()
    return spread, reference


def run(quick: bool) -> list[dict[str, object]]:
    streams, clients, cached = (100, 20, 100) if quick else (1000, 100, 1000)
    uid = os.getuid()
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-workload-") as tmp:
        server = ServerProcess(data_dir=Path(tmp) / "server").start()
        agent = None
        try:
            server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/bench", "--node", "node-1",
                       "--selector", f"unix:uid:{uid}", "--x509-ttl", "20s", check=True)
            token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
            metrics = f"127.0.0.1:{free_port()}"
            config = Path(tmp) / "agent.yaml"
            config.write_text(f"metrics: {metrics}\n")
            agent = AgentProcess(server, Path(tmp) / "agent", join_token=token, config=config).start()
            assert agent.proc is not None
            asyncio.run(_first_message(agent.socket))
            time.sleep(1.0)
            rss_one = rss_mib(agent.proc.pid)
            alone = [asyncio.run(_first_message(agent.socket))[0] for _ in range(20)]

            async def concurrent() -> list[float]:
                return [t for t, _ in await asyncio.gather(*(_first_message(agent.socket) for _ in range(clients)))]

            together = asyncio.run(concurrent())
            results.append(row("workload_api.first_response.p99", percentile(together, 99) * 1000, "ms",
                               "one client alone, p50 (same run)", percentile(alone, 50) * 1000, "<= 10",
                               {"concurrent_clients": clients, "p50_ms": round(percentile(together, 50) * 1000, 2)}))
            spread, reference = asyncio.run(_fanout(agent.socket, streams))
            results.append(row("workload_api.rotation_fanout", spread, "s",
                               f"serialising the message {streams} times in one loop", reference, "report",
                               {"streams": streams, "svid_ttl": "20s"}))
            # Many more SVIDs in the cache (entries of other uids on this node).
            asyncio.run(create_entries(server, "node-1", cached - 1, prefix="cached"))
            deadline = time.monotonic() + 180
            while _gauge(metrics, "trustmesh_agent_svids_cached") < cached:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the agent did not cache {cached} SVIDs in time")
                time.sleep(0.5)
            time.sleep(2.0)
            results.append(row("workload_api.agent_rss", rss_mib(agent.proc.pid), "MiB",
                               "the same agent with 1 SVID", rss_one, "report", {"cached_svids": cached}))
        finally:
            if agent is not None:
                agent.stop()
            server.stop()
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
