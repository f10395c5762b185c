"""The swap metrics (contract C3): swaps, waits for a load, loads and their time (requests per model:
:class:`balancer.metrics.BalancerMetrics`).

Label values are catalogue aliases (a closed set an operator wrote, signed), or ``other`` for a name no
worker serves and no host can load (:meth:`balancer.metrics.BalancerMetrics.model_label`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from appliance.core.metrics import LATENCY_BUCKETS

__all__ = ["SwapMetrics"]

_LOAD_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_WAIT_BUCKETS = tuple(sorted({*LATENCY_BUCKETS, *_LOAD_BUCKETS}))


class SwapMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.swaps = Counter("appliance_balancer_model_swaps", "Swaps begun: a swap host drained to load another model "
                             "(from '' when it held none).", ["from", "to"], registry=registry)
        self.swap_wait = Histogram("appliance_balancer_swap_wait_seconds",
                                   "Time requests waited for their model to be loaded on a swap host.",
                                   buckets=_WAIT_BUCKETS, registry=registry)
        self.loads = Counter("appliance_balancer_model_loads", "Loads a swap host finished, as the balancer saw "
                             "them.", ["model"], registry=registry)
        self.load_failures = Counter("appliance_balancer_model_load_failures", "Loads a swap host refused or failed.",
                                     ["model"], registry=registry)
        self.load_seconds = Histogram("appliance_balancer_model_load_seconds", "From telling a drained swap host to "
                                      "load a model until it answered.", ["model"], buckets=_LOAD_BUCKETS,
                                      registry=registry)

    def swap_begun(self, old: str, new: str) -> None:
        self.swaps.labels(old, new).inc()

    def load_done(self, model: str, took_s: float) -> None:
        self.loads.labels(model).inc()
        self.load_seconds.labels(model).observe(took_s)

    def load_failed(self, model: str) -> None:
        self.load_failures.labels(model).inc()
