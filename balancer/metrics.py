"""Prometheus metrics: counters live on the pool's workers and are read at scrape time.

Hot-path cost is a dict increment per request plus one histogram observation; gauges
(in-flight, health, queue depth) cost nothing until scraped.

Label values come from closed sets, never from a request: ``model`` is a model some registered worker
serves (anything else is ``other``), ``worker`` a worker in the pool (its series leave with it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.core.metrics import LATENCY_BUCKETS, OTHER, new_registry, render
from balancer.fairqueue import PRIORITIES
from balancer.pool import WorkerPool
from balancer.retry import RetryBudget
from balancer.worker import Worker, WorkerState

__all__ = ["BalancerMetrics"]

NO_WORKER = "none"


class BalancerMetrics:
    def __init__(self, pool: WorkerPool, budget: RetryBudget) -> None:
        self.registry = new_registry()
        self._pool = pool
        # (model label, status) answered without a worker: key it with model_label, never the client's string.
        self.unrouted: Counter[tuple[str, int]] = Counter()
        self.queue_wait = Histogram(
            "appliance_balancer_queue_wait_seconds", "Time requests that found every worker full spent queued.",
            ["priority"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_wait_by_priority = tuple(self.queue_wait.labels(priority=name) for name in PRIORITIES)
        self._upstream = Histogram(
            "appliance_balancer_upstream_latency_seconds",
            "Time from sending a request to a worker until its first response body byte.",
            ["worker"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._upstream_children: dict[str, Histogram] = {}
        self._model_requests: Counter[str] = Counter()  # model label -> requests (read at scrape time)
        self.registry.register(_PoolCollector(pool, budget, self.unrouted, self._model_requests))

    def model_label(self, model: str) -> str:
        """``model`` when a worker in the pool serves it, else ``other``: a client names any model it likes."""
        return model if self._pool.has_model(model) else OTHER

    def model_requests(self, model: str) -> None:
        """Count a request for ``model`` (``appliance_balancer_model_requests_total``)."""
        self._model_requests[self.model_label(model)] += 1

    def upstream_latency(self, worker: Worker) -> Histogram:
        child = self._upstream_children.get(worker.url)
        if child is None:
            child = self._upstream_children[worker.url] = self._upstream.labels(worker=worker.url)
        return child

    def render(self) -> bytes:
        for url in [url for url in self._upstream_children if self._pool.get(url) is None]:
            del self._upstream_children[url]  # the worker left the pool: its series go with it
            self._upstream.remove(url)
        return render(self.registry)


class _PoolCollector(Collector):
    def __init__(self, pool: WorkerPool, budget: RetryBudget, unrouted: Counter[tuple[str, int]],
                 model_requests: Counter[str]) -> None:
        self._pool = pool
        self._budget = budget
        self._unrouted = unrouted
        self._model_requests = model_requests

    def collect(self) -> Iterator[Metric]:
        workers = list(self._pool)
        requests = CounterMetricFamily("appliance_balancer_requests_total", "Requests answered, by worker and status.",
                                       labels=["model", "worker", "status"])
        for (model, status), count in self._unrouted.items():
            requests.add_metric([model, NO_WORKER, str(status)], count)
        inflight = GaugeMetricFamily("appliance_balancer_inflight", "Requests in flight per worker.", labels=["worker"])
        healthy = GaugeMetricFamily("appliance_balancer_worker_healthy", "1 when the worker takes traffic.",
                                    labels=["worker", "model"])
        errors = CounterMetricFamily("appliance_balancer_errors_total", "Failed upstream attempts by kind.",
                                     labels=["worker", "kind"])
        ejections = CounterMetricFamily("appliance_balancer_ejections_total", "Times a worker was ejected.",
                                        labels=["worker"])
        for worker in workers:
            for (model, status), count in worker.responses.items():
                requests.add_metric([model, worker.url, str(status)], count)
            inflight.add_metric([worker.url], worker.inflight)
            healthy.add_metric([worker.url, worker.model or ""],
                               1.0 if worker.state is WorkerState.HEALTHY and not worker.draining else 0.0)
            for kind, count in worker.errors.items():
                errors.add_metric([worker.url, kind], count)
            ejections.add_metric([worker.url], worker.ejections)
        yield from (requests, inflight, healthy, errors, ejections)
        yield CounterMetricFamily("appliance_balancer_retries_total", "Retries granted by the retry budget.",
                                  value=self._budget.granted)
        yield GaugeMetricFamily("appliance_balancer_queue_depth", "Requests waiting for a free slot.",
                                value=self._pool.queue_depth)
        by_priority = GaugeMetricFamily("appliance_balancer_queue_waiting",
                                        "Requests waiting for a free slot, by model and priority class.",
                                        labels=["model", "priority"])
        for model, queue in self._pool.queues().items():
            if not self._pool.has_model(model):
                continue  # a queue for a model nobody serves (a client's typo) holds no one: no series
            for name, depth in zip(PRIORITIES, queue.depth_by_priority(), strict=True):
                by_priority.add_metric([model, name], depth)
        yield by_priority
        per_model = CounterMetricFamily("appliance_balancer_model_requests", "Requests received, by the model asked "
                                        "for ('other': no worker serves it and no swap host can load it).",
                                        labels=["model"])
        for model, count in self._model_requests.items():
            per_model.add_metric([model], count)
        yield per_model
