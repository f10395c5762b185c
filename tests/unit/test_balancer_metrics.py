"""The balancer's label values: models some worker serves (else ``other``), workers in the pool only."""

from __future__ import annotations

import random

from balancer.metrics import BalancerMetrics
from balancer.pool import WorkerPool
from balancer.retry import RetryBudget
from tests.support.pools import add_healthy


def _metrics() -> tuple[WorkerPool, BalancerMetrics]:
    pool = WorkerPool("least_connections", 8, random.Random(0))
    add_healthy(pool, [2, 2], "served")
    return pool, BalancerMetrics(pool, RetryBudget())


def test_a_model_nobody_serves_is_labelled_other() -> None:
    _pool, metrics = _metrics()
    assert metrics.model_label("served") == "served"
    assert {metrics.model_label(f"typo-{i}") for i in range(1000)} == {"other"}
    for i in range(1000):
        metrics.unrouted[(metrics.model_label(f"typo-{i}"), 404)] += 1
    page = metrics.render().decode()
    assert 'appliance_balancer_requests_total{model="other",status="404",worker="none"} 1000.0' in page
    assert "typo-" not in page


def test_a_queue_for_a_model_nobody_serves_adds_no_series() -> None:
    pool, metrics = _metrics()
    for i in range(100):
        pool.queue(f"typo-{i}")  # what a request for an unknown model leaves behind in the pool
    page = metrics.render().decode()
    assert "typo-" not in page
    assert page.count("appliance_balancer_queue_waiting{") == 0  # no queue of a served model used yet


def test_a_worker_that_leaves_takes_its_series_with_it() -> None:
    pool, metrics = _metrics()
    leaving, staying = list(pool)
    for worker in (leaving, staying):
        metrics.upstream_latency(worker).observe(0.01)
    assert leaving.url in metrics.render().decode()
    pool.remove(leaving.url)
    page = metrics.render().decode()
    assert leaving.url not in page
    assert f'appliance_balancer_upstream_latency_seconds_count{{worker="{staying.url}"}} 1.0' in page
