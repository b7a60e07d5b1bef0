"""Continuous verification, live: from an anomalous flow report to the quarantine in force at
every agent (issue 17: p99 under 1 s at 100 agents).

A real `trustmesh server run` (SQLite, `--learn 0s` so no identity waits out a learning
period, no dry run) with a Response document that quarantines on the sweep detector, and N
lightweight agents (real attestation, real mTLS, the real Node protocol) each holding a Sync
stream, as an agent's sync loop does. N - 1 of them run in worker processes; the last one,
agent A (node `reporter`, which runs the identities `spiffe://example.org/bench/src-<i>`:
the server keeps, and so detects on, a counter only when the reporting agent runs its source
or destination), runs in this process and both syncs and reports over one channel, as a real
agent does.

A round: agent A sends ONE ReportFlows holding 6 denied counters from a fresh source src-<i>
to 6 distinct destinations (the sweep detector's threshold: 6 distinct denied destination
ports within 5 min, no baseline needed). The server detects the sweep inside that call
(issuance.report_flows -> detection.observe -> quarantine.add, which stores the record) and
the registry view puts src-<i> into every agent's compiled policy from the store's change
feed. The clock starts when the call is sent (and, reported apart, when it returns); it stops
for each agent when its Sync stream delivers a policy whose `quarantined` holds src-<i>. The
round's latency is the slowest agent's.

Reference, same run, same fleet, interleaved round by round: a plain `policy apply` (the
admin ApplyPolicy RPC, from its send) in force at every agent, the slowest agent again, as
benchmarks/fleet.py measures it. The ratio is what detection and the quarantine path add.

Also from the server's own log (millisecond timestamps, no server change needed): from the
report's send to the `anomaly` line (the sweep detected, logged before acting) and to the
`quarantine_added` line (logged once the record is stored AND its audit event written). No
line marks the store write alone; it lies between the two. Both lines come before ReportFlows
returns, and the change feed fans the record out while the audit write is under way, so the
agents usually have the quarantine before the reply (a negative "from return" latency).

Everything runs on one machine, so the agents and this process take CPU from the server.

    python -m benchmarks.quarantine [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import attested_channel, percentile, row  # noqa: E402
from tests.etcd_process import free_port  # noqa: E402
from tests.integration.harness import ServerProcess  # noqa: E402

TD = "example.org"
REPORTER = "reporter"
SOURCE = f"spiffe://{TD}/bench/src-{{i}}"
DESTINATIONS = 6  # engine.SWEEP_MIN_TARGETS: the fewest distinct denied (destination, port) pairs that alert
PAUSE = 0.5  # between rounds, as fleet.py: the previous round's writes (audit, flow audit) settle
ROUND_TIMEOUT = 30.0

RESPONSE = """apiVersion: trustmesh/v1
kind: Response
metadata: {name: bench}
spec:
  rules:
    - {identity: "*", detectors: [sweep], action: quarantine, above: 0.5}
"""

# Every apply carries the Response document too: ApplyPolicy replaces the whole policy, and
# dropping it would stop the quarantines.
ALLOWLIST = """---
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: bench-{k}}}
spec:
  destination: spiffe://example.org/ledger
  ports: [8443]
  allow:
    - from: spiffe://example.org/payments-{k}
"""


# --- one agent: a Sync stream, what arrives on it ------------------------------------------


async def _sync(index: int, channel: Any, emit: Callable[[str], None], ready: Callable[[], None]) -> None:
    """Hold a Sync stream; emit `P index revision ts` when the policy revision changes and
    `Q index target ts` when an ID enters the policy's `quarantined`, stamped on receipt."""
    from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc

    stream = node_pb2_grpc.NodeStub(channel).Sync(node_pb2.SyncRequest())
    revision, synced = 0, False
    quarantined: set[str] = set()
    async for message in stream:
        now = time.time()
        body = message.WhichOneof("body")
        part = getattr(message, body)
        if part.HasField("policy"):
            policy = part.policy
            if policy.revision != revision:
                revision = policy.revision
                emit(f"P {index} {revision} {now:.6f}")
            for target in policy.quarantined:
                if target not in quarantined:
                    quarantined.add(target)
                    emit(f"Q {index} {target} {now:.6f}")
        if body == "snapshot" and part.last and not synced:
            synced = True
            ready()


# --- worker: many agents in one process ------------------------------------------------------


async def _worker_agent(index: int, token: str, cfg: dict[str, str], ready: Callable[[], None]) -> None:
    async with await attested_channel(token, cfg) as channel:
        await _sync(index, channel, lambda line: print(line, flush=True), ready)


async def _worker_main(spec: dict[str, Any]) -> None:
    tokens: list[str] = spec["tokens"]
    synced = [0]
    done = asyncio.Event()

    def ready() -> None:
        synced[0] += 1
        if synced[0] == len(tokens):
            done.set()

    tasks = []
    for i, token in enumerate(tokens):
        tasks.append(asyncio.create_task(_worker_agent(int(spec["first"]) + i, token, spec["cfg"], ready)))
        if i % 25 == 24:
            await asyncio.sleep(0.05)  # a fleet does not attest in one instant either
    waiter = asyncio.create_task(done.wait())
    finished, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if waiter in finished:
        print(f"READY {len(tokens)}", flush=True)
        finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in finished:
        if task is not waiter:
            # A stream that ends is a lost agent: the parent fails the run rather than wait.
            print(f"ERROR agent stream ended: {task.exception()!r}", flush=True)


# --- parent -----------------------------------------------------------------------------------


async def _register(server: ServerProcess, nodes: list[str], sources: int) -> list[str]:
    """A join token per node; `sources` entries src-<i> run by the reporter's node."""
    from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, types_pb2
    from trustmesh.naming import agent_id
    from trustmesh.spiffeid import TrustDomain
    from trustmesh.wire import selector_to_pb

    async with server.admin_channel() as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        sem = asyncio.Semaphore(32)

        async def token(node: str) -> str:
            async with sem:
                reply = await stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name=node), timeout=60)
                return str(reply.token)

        async def entry(i: int) -> None:
            async with sem:
                await stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=types_pb2.Entry(
                    spiffe_id=SOURCE.format(i=i), parent_id=str(agent_id(TrustDomain(TD), REPORTER)),
                    selectors=[selector_to_pb(f"unix:uid:{20000 + i}")])), timeout=60)

        tokens = await asyncio.gather(*(token(n) for n in nodes))
        await asyncio.gather(*(entry(i) for i in range(sources)))
    return list(tokens)


def _sweep(i: int) -> Any:
    """One report: src-<i> denied on DESTINATIONS distinct destinations (default deny, no rule)."""
    from trustmesh._proto.trustmesh.v1 import node_pb2

    now = int(time.time())
    return node_pb2.ReportFlowsRequest(counters=[
        node_pb2.FlowCounter(source_id=SOURCE.format(i=i), destination_id=f"spiffe://{TD}/bench/dst-{j}", port=8443,
                             decision=node_pb2.FLOW_DECISION_DENY, count=1, first_seen=now, last_seen=now)
        for j in range(DESTINATIONS)])


class _Lines:
    """What the agents saw, as `P`/`Q` lines, from the workers' pipes and agent A alike."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    def put(self, line: str) -> None:  # from this loop
        self.queue.put_nowait(line)

    def follow(self, proc: subprocess.Popen[str]) -> None:
        """Forward a worker's stdout from a thread (its reads block)."""
        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self._loop.call_soon_threadsafe(self.queue.put_nowait, line.strip())
            self._loop.call_soon_threadsafe(self.queue.put_nowait, f"ERROR worker {proc.pid} exited")
        threading.Thread(target=pump, daemon=True).start()

    async def collect(self, kind: str, what: str, n: int) -> dict[int, float]:
        """When each of the n agents saw `what` (a revision for P, a target for Q)."""
        seen: dict[int, float] = {}
        deadline = time.monotonic() + ROUND_TIMEOUT
        while len(seen) < n:
            try:
                line = await asyncio.wait_for(self.queue.get(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                raise RuntimeError(f"{kind} {what}: {len(seen)} of {n} agents in {ROUND_TIMEOUT:.0f} s") from None
            parts = line.split()
            if parts[0] == "ERROR":
                raise RuntimeError(line)
            if parts[0] == kind and parts[2] == what:
                seen.setdefault(int(parts[1]), float(parts[3]))
        return seen


_LOG = re.compile(r"^ts=(\S+)Z .*?event=(anomaly|quarantine_added) (.*)$")


def _server_times(log: str) -> tuple[dict[str, float], dict[str, float]]:
    """From the server's log: when the sweep on each identity was detected (`anomaly`, logged
    before acting) and when its quarantine was stored and audited (`quarantine_added`)."""
    detected: dict[str, float] = {}
    stored: dict[str, float] = {}
    for line in log.splitlines():
        match = _LOG.match(line)
        if match is None:
            continue
        at = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
        fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', match.group(3)))
        if match.group(2) == "anomaly" and fields.get("detector") == "sweep":
            detected.setdefault(fields.get("identity", ""), at)
        elif match.group(2) == "quarantine_added":
            stored.setdefault(fields.get("target", ""), at)
    return detected, stored


async def _measure(server: ServerProcess, n: int, workers: int, rounds: int) -> dict[str, Any]:
    from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, node_pb2_grpc

    lines = _Lines(asyncio.get_running_loop())
    fleet = [f"qa-{k}" for k in range(n - 1)]
    tokens = await _register(server, [*fleet, REPORTER], rounds)
    cfg = {"bind": server.bind, "attest": server.attest_bind, "bundle": str(server.bundle_path),
           "dns": f"trustmesh-server.{TD}"}
    procs: list[subprocess.Popen[str]] = []
    reporter_sync: asyncio.Task[None] | None = None
    try:
        per = (n - 1 + workers - 1) // workers
        for w in range(workers):
            part = tokens[w * per:min(n - 1, (w + 1) * per)]
            if not part:
                continue
            proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"tokens": part, "first": w * per, "cfg": cfg}))
            proc.stdin.close()
            lines.follow(proc)
            procs.append(proc)
        reporter = await attested_channel(tokens[-1], cfg)
        async with reporter:
            a_ready = asyncio.Event()
            reporter_sync = asyncio.create_task(_sync(n - 1, reporter, lines.put, a_ready.set))
            ready, deadline = 0, time.monotonic() + 60 + n * 0.2
            while ready < n - 1:
                line = await asyncio.wait_for(lines.queue.get(), max(1.0, deadline - time.monotonic()))
                if line.startswith("READY"):
                    ready += int(line.split()[1])
                elif line.startswith("ERROR"):
                    raise RuntimeError(line)
            await asyncio.wait_for(a_ready.wait(), 30)
            node = node_pb2_grpc.NodeStub(reporter)
            async with server.admin_channel() as admin_channel:
                admin = admin_pb2_grpc.AdminStub(admin_channel)

                async def apply(k: int) -> tuple[int, float]:
                    sent = time.time()
                    reply = await admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(
                        documents=RESPONSE + ALLOWLIST.format(k=k), author="bench", comment=f"bench {k}"), timeout=60)
                    return int(reply.revision), sent

                revision, _ = await apply(0)  # the Response rule in force before any report
                await lines.collect("P", str(revision), n)
                await asyncio.sleep(2.0)  # the attestation storm's writes settle
                quarantine: list[dict[str, float]] = []
                reference: list[float] = []
                agents_q: list[float] = []
                agents_p: list[float] = []
                for i in range(rounds):
                    request = _sweep(i)
                    sent = time.time()
                    await node.ReportFlows(request, timeout=60)
                    returned = time.time()
                    seen = await lines.collect("Q", SOURCE.format(i=i), n)
                    slowest = max(seen.values())
                    quarantine.append({"sent": sent, "returned": returned, "slowest": slowest})
                    agents_q += [t - sent for t in seen.values()]
                    await asyncio.sleep(PAUSE)
                    # The reference round, interleaved so that both see the same machine.
                    revision, applied = await apply(i + 1)
                    seen = await lines.collect("P", str(revision), n)
                    reference.append(max(seen.values()) - applied)
                    agents_p += [t - applied for t in seen.values()]
                    await asyncio.sleep(PAUSE)
    finally:
        if reporter_sync is not None:
            reporter_sync.cancel()
        for proc in procs:
            proc.kill()
            proc.wait(10)
    return {"quarantine": quarantine, "reference": reference, "agents_q": agents_q, "agents_p": agents_p}


def measure(n: int, workers: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-quarantine-") as tmp:
        # The whole fleet attests from one address: lift the per-source attestation limit.
        server = ServerProcess(data_dir=Path(tmp) / "server",
                               extra=["--metrics", f"127.0.0.1:{free_port()}", "--attest-per-minute", "0",
                                      "--learn", "0s"]).start()
        try:
            got = asyncio.run(_measure(server, n, workers, rounds))
        finally:
            server.stop()
            log = server.log()
    detected, stored = _server_times(log)
    got["detected"], got["recorded"] = [], []
    for i, r in enumerate(got["quarantine"]):
        source = SOURCE.format(i=i)
        if source not in detected or source not in stored:
            raise RuntimeError(f"the server logged no anomaly or no quarantine_added for {source}")
        got["detected"].append(detected[source] - r["sent"])
        got["recorded"].append(stored[source] - r["sent"])
    return got


def _ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50) * 1000, 1), "p99_ms": round(percentile(values, 99) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1)}


def run(quick: bool) -> list[dict[str, object]]:
    # Quick: the goal's 100 agents still, fewer rounds. A p99 over R rounds is the largest
    # value when R < 100 (benchmarks/common.percentile): so 100 rounds in a full run.
    n, workers, rounds = (100, 2, 10) if quick else (100, 2, 100)
    got = measure(n, workers, rounds)
    q = got["quarantine"]
    from_send = [r["slowest"] - r["sent"] for r in q]
    from_return = [r["slowest"] - r["returned"] for r in q]
    rpc = [r["returned"] - r["sent"] for r in q]
    reference = got["reference"]
    params: dict[str, object] = {
        "agents": n, "worker_processes": workers, "rounds": rounds, "store": "sqlite", "server_processes": 1,
        "learn": "0s", "response": "identity *, detector sweep, quarantine above 0.5",
        "report": f"one ReportFlows, {DESTINATIONS} denied counters from a fresh source to distinct destinations",
        "measured": "ReportFlows sent -> the slowest agent's Sync stream delivers a policy quarantining the source",
        "round_latency_from_send": _ms(from_send), "round_latency_from_return": _ms(from_return),
        "report_rpc": _ms(rpc), "every_agent_from_send": _ms(got["agents_q"]),
        "reference_round": _ms(reference), "reference_every_agent": _ms(got["agents_p"]),
        "machine": f"{os.cpu_count()} cores shared with the agents, this process and whatever else runs"}
    server_side = {**params, "sent_to_detected": _ms(got["detected"]), "sent_to_recorded": _ms(got["recorded"]),
                   "timestamps": "the server's log lines, to the millisecond, against this process's send time"}
    return [
        row(f"quarantine.in_force.{n}.p99", percentile(from_send, 99), "s",
            "plain `policy apply` in force at every agent (slowest agent, p99), same fleet, same run",
            percentile(reference, 99), "p99 < 1 s at 100 agents", params),
        row(f"quarantine.report_to_detected.{n}.p99", percentile(got["detected"], 99), "s",
            "the ReportFlows round trip (p99), same rounds", percentile(rpc, 99), "report",
            {**server_side, "measured": "ReportFlows sent -> the server logs the sweep (event=anomaly)"}),
        row(f"quarantine.report_to_recorded.{n}.p99", percentile(got["recorded"], 99), "s",
            "the whole path: quarantine in force at every agent (p99), same rounds", percentile(from_send, 99),
            "report", {**server_side, "measured": "ReportFlows sent -> the server logs quarantine_added: the record "
                                                  "stored and its quarantine.add audit event written"}),
    ]


def _table(results: list[dict[str, object]]) -> str:
    params: dict[str, Any] = results[1]["params"]  # type: ignore[assignment]  # it has them all

    rows = [("measured (slowest agent per round unless said)", "p50 ms", "p99 ms", "max ms"),
            ("report sent -> quarantine in force at every agent", *_cols(params["round_latency_from_send"])),
            ("report returned -> quarantine in force at every agent", *_cols(params["round_latency_from_return"])),
            ("reference: policy apply sent -> in force at every agent", *_cols(params["reference_round"])),
            ("report sent -> each agent (all agents, all rounds)", *_cols(params["every_agent_from_send"])),
            ("policy apply sent -> each agent (all agents, all rounds)", *_cols(params["reference_every_agent"])),
            ("ReportFlows round trip", *_cols(params["report_rpc"])),
            ("report sent -> server logs the sweep (anomaly)", *_cols(params["sent_to_detected"])),
            ("report sent -> server logs quarantine_added (stored, audited)", *_cols(params["sent_to_recorded"]))]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |" for r in rows]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _cols(stats: dict[str, float]) -> tuple[str, str, str]:
    return f"{stats['p50_ms']:.1f}", f"{stats['p99_ms']:.1f}", f"{stats['max_ms']:.1f}"


if __name__ == "__main__":
    if "--worker" in sys.argv:
        asyncio.run(_worker_main(json.loads(sys.stdin.read())))
    else:
        results = run("--quick" in sys.argv)
        print(json.dumps(results, indent=2))
        print(_table(results))
