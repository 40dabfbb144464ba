"""Prometheus metrics (prometheus-client, its own registry), served on `--metrics-port`.

Counters and histograms are updated by the service and the schedulers; gauges that describe
current state (sessions, KV pool bytes) are read from the session manager at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from mouse_serve.scheduler import BatchStats

if TYPE_CHECKING:
    from mouse_serve.sessions import SessionManager

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class _StateCollector(Collector):
    """Gauges computed from the live session manager at scrape time."""

    def __init__(self, sessions: SessionManager, load_seconds: dict[str, float]) -> None:
        self.sessions = sessions
        self.load_seconds = load_seconds

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        active = GaugeMetricFamily("mouse_active_sessions", "Open sessions.", labels=["model"])
        pool = GaugeMetricFamily("mouse_kv_pool_bytes", "KV-cache pool bytes.", labels=["model", "state"])
        queue = GaugeMetricFamily("mouse_queue_length", "Steps waiting for the model.", labels=["model"])
        params = GaugeMetricFamily("mouse_model_parameters", "Parameters of the model.", labels=["model"])
        load = GaugeMetricFamily(
            "mouse_model_load_seconds", "Time it took to load the model.", labels=["model"]
        )
        info = InfoMetricFamily(
            "mouse_model",
            "Hosted model.",
            labels=["model", "source", "backbone", "dtype", "device", "action_head"],
        )
        for name, runner in self.sessions.runners.items():
            count = self.sessions.count(name)
            active.add_metric([name], count)
            pool.add_metric([name, "used"], count * runner.pool.bytes_per_slot)
            pool.add_metric([name, "total"], runner.pool.nbytes)
            queue.add_metric([name], self.sessions.schedulers[name].queue_length)
            params.add_metric([name], runner.num_parameters)
            load.add_metric([name], self.load_seconds.get(name, 0.0))
            labels = [
                name,
                runner.spec.source,
                runner.backbone,
                runner.dtype_name,
                str(runner.device),
                runner.model.action_head,
            ]
            info.add_metric(labels, {})
        yield from (active, pool, queue, params, load, info)


class Metrics:
    """All metrics of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mouse_requests",
            "Requests by method and status (stream and batch items count one each).",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "mouse_request_seconds",
            "Time from receiving a request to answering it.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "mouse_queue_wait_seconds",
            "Time a step waited for the model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
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
            "Times a session's history was cut at its context limit (sliding re-prefill or reset).",
            ["model", "policy"],
            registry=r,
        )
        self.load_seconds: dict[str, float] = {}
        self._request_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._http = None

    def attach(self, sessions: SessionManager) -> None:
        self.registry.register(_StateCollector(sessions, self.load_seconds))

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        children = self._request_children.get(key)
        if children is None:  # labels() takes a lock and builds a key; cache the children
            children = self._request_children[key] = (
                self.requests.labels(method, code),
                self.latency.labels(method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.labels(stats.model).observe(stats.size)
        self.model_time.labels(stats.model).observe(stats.model_time_s)
        self.actions.labels(stats.model).inc(stats.size)
        waits = self.queue_wait.labels(stats.model)
        for wait in stats.queue_wait_s:
            waits.observe(wait)

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
