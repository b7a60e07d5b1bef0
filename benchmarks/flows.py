"""Flow discovery at scale: ingestion, store load, and reading 30 days of rollups.

- ingestion: flow counters per second one server process absorbs (8 attested agents, each with
  25 entries of its own, sending ReportFlows of 500 counters as fast as they can; the server's
  `trustmesh_flow_edges_reported_total` must equal what was sent, nothing dropped), against a
  loop in this process that only decodes the same serialized reports;
- store writes: N agents (real attestation, real mTLS, in worker processes) each reporting 20
  edges every 2 s, as agents do, on a real etcd: store transactions per second, read from the
  server's own `trustmesh_store_operations_total`, against the counters per second sent; then
  the same agents idle: store reads per second (goal 0);
- graph and simulate latency at 10,000 edges and 30 days of rollups, as the leader keeps
  them (hours merged into days, days into weeks, after the fill): `trustmesh graph
  --since 30d --format json` and `trustmesh policy simulate` as a user runs them (processes),
  against `trustmesh --version` (the CLI's own start-up) in the same run, plus the server's
  ListFlows time alone. The rollups are written offline through the server's own Store
  (sealed with its KEK) before it starts; the timings start once the leader's start-up
  compaction (hours into days, days into weeks) is over, the state of a server that ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import attested_channel, row  # noqa: E402
from tests.etcd_process import free_port, running_etcd  # noqa: E402
from tests.integration.harness import ServerProcess, trustmesh_cmd  # noqa: E402

TD = "example.org"
REPORT_SECONDS = 2.0  # what an agent's FlowReporter does (FLUSH_SECONDS)


# --- worker: many agents in one process --------------------------------------------------------


async def _worker_agent(index: int, token: str, source: str, cfg: dict[str, str], edges: int,
                        go: asyncio.Event, stop: asyncio.Event, sent: list[int]) -> None:
    from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc

    async with await attested_channel(token, cfg) as ch:
        stub = node_pb2_grpc.NodeStub(ch)
        await ch.channel_ready()
        sent[1] += 1
        await go.wait()
        await asyncio.sleep(random.random() * REPORT_SECONDS)  # agents do not report in lockstep
        while not stop.is_set():
            now = int(time.time())
            counters = [node_pb2.FlowCounter(source_id=source, destination_id=f"spiffe://{TD}/dst-{j}", port=8443,
                                             decision=node_pb2.FLOW_DECISION_ALLOW, rule=f"dst-{j} allow[0]",
                                             count=3, first_seen=now, last_seen=now, bytes_in=1200, bytes_out=5400)
                        for j in range(edges)]
            await stub.ReportFlows(node_pb2.ReportFlowsRequest(counters=counters), timeout=30)
            sent[0] += edges
            try:
                await asyncio.wait_for(stop.wait(), REPORT_SECONDS)
            except asyncio.TimeoutError:
                pass
        await asyncio.sleep(3600)  # idle phase: connected, reporting nothing, until killed


async def _worker_main(spec: dict[str, object]) -> None:
    tokens: list[str] = spec["tokens"]  # type: ignore[assignment]
    sources: list[str] = spec["sources"]  # type: ignore[assignment]
    go, stop, sent = asyncio.Event(), asyncio.Event(), [0, 0]
    pairs = enumerate(zip(tokens, sources, strict=True))
    tasks = [asyncio.create_task(_worker_agent(i, t, s, spec["cfg"], int(spec["edges"]),  # type: ignore[arg-type]
                                               go, stop, sent)) for i, (t, s) in pairs]
    while sent[1] < len(tokens):
        failed = [t for t in tasks if t.done() and t.exception() is not None]
        if failed:
            print(f"ERROR {failed[0].exception()!r}", flush=True)
            return
        await asyncio.sleep(0.05)
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    go.set()
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop"
    stop.set()
    await asyncio.sleep(REPORT_SECONDS + 1)
    print(f"SENT {sent[0]}", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # EOF: the end


# --- parent ------------------------------------------------------------------------------------


def _metric(address: str, name: str, label: str = "") -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#") and label in line)


READS = ("get", "range", "revision", "watch")  # the store operations that only read


def _store_ops(address: str, operations: tuple[str, ...]) -> float:
    return sum(_metric(address, "trustmesh_store_operations_total", f'operation="{op}"') for op in operations)


async def _register(server: ServerProcess, nodes: list[str]) -> tuple[list[str], list[str]]:
    """A join token and one entry (the flows' source) per node."""
    from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, types_pb2
    from trustmesh.naming import agent_id
    from trustmesh.spiffeid import TrustDomain
    from trustmesh.wire import selector_to_pb

    async with server.admin_channel() as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        sem = asyncio.Semaphore(64)

        async def one(node: str) -> tuple[str, str]:
            async with sem:
                token = await stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name=node), timeout=60)
                sid = f"spiffe://{TD}/svc-{node}"
                await stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=types_pb2.Entry(
                    spiffe_id=sid, parent_id=str(agent_id(TrustDomain(TD), node)),
                    selectors=[selector_to_pb("unix:uid:4242")])), timeout=60)
                return token.token, sid

        pairs = await asyncio.gather(*(one(n) for n in nodes))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def store_load(agents: int, workers: int, window: float, interval: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-flows-") as tmp, running_etcd() as etcd:
        metrics = f"127.0.0.1:{free_port()}"
        server = ServerProcess(data_dir=Path(tmp) / "server", store=f"{etcd.url}/flows{os.getpid()}",
                               env={"TRUSTMESH_KEK": "ab" * 32},
                               extra=["--metrics", metrics, "--attest-per-minute", "0",
                                      "--flow-rollup-interval", interval]).start()
        procs: list[subprocess.Popen[str]] = []
        try:
            tokens, sources = asyncio.run(_register(server, [f"fa-{i}" for i in range(agents)]))
            cfg = {"bind": server.bind, "attest": server.attest_bind, "bundle": str(server.bundle_path),
                   "dns": f"trustmesh-server.{TD}"}
            per = (agents + workers - 1) // workers
            for w in range(workers):
                spec = {"tokens": tokens[w * per:(w + 1) * per], "sources": sources[w * per:(w + 1) * per],
                        "cfg": cfg, "edges": 20}
                proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(spec) + "\n")
                proc.stdin.flush()
                procs.append(proc)
            for proc in procs:
                assert proc.stdout is not None
                line = proc.stdout.readline().strip()
                if line != "READY":
                    raise RuntimeError(f"a flows worker failed: {line}")
            time.sleep(2)  # attestation's own writes settle
            writes0 = _store_ops(metrics, ("txn",))
            started = time.monotonic()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            time.sleep(window)
            writes = _store_ops(metrics, ("txn",)) - writes0
            elapsed = time.monotonic() - started
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("stop\n")
                proc.stdin.flush()
            sent = 0
            for proc in procs:
                assert proc.stdout is not None
                sent += int(proc.stdout.readline().split()[1])
            kept = _metric(metrics, "trustmesh_flow_edges_reported_total")
            dropped = _metric(metrics, "trustmesh_flow_counters_dropped_total")
            if kept != sent or dropped:
                raise RuntimeError(f"the server kept {kept} of {sent} counters ({dropped} dropped)")
            time.sleep(1)
            reads0, all0 = _store_ops(metrics, READS), _metric(metrics, "trustmesh_store_operations_total")
            leases0 = _store_ops(metrics, ("lease",))
            idle0 = time.monotonic()
            time.sleep(window)
            reads = _store_ops(metrics, READS) - reads0
            idle = time.monotonic() - idle0
            leases = _store_ops(metrics, ("lease",)) - leases0
            others = _metric(metrics, "trustmesh_store_operations_total") - all0 - leases
        finally:
            for proc in procs:
                proc.kill()
            server.stop()
    return {"writes_per_s": writes / elapsed, "counters_per_s": sent / elapsed, "sent": sent, "kept": kept,
            "idle_reads_per_s": reads / idle, "idle_ops_per_s": others / idle, "window_s": round(elapsed, 1)}


async def _ingest(server: ServerProcess, clients: int, entries: int, reports: int,
                  per_report: int) -> tuple[float, int, bytes]:
    """K attested agents, each with `entries` entries of its own, send `reports` reports of
    `per_report` counters (its entries as sources, many destinations) as fast as they can."""
    from benchmarks.common import create_entries
    from tests.integration.node_client import NodeClient
    from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, node_pb2, node_pb2_grpc

    nodes = [f"in-{k}" for k in range(clients)]
    async with server.admin_channel() as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        tokens = [(await stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name=n), timeout=60)).token
                  for n in nodes]
    for k, node in enumerate(nodes):
        await create_entries(server, node, entries, prefix=f"in{k}-svc")
    attested = []
    for token in tokens:
        client = NodeClient(server)
        await client.attest(token)
        attested.append(client)
    now = int(time.time())

    def report(k: int) -> node_pb2.ReportFlowsRequest:
        # sources: this agent's own entries (so the server keeps them); destinations: the
        # other agents' entries and a few outside services, several ports and decisions.
        return node_pb2.ReportFlowsRequest(counters=[
            node_pb2.FlowCounter(source_id=f"spiffe://{TD}/in{k}-svc-{j % entries}",
                                 destination_id=f"spiffe://{TD}/in{(k + 1 + j % (clients - 1 or 1)) % clients}-svc-"
                                                f"{(j * 7) % entries}" if j % 5 else f"spiffe://{TD}/ext-{j % 40}",
                                 port=8443 + j % 3,
                                 decision=node_pb2.FLOW_DECISION_DENY if j % 17 == 0 else node_pb2.FLOW_DECISION_ALLOW,
                                 rule="" if j % 17 == 0 else f"dst-{j % 40} allow[0]", count=2,
                                 first_seen=now, last_seen=now, bytes_in=1000, bytes_out=4000)
            for j in range(per_report)])

    requests = [report(k) for k in range(clients)]

    async def send(client: NodeClient, request: node_pb2.ReportFlowsRequest) -> None:
        async with client.channel() as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            await stub.ReportFlows(request, timeout=60)  # the connection up before the clock starts
            await barrier.wait()
            for _ in range(reports):
                await stub.ReportFlows(request, timeout=60)

    barrier = asyncio.Barrier(clients + 1)
    tasks = [asyncio.create_task(send(c, r)) for c, r in zip(attested, requests, strict=True)]
    await barrier.wait()
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    return time.perf_counter() - started, clients * reports * per_report, requests[0].SerializeToString()


def ingestion(clients: int, entries: int, reports: int, per_report: int) -> dict[str, float]:
    from trustmesh._proto.trustmesh.v1 import node_pb2

    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-ingest-") as tmp:
        metrics = f"127.0.0.1:{free_port()}"
        server = ServerProcess(data_dir=Path(tmp) / "server", extra=["--metrics", metrics]).start()
        try:
            kept0 = _metric(metrics, "trustmesh_flow_edges_reported_total")
            elapsed, counters, wire = asyncio.run(_ingest(server, clients, entries, reports, per_report))
            kept = _metric(metrics, "trustmesh_flow_edges_reported_total") - kept0
            dropped = _metric(metrics, "trustmesh_flow_counters_dropped_total")
        finally:
            server.stop()
    # The reference: decoding the same reports in a bare loop (what any server must do at least).
    loops = max(50, clients * reports // 2)
    started = time.perf_counter()
    for _ in range(loops):
        node_pb2.ReportFlowsRequest.FromString(wire)
    decode = loops * per_report / (time.perf_counter() - started)
    expected = clients * (reports + 1) * per_report  # with each agent's warm-up report
    if kept != expected or dropped:
        raise RuntimeError(f"the server kept {kept} of {expected} counters ({dropped} dropped)")
    return {"rate": counters / elapsed, "decode": decode, "kept": kept, "dropped": dropped, "elapsed": elapsed}


# --- reading 30 days --------------------------------------------------------------------------


async def _fill(data_dir: Path, edges: int, hours: int, active: int, seed: int = 7) -> int:
    """Write `hours` of hourly rollups ending now, `edges` distinct edges, each active in one
    hour out of `active`, straight into the stopped server's store, sealed as the server seals."""
    from trustmesh.controlplane.ca.kek import KeyEncryptionKey
    from trustmesh.controlplane.flow_store import HOUR, SHARDS
    from trustmesh.controlplane.integrity import IntegrityMonitor
    from trustmesh.controlplane.store import open_store
    from trustmesh.controlplane.store.records import FlowShard
    from trustmesh.flows import Flow
    from trustmesh.metrics import Registry

    rand = random.Random(seed)
    store = await open_store("sqlite", data_dir)
    kek = KeyEncryptionKey.from_file(data_dir / "kek.bin")

    async def never() -> bool:
        return False

    await store.seal_records(kek.derive, IntegrityMonitor(Registry()), may_upgrade=never)
    now_hour = int(time.time() // HOUR)
    services = max(2, int(edges ** 0.5))
    all_edges = [(f"spiffe://{TD}/svc-{i % services}", f"spiffe://{TD}/svc-{(i // services + i + 1) % services}",
                  8000 + i // (services * services)) for i in range(edges)]
    rows = 0
    try:
        for hour in range(now_hour - hours + 1, now_hour + 1):
            parts: list[list[Flow]] = [[] for _ in range(SHARDS)]
            for i, (src, dst, port) in enumerate(all_edges):
                if (i + hour) % active == 0 or rand.random() < 0.01:
                    at = float(hour * HOUR + 60)
                    parts[i % SHARDS].append(Flow(src, dst, port, "allow", f"{dst} allow[0]", 10, 1000, 9000, at, at))
            shards = [FlowShard(hour, "bench-fill", i, tuple(p)) for i, p in enumerate(parts) if p]
            rows += sum(len(s.edges) for s in shards)
            await store.put_flow_shards(shards)
    finally:
        await store.close()
    return rows


def _settled(server: ServerProcess, quiet: float = 3.0, none_after: float = 15.0, limit: float = 300.0) -> int:
    """Wait until the leader's start-up compaction (hours merged into days, days into weeks,
    logged `flows_compacted` once per period) is over; how many periods it merged."""
    started = time.monotonic()
    count, changed = 0, started
    while time.monotonic() - started < limit:
        now = server.log().count("event=flows_compacted")
        if now != count:
            count, changed = now, time.monotonic()
        elif count and time.monotonic() - changed >= quiet:
            return count
        elif not count and time.monotonic() - started >= none_after:
            return 0
        time.sleep(0.25)
    raise RuntimeError(f"the server still compacts flows after {limit:.0f} s ({count} periods)")


def _timed(args: list[str], env: dict[str, str], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def _list_flows(server: ServerProcess, rounds: int) -> tuple[float, int, int]:
    from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc

    async with server.admin_channel() as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        times, edges, size = [], 0, 0
        for _ in range(rounds):
            started = time.perf_counter()
            reply = await stub.ListFlows(admin_pb2.ListFlowsRequest(since=int(time.time()) - 30 * 86400), timeout=600)
            times.append(time.perf_counter() - started)
            edges, size = len(reply.edges), reply.ByteSize()
        return statistics.median(times), edges, size


def reading(edges: int, hours: int, active: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-read-") as tmp:
        data = Path(tmp) / "server"
        server = ServerProcess(data_dir=data).start()  # creates the store, the KEK and the seal
        server.stop()
        rows = asyncio.run(_fill(data, edges, hours, active))
        server.start()
        try:
            compacted = _settled(server)  # the steady state: the leader merged old hours into days and weeks
            env = {**os.environ, "TRUSTMESH_ADMIN_SOCKET": str(server.admin_socket), "PYTHONPATH": str(ROOT)}
            server_side, seen, size = asyncio.run(_list_flows(server, rounds))
            proposed = Path(tmp) / "proposed"
            subprocess.run(trustmesh_cmd("policy", "suggest", "--since", "30d", str(proposed)), env=env, check=True,
                           capture_output=True, timeout=600)
            graph = _timed(trustmesh_cmd("graph", "--since", "30d", "--format", "json"), env, rounds)
            simulate = _timed(trustmesh_cmd("policy", "simulate", str(proposed), "--since", "30d"), env, rounds)
            startup = _timed(trustmesh_cmd("--version"), env, rounds)
        finally:
            server.stop()
    return {"graph": graph, "simulate": simulate, "startup": startup, "list_flows": server_side, "edges": seen,
            "rows": rows, "reply_bytes": size, "compacted": compacted}


def run(quick: bool) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    clients, entries, reports, per_report = (4, 25, 20, 500) if quick else (8, 25, 50, 500)
    got = ingestion(clients, entries, reports, per_report)
    results.append(row("flows.ingestion", got["rate"], "counters/s", "decoding the same reports in a bare loop",
                       got["decode"], "report", {
                           "agents": clients, "entries_per_agent": entries, "reports_each": reports,
                           "counters_per_report": per_report, "store": "sqlite", "elapsed_s": round(got["elapsed"], 2),
                           "server_kept_counters": int(got["kept"]), "server_dropped_counters": int(got["dropped"]),
                           "client": "one asyncio process, one mTLS channel per agent, reports pre-built"}))

    # The window covers at least 3 rollup intervals (4 in both).
    agents, workers, window, interval = (60, 2, 8.0, "2s") if quick else (1000, 4, 40.0, "10s")
    load = store_load(agents, workers, window, interval)
    params = {"agents": agents, "edges_per_agent": 20, "distinct_edges": agents * 20,
              "report_every_s": REPORT_SECONDS, "store": "etcd (one member, same machine)",
              "flow_rollup_interval": interval, "window_s": load["window_s"], "worker_processes": workers,
              "counters_sent": int(load["sent"]), "counters_kept_by_server": int(load["kept"]),
              "counted": "store transactions (every put and delete is one), leases excluded"}
    results.append(row(f"flows.store_writes.{agents}x20", load["writes_per_s"], "store writes/s",
                       "flow counters sent per second", load["counters_per_s"], "< 100", params))
    results.append(row(f"flows.idle_reads.{agents}", load["idle_reads_per_s"], "store reads/s",
                       "none: the goal is 0", 0.0, "0",
                       {**params, "counted": "get, range, revision and watch operations while no agent reports",
                        "all_non_lease_ops_per_s": round(load["idle_ops_per_s"], 3)}, ratio=0.0))

    edges, hours, active = (1_000, 48, 24) if quick else (10_000, 720, 24)
    read = reading(edges, hours, active, 1 if quick else 3)
    params = {"edges": edges, "days": hours // 24, "stored_edge_rows": read["rows"], "edges_returned": read["edges"],
              "model": f"hourly rollups; each edge active in one fixed hour of every {active} (plus 1% of "
                       "hours at random)", "store": "sqlite (filled offline through the server's Store, sealed)",
              "list_flows_server_s": round(read["list_flows"], 3), "list_flows_reply_bytes": read["reply_bytes"],
              "periods_compacted_at_start": read["compacted"],
              "timing": f"median of {1 if quick else 3} run(s) of the CLI as a process, after the leader's start-up "
                        "compaction"}
    results.append(row("flows.graph_latency", read["graph"], "s", "`trustmesh --version` (CLI start-up), same run",
                       read["startup"], "< 1 s", params))
    results.append(row("flows.simulate_latency", read["simulate"], "s",
                       "`trustmesh --version` (CLI start-up), same run", read["startup"], "< 1 s", params))
    results.append(row("flows.graph_latency.list_flows_server", read["list_flows"], "s",
                       "`trustmesh graph --since 30d` wall time, same run", read["graph"], "report",
                       {**params, "measured": "one ListFlows call on the admin socket (gRPC, already connected), "
                                              "median of 3"}))
    return results


if __name__ == "__main__":
    if "--worker" in sys.argv:
        asyncio.run(_worker_main(json.loads(sys.stdin.readline())))
    else:
        print(json.dumps(run("--quick" in sys.argv), indent=2))
