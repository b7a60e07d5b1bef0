"""Prometheus metrics for the server and the agent, on prometheus_client.

`Registry` is the narrow facade the rest of the code calls: a metric is declared where it is
used (`metrics.counter(name, help, labels).inc(outcome="ok")`), label values are keyword
arguments, and declaring the same metric again returns the first declaration. Each `Registry`
owns its own prometheus_client `CollectorRegistry`, never the library's global one, so several
registries (tests, several servers in one process) never see each other's samples. Every
registry also carries the process metrics (`process_*`), `python_info` and
`trustmesh_build_info{version=...}`. Names are `trustmesh_…`; a gauge that holds a point in
time is named `…_timestamp_seconds`.

`serve_metrics` serves them over plain HTTP: `GET /metrics`, plus the probes. `/healthz` is
liveness: it is answered by the process's own event loop, so a 200 means the loop runs and is
not blocked (a probe that times out means it is); restart on failure. `/readyz` is readiness:
200 `{"status": "ready"}` once the process's `ready` probe says so, else 503 with
`{"status": "not ready", "reason": "..."}` naming the first thing missing (the server: registry
loaded, signing CA valid, listeners bound, store answering; the agent: attested, its SVID
valid, its sync stream connected); take the process out of rotation, never restart it for that.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import prometheus_client
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import CollectorRegistry

from trustmesh import __version__
from trustmesh.hostport import cannot_listen, join_host_port
from trustmesh.httpserver import HttpServer, reply, serve_http

MAX_CACHED_CHILDREN = 10_000  # per metric; label sets past it are looked up each time
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# `_created` series double every counter and histogram for a start time nobody here reads.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream

W = TypeVar("W", prometheus_client.Counter, prometheus_client.Gauge, prometheus_client.Histogram)


class _Metric(Generic[W]):
    def __init__(self, name: str, labels: Sequence[str], metric: W) -> None:
        self.name = name
        self.label_names = tuple(labels)
        self._metric: W = metric
        # The child of each label set seen, by (name, value) pairs: prometheus_client's own
        # lookup costs several microseconds, which a per-request counter pays many times a second.
        self._children: dict[tuple[tuple[str, str], ...], W] = {}

    def _child(self, labels: dict[str, str]) -> W:
        key = tuple(labels.items())
        child = self._children.get(key)
        if child is not None:
            return child
        if set(labels) != set(self.label_names):
            raise ValueError(f"metric {self.name} takes labels {self.label_names}, got {tuple(labels)}")
        if not self.label_names:
            return self._metric
        child = self._metric.labels(**{k: str(v) for k, v in labels.items()})
        if len(self._children) < MAX_CACHED_CHILDREN:
            self._children[key] = child
        return child

    def _sample(self, sample_name: str, labels: dict[str, str]) -> float:
        self._child(labels)  # the same label check as on writes
        wanted = {k: str(v) for k, v in labels.items()}
        for family in self._metric.collect():
            for sample in family.samples:
                if sample.name == sample_name and sample.labels == wanted:
                    return float(sample.value)
        return 0.0


class Counter(_Metric[prometheus_client.Counter]):
    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._child(labels).inc(amount)

    def value(self, **labels: str) -> float:
        return self._sample(self.name, labels)


class Gauge(_Metric[prometheus_client.Gauge]):
    def set(self, value: float, **labels: str) -> None:
        self._child(labels).set(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._child(labels).inc(amount)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self._child(labels).dec(amount)

    def value(self, **labels: str) -> float:
        return self._sample(self.name, labels)


class Histogram(_Metric[prometheus_client.Histogram]):
    def observe(self, value: float, **labels: str) -> None:
        self._child(labels).observe(value)

    def count(self, **labels: str) -> int:
        return int(self._sample(self.name + "_count", labels))


M = TypeVar("M", Counter, Gauge, Histogram)


class Registry:
    def __init__(self) -> None:
        self.collector_registry = CollectorRegistry(auto_describe=True)
        prometheus_client.ProcessCollector(registry=self.collector_registry)
        prometheus_client.PlatformCollector(registry=self.collector_registry)
        prometheus_client.Info("trustmesh_build", "the trustmesh release this process runs",
                               registry=self.collector_registry).info({"version": __version__})
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        self._lock = threading.Lock()

    def _get(self, kind: type[M], name: str, labels: Sequence[str], make: Callable[[], M]) -> M:
        with self._lock:
            existing = self._metrics.get(name)
            if existing is None:
                self._metrics[name] = made = make()
                return made
            if not isinstance(existing, kind) or existing.label_names != tuple(labels):
                raise ValueError(f"metric {name} registered twice with different shapes")
            return existing

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        if not name.endswith("_total"):
            # prometheus_client would append `_total` itself, renaming the series.
            raise ValueError(f"counter {name} must be named ..._total")
        return self._get(Counter, name, labels, lambda: Counter(name, labels, prometheus_client.Counter(
            name, help_text, labels, registry=self.collector_registry)))

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        return self._get(Gauge, name, labels, lambda: Gauge(name, labels, prometheus_client.Gauge(
            name, help_text, labels, registry=self.collector_registry)))

    def histogram(self, name: str, help_text: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        return self._get(Histogram, name, labels, lambda: Histogram(name, labels, prometheus_client.Histogram(
            name, help_text, labels, registry=self.collector_registry, buckets=buckets)))

    def render(self) -> str:
        """Every metric in the Prometheus text format (version 0.0.4)."""
        return prometheus_client.generate_latest(self.collector_registry).decode()


NOT_FOUND = b"not found: metrics are at /metrics (and /healthz, /readyz)\n"


@dataclass(frozen=True)
class Readiness:
    """What `/readyz` answers: ready, or why not (one line a person can act on)."""

    ready: bool
    reason: str = ""


# A readiness probe: a plain predicate, or a coroutine that may look further (the store).
ReadyProbe = Callable[[], bool | Readiness | Awaitable[Readiness]]


async def _readiness(ready: ReadyProbe | None) -> Readiness:
    if ready is None:
        return Readiness(True)
    answer = ready()
    if inspect.isawaitable(answer):
        answer = await answer
    if isinstance(answer, Readiness):
        return answer
    return Readiness(bool(answer), "" if answer else "starting")


def _json(status: int, body: dict[str, str]) -> web.StreamResponse:
    return reply(status, json.dumps(body).encode() + b"\n", "application/json")


async def serve_metrics(registry: Registry, host: str, port: int, *, ready: ReadyProbe | None = None) -> HttpServer:
    """Serve `GET /metrics`, `/healthz` and `/readyz` (503 with the reason until `ready()`
    says ready); an address that cannot be bound is a ListenError naming --metrics (its one
    flag everywhere)."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        if request.method == "GET" and path == "/metrics":
            return reply(200, registry.render().encode(), CONTENT_TYPE_PLAIN_0_0_4)
        if request.method == "GET" and path == "/healthz":
            # Answered on the process's event loop: reaching this line is the liveness proof.
            return _json(200, {"status": "ok"})
        if request.method == "GET" and path == "/readyz":
            answer = await _readiness(ready)
            if answer.ready:
                return _json(200, {"status": "ready"})
            return _json(503, {"status": "not ready", "reason": answer.reason})
        return reply(404, NOT_FOUND, "text/plain")

    try:
        return await serve_http(handle, host, port)
    except OSError as err:
        raise cannot_listen(join_host_port(host, port), "--metrics", err) from err


__all__ = ["Counter", "Gauge", "Histogram", "ReadyProbe", "Readiness", "Registry", "serve_metrics"]
