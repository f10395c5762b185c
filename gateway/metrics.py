"""The gateway's Prometheus metrics (names fixed in docs/CONTRACTS.md), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from appliance.core.metrics import LATENCY_BUCKETS, new_registry

__all__ = ["GatewayMetrics"]

_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
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

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self.tokens.labels(model, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(model, "completion").inc(completion)
