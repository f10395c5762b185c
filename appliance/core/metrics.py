"""Prometheus helpers: one registry per app (no global state), shared buckets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = [
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "OTHER",
    "TOKEN_LATENCY_BUCKETS",
    "new_registry",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The label value of anything outside a metric's closed set (a model nobody serves, a path no route has):
# a label value never comes from a client's string, so no request can add a series.
OTHER = "other"
# Seconds; spans a fast cache hit to a long generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Seconds between tokens or to the first token.
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.0, 5.0, 10.0)


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
