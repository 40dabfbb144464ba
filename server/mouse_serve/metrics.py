"""Prometheus metrics (prometheus-client, its own registry), served on `--metrics-port`.

Everything is pushed from the event loop as it happens (requests, batches, session events,
queue lengths); the HTTP thread only reads the registry, never the server's own state.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from mouse_serve.scheduler import BatchStats

if TYPE_CHECKING:
    from mouse_serve.runner import ModelRunner

STAGE_BUCKETS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class _Series:
    """One labelled series of a `LoopCounter` (`counts[0]`) or `LoopHistogram` (a count per
    bucket, and the sum)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * max(len(bounds), 1)
        self.sum = 0.0

    def inc(self, amount: int = 1) -> None:
        self.counts[0] += amount

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times


class _LoopMetric:
    """A counter or histogram for what every request updates, kept in plain Python numbers: one
    writer (the event loop) and no lock, where prometheus_client's take two locks per
    observation (about 1-2 us; a batch of 64 requests makes hundreds). A scrape copies each
    series' list of counts in one step, so it reads whole observations."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.bounds: list[float] = []
        self._series: dict[tuple[str, ...], _Series] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Series:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = _Series(self.bounds)
        return series

    def describe(self) -> list[Metric]:
        return []

    def snapshot(self) -> list[tuple[list[str], list[int], float]]:
        return [(list(v), list(s.counts), s.sum) for v, s in list(self._series.items())]


class LoopCounter(_LoopMetric):
    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, counts, _ in self.snapshot():
            family.add_metric(values, counts[0])
        yield family


class LoopHistogram(_LoopMetric):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, documentation, labelnames, registry)
        self.bounds = [*buckets, math.inf]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [floatToGoString(b) for b in self.bounds]
        for values, counts, total in self.snapshot():
            family.add_metric(values, list(zip(les, itertools.accumulate(counts), strict=True)), total)
        yield family


class Metrics:
    """All metrics of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # What every request updates: LoopCounter and LoopHistogram (see _LoopMetric).
        self.requests = LoopCounter(
            "mouse_requests",
            "Requests by method and status (stream and batch items count one each).",
            ["method", "code"],
            r,
        )
        self.latency = LoopHistogram(
            "mouse_request_seconds",
            "Time from receiving a request to answering it.",
            ["method"],
            r,
            LATENCY_BUCKETS,
        )
        self.queue_wait = LoopHistogram(
            "mouse_queue_wait_seconds", "Time a step waited for the model.", ["model"], r, LATENCY_BUCKETS
        )
        self.model_time = Histogram(
            "mouse_model_seconds",
            "Time of one batched forward + sampling.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mouse_batch_size", "Sessions per batched forward.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.actions = Counter("mouse_actions", "Actions served.", ["model"], registry=r)
        self.session_events = Counter(
            "mouse_session_events",
            "Session lifecycle: opened, closed, expired.",
            ["model", "event"],
            registry=r,
        )
        self.context_evictions = Counter(
            "mouse_context_evictions",
            "Applied requests that cut a session's context at its limit (sliding re-prefill or reset).",
            ["model", "policy"],
            registry=r,
        )
        self.active_sessions = Gauge("mouse_active_sessions", "Open sessions.", ["model"], registry=r)
        self.pool_bytes = Gauge("mouse_kv_pool_bytes", "KV-cache pool bytes.", ["model", "state"], registry=r)
        self.queue_length = Gauge("mouse_queue_length", "Steps waiting for the model.", ["model"], registry=r)
        self.parameters = Gauge("mouse_model_parameters", "Parameters of the model.", ["model"], registry=r)
        self.load_seconds = Gauge(
            "mouse_model_load_seconds", "Time it took to load the model.", ["model"], registry=r
        )
        self.model_info = Info("mouse_model", "Hosted model.", ["model"], registry=r)
        self.model_version = Gauge(
            "mouse_model_version", "Version of the weights now served (1 at start-up).", ["model"], registry=r
        )
        self.model_updates = Counter(
            "mouse_model_updates",
            "Weight updates by result (ok, refused, failed).",
            ["model", "result"],
            registry=r,
        )
        self.model_update_seconds = Histogram(
            "mouse_model_update_seconds",
            "Time from receiving a weight update to serving it.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_time = LoopHistogram(
            "mouse_request_stage_seconds",
            "Where requests spend their time, by stage. Per request: decode and encode (protobuf), "
            "validate (checks, session lookup), step (everything from the session's bookkeeping to "
            "the result: it contains queue and the batch stages), reply (building the reply). Per "
            "batched forward: handoff (to and from the runner thread), pack (inputs to tensors), "
            "forward, sample (actions to the host), unpack (results).",
            ["stage"],
            r,
            STAGE_BUCKETS,
        )
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}  # see _child
        self._http = None

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept: labels() takes a lock and builds a key, too slow for
        what runs on every request."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_stage(self, stage: str, seconds: float, requests: int = 1) -> None:
        """`seconds` in `stage`, for each of `requests` requests."""
        self.stage_time.labels(stage).observe(seconds, requests)

    def model_loaded(self, runner: ModelRunner) -> None:
        name = runner.spec.name
        self.parameters.labels(name).set(runner.num_parameters)
        self.load_seconds.labels(name).set(runner.load_seconds)
        self.pool_bytes.labels(name, "total").set(runner.pool.nbytes)
        self.pool_bytes.labels(name, "used").set(0)
        self.active_sessions.labels(name).set(0)
        self.queue_length.labels(name).set(0)
        self.model_version.labels(name).set(runner.version)
        self.model_info.labels(name).info(
            {
                "source": runner.spec.source,
                "backbone": runner.backbone,
                "dtype": runner.dtype_name,
                "device": str(runner.device),
                "action_head": runner.model.action_head,
            }
        )

    def model_update(self, model: str, result: str, seconds: float, version: int) -> None:
        self.model_updates.labels(model, result).inc()
        self.model_version.labels(model).set(version)
        if result == "ok":
            self.model_update_seconds.labels(model).observe(seconds)

    def sessions_changed(self, model: str, count: int, used_bytes: int) -> None:
        self.active_sessions.labels(model).set(count)
        self.pool_bytes.labels(model, "used").set(used_bytes)

    def queue_changed(self, model: str, length: int) -> None:
        self._child(self.queue_length, model).set(length)

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def observe_batch(self, stats: BatchStats) -> None:
        self._child(self.batch_size, stats.model).observe(stats.size)
        self._child(self.model_time, stats.model).observe(stats.model_time_s)
        self._child(self.actions, stats.model).inc(stats.actions)
        waits = self.queue_wait.labels(stats.model)
        for wait in stats.queue_wait_s:
            waits.observe(wait)
        for stage, seconds in stats.stages.items():
            self.observe_stage(stage, seconds)

    def session_event(self, event: str, model: str) -> None:
        self.session_events.labels(model, event).inc()

    def context_eviction(self, model: str, policy: str) -> None:
        self.context_evictions.labels(model, policy).inc()

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (`/metrics`); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
