"""X.509-SVID issuance through the real Node API, against the bare signing loop.

The server is a real `trustmesh server run` process (SQLite, then etcd). A node attests with
a join token and asks for SVIDs over mTLS with BatchSignX509, as an agent does: the server
authenticates the node, checks each entry is the node's, parses and checks each CSR, signs,
and writes one audit event per batch. The reference is the same CSR-parse + build + sign
loop with `cryptography` in one process, no network, no store: what one core can do at
best. Measured: SVIDs per second with batches of 100 (on one connection, IN_FLIGHT batches
outstanding, as several agents renewing at once), and the latency of a batch of 1 and of
100 (p50, p99). The server signs on worker processes (`--signing-workers`): the SQLite run
is made with 1 and with 2 workers, each rate against the bare loop of the same run.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import create_entries, percentile, row  # noqa: E402
from tests.etcd_process import running_etcd  # noqa: E402
from tests.integration.harness import ServerProcess  # noqa: E402
from tests.integration.node_client import NodeClient  # noqa: E402
from trustmesh.keys import generate_private_key  # noqa: E402
from trustmesh.spiffeid import SpiffeId, TrustDomain  # noqa: E402
from trustmesh.x509svid import build_ca_certificate, build_csr, build_leaf_certificate, parse_csr  # noqa: E402

GOAL = ">= 1.0"
IN_FLIGHT = 4


def reference_rate(csrs: list[bytes], seconds: float) -> float:
    """SVIDs per second of the bare loop: parse the CSR, build the leaf, sign it."""
    td = TrustDomain("example.org")
    key = generate_private_key()
    now = datetime.now(timezone.utc)
    ca = build_ca_certificate(trust_domain=td, public_key=key.public_key(), issuer=None, issuer_key=key,
                              not_before=now, not_after=now + timedelta(days=1), path_length=0, common_name="ref")
    spiffe_id = SpiffeId.parse("spiffe://example.org/svc")
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        csr = parse_csr(csrs[done % len(csrs)])
        build_leaf_certificate(spiffe_id=spiffe_id, public_key=csr.public_key(), issuer=ca,  # type: ignore[arg-type]
                               issuer_key=key, not_before=now, not_after=now + timedelta(hours=1))
        done += 1
    return done / (time.perf_counter() - started)


async def measure(server: ServerProcess, csrs: list[bytes], seconds: float, latency_rounds: int
                  ) -> dict[str, float]:
    node = NodeClient(server)
    await node.attest(server.cli("token", "create", "--node", "bench-1", check=True).stdout.strip())
    entry_ids = await create_entries(server, "bench-1", 100)
    from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc

    async with node.channel() as channel:
        stub = node_pb2_grpc.NodeStub(channel)

        async def batch(n: int) -> float:
            req = node_pb2.BatchSignX509Request(items=[
                node_pb2.X509SignItem(entry_id=entry_ids[i % len(entry_ids)], csr=csrs[i % len(csrs)])
                for i in range(n)])
            started = time.perf_counter()
            reply = await stub.BatchSignX509(req, timeout=60)
            elapsed = time.perf_counter() - started
            bad = [r for r in reply.results if r.HasField("error")]
            if bad:
                raise RuntimeError(f"issuance failed: {bad[0].error.message}")
            return elapsed

        await asyncio.gather(*(batch(10) for _ in range(IN_FLIGHT)))  # warm-up: connection, workers, caches
        issued, started = 0, time.perf_counter()

        async def keep_busy() -> None:
            nonlocal issued
            while time.perf_counter() - started < seconds:
                await batch(100)
                issued += 100

        await asyncio.gather(*(keep_busy() for _ in range(IN_FLIGHT)))
        rate = issued / (time.perf_counter() - started)
        one = [await batch(1) for _ in range(latency_rounds)]
        hundred = [await batch(100) for _ in range(max(5, latency_rounds // 10))]
    return {"rate": rate, "p50_1": percentile(one, 50), "p99_1": percentile(one, 99),
            "p50_100": percentile(hundred, 50), "p99_100": percentile(hundred, 99)}


def run(quick: bool) -> list[dict[str, object]]:
    seconds, rounds = (1.5, 30) if quick else (15.0, 300)
    csrs = [build_csr(generate_private_key()) for _ in range(64)]
    results: list[dict[str, object]] = []
    # (store, signing workers, whether the latency rows come from this run)
    runs = [("sqlite", 1, False), ("sqlite", 2, True), ("etcd", 2, True)]
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-issuance-") as tmp, running_etcd() as etcd:
        for store, workers, latencies in runs:
            url = "sqlite" if store == "sqlite" else f"{etcd.url}/bench{uuid.uuid4().hex[:8]}"
            server = ServerProcess(data_dir=Path(tmp) / f"{store}-{workers}", store=url,
                                   extra=["--signing-workers", str(workers)], env={"TRUSTMESH_KEK": "33" * 32})
            server.start()
            try:
                got = asyncio.run(measure(server, csrs, seconds, rounds))
            finally:
                server.stop()
            ref = reference_rate(csrs, min(seconds, 5.0))
            params = {"store": store, "batch": 100, "in_flight": IN_FLIGHT, "seconds": seconds,
                      "signing_workers": workers, "audit": "one event per batch",
                      "transport": "gRPC over mTLS, one connection", "client": "same machine"}
            results.append(row(f"issuance.{store}.rate.workers{workers}", got["rate"], "SVIDs/s",
                               "bare CSR-parse+build+sign loop, 1 process, same run", ref, GOAL, params))
            if not latencies:
                continue
            for size in (1, 100):
                results.append(row(
                    f"issuance.{store}.batch{size}.latency_p99", got[f"p99_{size}"] * 1000, "ms",
                    "p50 of the same run", got[f"p50_{size}"] * 1000, "report (p99/p50)",
                    {"store": store, "batch": size, "rounds": rounds if size == 1 else max(5, rounds // 10)}))
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
