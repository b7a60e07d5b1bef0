"""Per-agent sync cost as the registry grows, and the server's memory.

Each node has a fixed 100 entries; the registry grows from SMALL to LARGE entries by adding
nodes. Measured: the time for one agent to receive its full snapshot (its 100 entries, the
bundle, the policy) over a fresh Sync stream, median of several, at both sizes; the ratio
large/small is the goal (<= 1.3: an agent's cost must not grow with everyone else's entries).
And the server's resident memory at the large size.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import create_entries, row  # noqa: E402
from benchmarks.workload import rss_mib  # noqa: E402
from tests.integration.harness import ServerProcess  # noqa: E402
from tests.integration.node_client import NodeClient, SyncReader  # noqa: E402

PER_NODE = 100


async def _grow(server: ServerProcess, nodes: range) -> None:
    for n in nodes:
        await create_entries(server, f"node-{n}", PER_NODE, prefix=f"n{n}-svc", parallel=64)


async def _sync_time(node: NodeClient, rounds: int) -> float:
    times = []
    async with node.channel() as channel:
        for _ in range(rounds):
            started = time.perf_counter()
            sync = SyncReader(channel)
            pages, _ = await sync.snapshot(timeout=60)
            times.append(time.perf_counter() - started)
            entries = sum(len(p.snapshot.entries) for p in pages)
            if entries != PER_NODE:
                raise RuntimeError(f"the agent received {entries} entries, expected {PER_NODE}")
            sync.cancel()
    return statistics.median(times)


def run(quick: bool) -> list[dict[str, object]]:
    small, large = (500, 2_500) if quick else (10_000, 100_000)
    rounds = 10 if quick else 30
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-scale-") as tmp:
        server = ServerProcess(data_dir=Path(tmp) / "server").start()
        try:
            node = NodeClient(server)
            asyncio.run(node.attest(server.cli("token", "create", "--node", "node-0", check=True).stdout.strip()))
            started = time.monotonic()
            asyncio.run(_grow(server, range(small // PER_NODE)))
            at_small = asyncio.run(_sync_time(node, rounds))
            asyncio.run(_grow(server, range(small // PER_NODE, large // PER_NODE)))
            fill = time.monotonic() - started
            at_large = asyncio.run(_sync_time(node, rounds))
            assert server.proc is not None
            rss = rss_mib(server.proc.pid)
        finally:
            server.stop()
    params = {"entries_per_node": PER_NODE, "small": small, "large": large, "rounds": rounds, "store": "sqlite",
              "fill_seconds": round(fill, 1)}
    return [
        row("scale.sync_cost_ratio", at_large, "s per snapshot", f"the same at {small:,} entries", at_small,
            "<= 1.3", params),
        row("scale.server_rss", rss, "MiB", "none (reported)", 0.0, "report", {**params, "at_entries": large},
            ratio=0.0),
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
