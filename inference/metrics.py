"""The worker's Prometheus metrics (names fixed by docs/CONTRACTS.md), one registry per app."""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from appliance.core.metrics import TOKEN_LATENCY_BUCKETS, new_registry
from inference.lane_metrics import LaneMetrics

__all__ = ["WorkerMetrics"]

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
LOAD_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
M = TypeVar("M", Counter, Gauge, Histogram)


class WorkerMetrics:
    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        self.model = model
        self._families: dict[str, Any] = {}  # attribute -> its family, for serve()
        r = self.registry
        self.requests = Counter(
            "appliance_worker_requests", "Requests by endpoint and status", ["model", "endpoint", "status"], registry=r
        )
        self._prompt_tokens_family = Counter(
            "appliance_worker_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.prompt_tokens = self._labelled("prompt_tokens", self._prompt_tokens_family)
        self.generated_tokens = self._labelled("generated_tokens", Counter(
            "appliance_worker_generated_tokens", "Tokens generated", ["model"], registry=r
        ))
        # prompt_tokens = prefilled + reused (cells of a cached prefix a prompt started from).
        self.prompt_tokens_prefilled = self._labelled("prompt_tokens_prefilled", Counter(
            "appliance_worker_prompt_tokens_prefilled", "Prompt tokens computed by a prefill", ["model"], registry=r
        ))
        self._prompt_tokens_reused_family = Counter(
            "appliance_worker_prompt_tokens_reused",
            "Prompt tokens taken from cached KV cells instead of a prefill",
            ["model"],
            registry=r,
        )
        self.prompt_tokens_reused = self._labelled("prompt_tokens_reused", self._prompt_tokens_reused_family)
        # Speculative decoding: draft tokens decoded, and those the sampler then picked (each saves a step).
        self.draft_tokens = self._labelled("draft_tokens", Counter(
            "appliance_worker_draft_tokens", "Draft tokens decoded by speculative decoding", ["model"], registry=r
        ))
        self.draft_accepted = self._labelled("draft_accepted", Counter(
            "appliance_worker_draft_accepted_tokens", "Draft tokens accepted (the sampler picked them)", ["model"],
            registry=r,
        ))
        self.ttft = self._labelled("ttft", Histogram(
            "appliance_worker_ttft_seconds", "Time to first token", ["model"], buckets=TOKEN_LATENCY_BUCKETS, registry=r
        ))
        self.inter_token = self._labelled("inter_token", Histogram(
            "appliance_worker_inter_token_seconds",
            "Time between tokens",
            ["model"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        ))
        self.slots_busy = self._labelled("slots_busy", Gauge(
            "appliance_worker_slots_busy", "Slots holding a sequence", ["model"], registry=r
        ))
        self.slots_total = self._labelled(
            "slots_total", Gauge("appliance_worker_slots_total", "Slots", ["model"], registry=r)
        )
        self.queue_depth = self._labelled("queue_depth", Gauge(
            "appliance_worker_queue_depth", "Requests waiting for a slot", ["model"], registry=r
        ))
        self.batch_size = Histogram(
            "appliance_worker_batch_size", "Sequences per decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.rejected = Counter(
            "appliance_worker_rejected", "Requests refused before generation", ["reason"], registry=r
        )
        self.lanes = LaneMetrics(r, model)  # batch preemptions and tokens per priority class (inference.lanes)
        # Model swaps (docs/CONTRACTS.md C2) and the prompt cache kept across them (inference.diskcache).
        self.model_loads = Counter("appliance_worker_model_loads", "Models loaded", ["model"], registry=r)
        self.model_unloads = Counter("appliance_worker_model_unloads", "Models unloaded", ["model"], registry=r)
        self.model_load_seconds = Histogram(
            "appliance_worker_model_load_seconds", "Time to load a model (file check, weights, cache restore)",
            buckets=LOAD_BUCKETS, registry=r,
        )
        self.prompt_cache_restored_prefixes = Counter(
            "appliance_worker_prompt_cache_restored_prefixes", "Saved prompt prefixes read back from disk",
            ["model"], registry=r,
        )
        self.prompt_cache_restored_tokens = Counter(
            "appliance_worker_prompt_cache_restored_tokens", "Tokens of the saved prefixes read back from disk",
            ["model"], registry=r,
        )
        self.prompt_cache_saved_prefixes = Counter(
            "appliance_worker_prompt_cache_saved_prefixes", "Prompt prefixes written to disk (model unload, shutdown)",
            ["model"], registry=r,
        )

    def _labelled(self, attribute: str, family: M) -> M:
        self._families[attribute] = family
        return family.labels(self.model)

    def serve(self, model: str) -> None:
        """Count under ``model`` from now on (a swap host loaded another model); the old model's gauges go."""
        old, self.model = self.model, model
        for attribute, family in self._families.items():
            if isinstance(family, Gauge) and old != model:
                family.remove(old)
            setattr(self, attribute, family.labels(model))

    def count_prompt(self, prefilled: int, reused: int) -> None:
        """Called by the decode thread (prometheus_client counters are thread-safe)."""
        if prefilled:
            self.prompt_tokens_prefilled.inc(prefilled)
        if reused:
            self.prompt_tokens_reused.inc(reused)

    def prompt_totals(self) -> tuple[int, int]:
        """(prompt tokens, of them reused) since the worker started, over every model it served: the values of
        ``appliance_worker_prompt_tokens_total`` and ``appliance_worker_prompt_tokens_reused_total``, summed."""
        return _total(self._prompt_tokens_family), _total(self._prompt_tokens_reused_family)

    def count_draft(self, drafted: int, accepted: int) -> None:
        """Called by the decode thread after a draft is checked."""
        self.draft_tokens.inc(drafted)
        if accepted:
            self.draft_accepted.inc(accepted)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(self.model, endpoint, str(status)).inc()


def _total(family: Counter) -> int:
    return int(sum(s.value for metric in family.collect() for s in metric.samples if s.name.endswith("_total")))
