"""The gateway's Prometheus metrics (names fixed in docs/CONTRACTS.md), one registry per app.

Every label value comes from a closed set, so no request can add a series: ``route`` is the
matched route's template (``other`` for a path no route has), ``model`` a model the catalog knows
the workers serve, named by an authenticated request (anything else is ``other``; ``""`` when the
request named none), ``status`` an HTTP status.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from appliance.core.metrics import LATENCY_BUCKETS, OTHER, new_registry

__all__ = ["GatewayMetrics"]

_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def _none_served(_model: str) -> bool:
    return False


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 served: Callable[[str], bool] = _none_served) -> None:
        self.registry = registry or new_registry()
        self._served = served
        r = self.registry
        self.requests = Counter("appliance_gateway_requests_total", "Requests by route, status and model",
                                ["route", "status", "model"], registry=r)
        self.latency = Histogram("appliance_gateway_request_seconds", "Request latency, first byte in to last out",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("appliance_gateway_overhead_seconds", "Time spent in the gateway itself",
                                  buckets=_OVERHEAD_BUCKETS, registry=r)
        self.cache = Counter("appliance_gateway_cache_total", "Response cache lookups", ["result"], registry=r)
        self.rate_limited = Counter("appliance_gateway_rate_limited_total", "Requests refused by a limit",
                                    ["limit"], registry=r)
        self.tokens = Counter("appliance_gateway_tokens_total", "Tokens through the gateway", ["model", "kind"],
                              registry=r)
        self.dependency_up = Gauge("appliance_gateway_dependency_up", "1 if the dependency answers",
                                   ["dependency"], registry=r)
        self.batch_lines = Counter("appliance_gateway_batch_lines_total", "Batch lines done, by outcome "
                                   "(completed: a 2xx answer in the output file; failed: in the error file)",
                                   ["outcome"], registry=r)
        self.batch_tokens = Counter("appliance_gateway_batch_tokens_total", "Tokens of batch lines", ["kind"],
                                    registry=r)

    def follow_models(self, served: Callable[[str], bool]) -> None:
        """Label models with what ``served`` recognises (the catalog, once the lifespan has built it)."""
        self._served = served

    def model_label(self, model: str, *, authenticated: bool) -> str:
        """``model`` when a key named it and the workers serve it, else ``other`` (``""``: none named)."""
        if not model:
            return ""
        return model if authenticated and self._served(model) else OTHER

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        label = self.model_label(model, authenticated=True)  # counted only for answered (authenticated) requests
        if prompt:
            self.tokens.labels(label, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(label, "completion").inc(completion)

    def count_batch_tokens(self, prompt: int, completion: int) -> None:
        if prompt:
            self.batch_tokens.labels("prompt").inc(prompt)
        if completion:
            self.batch_tokens.labels("completion").inc(completion)
