"""The balancer's ``GET /v1/models`` (contract C3): every servable model, loaded or not, with its state.

Each model object carries OpenAI's fields, the limits every worker of it accepts and its weights' sha256 (as
before), and for a catalogue entry: ``state`` (``loaded``: some worker takes its requests; ``loading``: a swap
host is on its way to it; ``draining``: its only workers take no new request and finish their running ones
before a swap; ``unloaded``), ``resident`` (``always`` | ``on_demand``), ``pinned``, ``workers`` (the URLs
holding it) and ``memory_bytes`` (what one worker of it needs: the GGUF plus ``slots x n_ctx`` of KV cache,
the README's rule). A model served by workers the catalogue does not list is ``loaded``, ``resident: "always"``.
"""

from __future__ import annotations

from typing import Any

from appliance.core.model_catalogue import CatalogueEntry, entry_bytes
from appliance.core.wire import model_list, strictest_limits
from balancer.pool import WorkerPool
from balancer.worker import Worker, WorkerState

__all__ = ["model_state", "models_view"]


def model_state(model: str, workers: list[Worker]) -> str:
    if any(w.routable and w.model == model for w in workers):
        return "loaded"
    if any(w.swap_to == model or (w.state is WorkerState.LOADING and w.model == model) for w in workers):
        return "loading"
    if any(w.model == model and (w.swap_to is not None or w.draining) and w.inflight for w in workers):
        return "draining"
    return "unloaded"


def models_view(pool: WorkerPool, catalogue: dict[str, CatalogueEntry]) -> dict[str, Any]:
    workers = list(pool)
    serving = [w for w in workers if w.routable and w.model is not None]
    limits = strictest_limits((w.model, w.limits) for w in serving if w.model is not None and w.limits is not None)
    names = sorted(set(pool.models()) | set(catalogue))
    body = model_list(names, limits=limits)
    weights = _weights(serving)
    for item in body["data"]:
        model = item["id"]
        digest = weights.get(model)
        entry = catalogue.get(model)
        if entry is not None:
            if not any(w.model == model for w in serving):
                digest = entry.sha256  # not loaded: the file a host will load, checked by the host
            item.update(state=model_state(model, workers), resident=entry.resident, pinned=entry.pinned,
                        workers=sorted(w.url for w in workers if model in (w.model, w.swap_to)),
                        memory_bytes=entry_bytes(entry))
        else:
            item.update(state=model_state(model, workers), resident="always",
                        workers=sorted(w.url for w in workers if w.model == model))
        if digest:
            item["model_sha256"] = digest
    return body


def _weights(workers: list[Worker]) -> dict[str, str]:
    """Per model, the sha256 of its weights when every worker that reported one agrees (left out while they
    differ, as during a rolling change of weights: no single file answers for the model then)."""
    seen: dict[str, set[str]] = {}
    for worker in workers:
        digest = worker.health.model_sha256 if worker.health is not None else None
        if worker.model is not None and digest:
            seen.setdefault(worker.model, set()).add(digest)
    return {model: digests.pop() for model, digests in seen.items() if len(digests) == 1}
