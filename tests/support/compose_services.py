"""What the compose appliance runs on a CPU host: one list for the test of compose.yaml and the e2e of the stack."""

from __future__ import annotations

__all__ = ["COMPOSE_SERVICES", "COMPOSE_WORKERS"]

COMPOSE_WORKERS = ("inference-1", "inference-2")
COMPOSE_SERVICES = frozenset({
    "redis",
    *COMPOSE_WORKERS,
    "balancer",
    "rag",
    "gateway",
    "redis-exporter",
    "node-exporter",
    "alertmanager",
    "prometheus",
})
