"""The decode lanes' Prometheus counters (inference.lanes): preemptions of batch work and tokens per class."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from appliance.core.priority import Priority
from inference.lanes import LaneCounter

__all__ = ["LaneMetrics"]


class LaneMetrics(LaneCounter):
    """Called on the decode thread (prometheus_client counters are thread-safe)."""

    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        preemptions = Counter(
            "appliance_worker_preemptions",
            "Batch sequences preempted for interactive work: paused in their slot (KV kept), or evicted from it",
            ["model", "kind"], registry=registry,
        )
        self._paused = preemptions.labels(model, "paused")
        self._evicted = preemptions.labels(model, "evicted")
        self._resumed = Counter(
            "appliance_worker_resumptions", "Paused or evicted batch sequences that step again", ["model"],
            registry=registry,
        ).labels(model)
        self._recomputed = Counter(
            "appliance_worker_recomputed_tokens",
            "Cells of resumed batch sequences prefilled again (not found cached)", ["model"], registry=registry,
        ).labels(model)
        tokens = Counter(
            "appliance_worker_priority_tokens", "Prompt tokens prefilled and tokens generated, per priority class",
            ["model", "priority", "kind"], registry=registry,
        )
        self._prompt = {p: tokens.labels(model, p.wire, "prompt") for p in Priority}
        self._generated = {p: tokens.labels(model, p.wire, "generated") for p in Priority}

    def paused(self, count: int) -> None:
        self._paused.inc(count)

    def evicted(self, count: int) -> None:
        self._evicted.inc(count)

    def resumed(self, count: int) -> None:
        self._resumed.inc(count)

    def recomputed(self, count: int) -> None:
        self._recomputed.inc(count)

    def tokens(self, priority: Priority, prompt: int, generated: int) -> None:
        if prompt:
            self._prompt[priority].inc(prompt)
        if generated:
            self._generated[priority].inc(generated)
