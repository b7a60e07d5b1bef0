"""Continuous verification on the server: every flow report feeds the detection engine
(trustmesh/detect/engine.py, the one `trustmesh detect replay` runs) as it arrives, and
what the response policy decides happens here: an alert is logged, counted
(`trustmesh_anomalies_total{detector,action}`), audited (`detect.anomaly`) and posted to
the webhooks; a quarantine goes through the quarantine service, which stores it, audits it
with its evidence and reaches every agent through the compiled policy.

A report becomes trace records (the replay format) stamped with the server's clock. The node
is where the source ran: the reporting agent's own node when it runs the source; otherwise
the node whose agent talks to the server from the caller's address (the inbound listener
reports the client's host), the address itself when no node is there (a credential used from
a host that is no node of ours), or unknown ("") when several nodes share it (NAT, one
host). The same records go to the per-minute trace (`flows export --format jsonl`).

What the engine learned is saved every SAVE_SECONDS and at stop, sealed with the KEK
(AES-GCM: baselines say what every identity does, and a forged one would blind the detectors),
in `<data-dir>/detection-state.sealed`; a restart picks it up, so an upgrade does not start
a new learning period. A state that fails to open or to validate is refused loudly and the
engine learns afresh. With several replicas each one learns from the reports of its own
agents.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx

from trustmesh.controlplane.flow_audit import FlowCounter
from trustmesh.controlplane.flow_store import decision_of
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import AttestedNode
from trustmesh.detect.engine import Alert, Engine, StateError, alert_to_dict, engine_state, restore_engine
from trustmesh.detect.trace import UNVERIFIED_PREFIX, TraceRecord
from trustmesh.errors import TrustmeshError
from trustmesh.files import atomic_write
from trustmesh.logs import log_event
from trustmesh.naming import node_name_of
from trustmesh.policy import Policy
from trustmesh.policy.responses import ResponsePolicy
from trustmesh.spiffeid import SpiffeId

log = logging.getLogger("trustmesh.detect")

WEBHOOK_QUEUE = 1_000  # alerts waiting for the webhooks; past it they are dropped (and counted)
WEBHOOK_TIMEOUT = 5.0
DETECTOR_ACTOR = "detector"
SAVE_SECONDS = 300.0
STATE_FILE = "detection-state.sealed"
_STATE_AAD = b"trustmesh detection state v1"
MAX_STATE_BYTES = 256 * 1024 * 1024


class Sealer(Protocol):
    """The KEK: authenticated encryption of what is kept on disk."""

    def seal(self, plaintext: bytes, aad: bytes) -> bytes: ...

    def open(self, blob: bytes, aad: bytes) -> bytes: ...


class Quarantines(Protocol):
    """What the quarantine service offers the detectors."""

    async def add(self, target: str, kind: str, reason: str, actor: str, *, node: str = "",
                  evidence: Sequence[str] = (), detector: str = "", score: float = 0.0) -> object: ...


class TraceSink(Protocol):
    def add(self, records: Iterable[TraceRecord]) -> None: ...


class PolicyView(Protocol):
    """The registry view's answers: the policy in force (with its Response documents), the
    attested nodes."""

    @property
    def policy(self) -> Policy: ...

    def attested_nodes(self) -> Iterable[AttestedNode]: ...


def report_records(node: str, now: float, counters: Iterable[tuple[FlowCounter, bool]],
                   node_at: Callable[[str], str] = lambda _address: "") -> list[TraceRecord]:
    """Trace records of one agent's report: (counter, whether the agent runs its source);
    `node_at` names the node at a caller's address."""
    records = []
    for c, runs_source in counters:
        if c.unverified:
            source, where = f"{UNVERIFIED_PREFIX}{c.source_address}", ""
        else:
            source = c.source_id
            where = node if runs_source else node_at(c.source_address) if c.source_address else ""
        records.append(TraceRecord(now, where, source, c.destination_id, c.port, decision_of(c), c.count,
                                   c.bytes_in, c.bytes_out))
    return records


class NodeAddresses:
    """Which node talks to the server from an address (AttestedNode.renewed_from), rebuilt at
    most every REFRESH_SECONDS: nodes move rarely, reports come every 2 s from each agent."""

    REFRESH_SECONDS = 10.0

    def __init__(self, nodes: Callable[[], Iterable[AttestedNode]], clock: Callable[[], float]) -> None:
        self._nodes = nodes
        self._clock = clock
        self._by_host: dict[str, str] = {}
        self._built = float("-inf")

    def __call__(self, address: str) -> str:
        now = self._clock()
        if now - self._built > self.REFRESH_SECONDS:
            by_host: dict[str, str] = {}
            for n in self._nodes():
                if n.renewed_from:
                    # Two nodes behind one address: which one it was cannot be told.
                    by_host[n.renewed_from] = "" if n.renewed_from in by_host else n.node_name
            self._by_host, self._built = by_host, now
        try:
            host = str(ipaddress.ip_address(address))
        except ValueError:
            return ""
        return self._by_host.get(host, host)


class DetectionService:
    def __init__(self, rt: ServerRuntime, view: PolicyView, quarantines: Quarantines,
                 trace: TraceSink | None = None, *, learn: float, dry_run: bool = False,
                 webhooks: Sequence[str] = (), state_dir: Path | None = None, sealer: Sealer | None = None) -> None:
        self._rt = rt
        self._state = state_dir / STATE_FILE if state_dir is not None and sealer is not None else None
        self._sealer = sealer
        self._view = view
        self._quarantines = quarantines
        self._trace = trace
        self._dry_run = dry_run
        self._responses_of = -1  # the policy revision the engine's responses come from
        self._quarantined: frozenset[str] = frozenset()
        self.engine = Engine(ResponsePolicy(force_dry_run=dry_run), learn=learn)
        self._webhooks = tuple(webhooks)
        self._outbox: asyncio.Queue[dict[str, object]] = asyncio.Queue(WEBHOOK_QUEUE)
        metrics = rt.metrics
        self._anomalies = metrics.counter("trustmesh_anomalies_total", "anomalies the response policy acted on",
                                          ["detector", "action"])
        self._webhook_failures = metrics.counter("trustmesh_alert_webhook_failures_total",
                                                 "alerts a webhook did not take (error, timeout or full queue)")
        self._identities = metrics.gauge("trustmesh_detection_identities", "identities with a baseline")
        self._node_at = NodeAddresses(view.attested_nodes, rt.clock)

    def _responses(self) -> None:
        policy = self._view.policy
        if policy.revision != self._responses_of:
            self.engine.responses = ResponsePolicy(policy.responses.documents, force_dry_run=self._dry_run)
            self._responses_of = policy.revision

    def released(self, identities: Iterable[str]) -> None:
        """The identities in quarantine now: a released one is watched again."""
        self.engine.set_quarantined(identities)

    async def observe(self, agent: str, counters: Sequence[tuple[FlowCounter, bool]]) -> list[Alert]:
        """Feed one agent's (validated, accepted) counters through the engine and act."""
        if not counters:
            return []
        try:
            node = node_name_of(SpiffeId.parse(agent)) or ""
        except ValueError:
            node = ""
        records = report_records(node, self._rt.clock(), counters, self._node_at)
        if self._trace is not None:
            self._trace.add(records)
        self._responses()
        quarantined = self._view.policy.quarantined
        if quarantined is not self._quarantined:  # a release resumes watching; a manual add stops learning
            self.engine.set_quarantined(quarantined)
            self._quarantined = quarantined
        alerts = [a for r in records for a in self.engine.observe(r)]
        self._identities.set(self.engine.identities())
        for alert in alerts:
            await self._act(alert, agent)
        return alerts

    async def _act(self, alert: Alert, agent: str) -> None:
        self._anomalies.inc(detector=alert.detector, action="dry-run-quarantine" if alert.dry_run else alert.action)
        details = alert_to_dict(alert)
        log_event(log, "anomaly", level=logging.WARNING, **{k: str(v) for k, v in details.items()}, rule=alert.rule)
        if alert.action == "quarantine" and not alert.dry_run:
            try:
                details["quarantined"] = await self._quarantine(alert)
            except TrustmeshError as err:
                # Still an alert: audited below with why the quarantine did not happen.
                log_event(log, "quarantine_failed", level=logging.ERROR, target=alert.identity, error=str(err))
                details["quarantine_error"] = str(err)
        extra: dict[str, Any] = {k: v for k, v in details.items() if k not in ("identity", "ts")}
        await self._rt.audit.record("detect.anomaly", actor=DETECTOR_ACTOR, subject=alert.identity,
                                    reported_by=agent, rule=alert.rule, **extra)
        if self._webhooks:
            try:
                self._outbox.put_nowait(details)
            except asyncio.QueueFull:
                self._webhook_failures.inc()

    async def _quarantine(self, alert: Alert) -> str:
        """Put the alert's target in quarantine; what was quarantined ("identity ID" or "node NAME")."""
        kind, target = ("node", alert.node) if alert.target == "node" else ("identity", alert.identity)
        if kind == "node" and not any(n.node_name == target for n in self._view.attested_nodes()):
            # Presented from a host that is none of our nodes (a stolen credential used
            # elsewhere): there is no node to contain, so the identity is contained.
            kind, target = "identity", alert.identity
        await self._quarantines.add(target, kind, alert.reason, DETECTOR_ACTOR, node=alert.node,
                                    evidence=(alert.reason,), detector=alert.detector, score=alert.score)
        return f"{kind} {target}"

    def load(self) -> None:
        """Pick up what a previous run learned (called once, before the first report)."""
        if self._state is None or self._sealer is None or not self._state.exists():
            return
        try:
            blob = self._state.read_bytes()
            if len(blob) > MAX_STATE_BYTES:
                raise StateError(f"larger than {MAX_STATE_BYTES} bytes")
            restore_engine(self.engine, json.loads(self._sealer.open(blob, _STATE_AAD)))
        except (OSError, ValueError, TrustmeshError) as err:  # StateError and JSON errors are ValueErrors
            log_event(log, "detection_state_refused", level=logging.ERROR, path=str(self._state), error=str(err),
                      consequence=f"baselines are learned again for {self.engine.learn:.0f}s before any quarantine")
            return
        log_event(log, "detection_state_loaded", identities=self.engine.identities())

    async def save(self) -> None:
        if self._state is None or self._sealer is None:
            return
        state, sealer, path = engine_state(self.engine), self._sealer, self._state

        def write() -> None:
            # Off the event loop: serialising and sealing a large fleet's baselines takes a while,
            # and `state` is a copy the engine no longer touches.
            atomic_write(path, sealer.seal(json.dumps(state, separators=(",", ":")).encode(), _STATE_AAD))

        try:
            await asyncio.to_thread(write)
        except OSError as err:
            log_event(log, "detection_state_not_saved", level=logging.ERROR, path=str(self._state), error=str(err))

    async def run(self, stop: asyncio.Event) -> None:
        """Save the baselines every SAVE_SECONDS and at stop; post alerts to the webhooks."""
        poster = asyncio.create_task(self._post(stop), name="alert-webhooks")
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), SAVE_SECONDS)
                except TimeoutError:
                    pass
                await self.save()
        finally:
            await poster

    async def _post(self, stop: asyncio.Event) -> None:
        """Post alerts to the webhooks, one at a time, until `stop`."""
        if not self._webhooks:
            return
        async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT) as client:
            while not stop.is_set():
                getter = asyncio.ensure_future(self._outbox.get())
                stopper = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if getter not in done:
                    getter.cancel()
                    return
                payload = getter.result()
                for url in self._webhooks:
                    try:
                        response = await client.post(url, json=payload)
                        response.raise_for_status()
                    except httpx.HTTPError as err:
                        self._webhook_failures.inc()
                        log_event(log, "alert_webhook_failed", level=logging.WARNING, url=url, error=str(err))
