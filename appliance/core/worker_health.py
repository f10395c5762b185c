"""What a worker publishes on ``GET /health``: one typed contract, written by the worker, read by the balancer.

``200`` with ``status: "ok"`` once the model is loaded, every field below filled in except ``error``;
``503`` with ``status`` ``"loading"`` or ``"failed"`` (and ``error``) before that, with only ``model`` (and a
swap host's ``swap_host``, ``loading``, ``memory_bytes``; ``"empty"`` for a swap host that holds no model).
Fields left at None are not sent. A reader ignores fields it does not know, so a worker may publish
more than an older balancer reads. The balancer keeps each worker's last good answer and publishes, per
model, the limits every worker accepts and the sha256 of the weights they serve: the gateway reads
those from the balancer alone.
"""

from __future__ import annotations

from typing import Any

import msgspec

from appliance.core.wire import ModelLimits

__all__ = ["WorkerHealth", "decode_worker_health", "encode_worker_health"]


class WorkerHealth(msgspec.Struct, frozen=True, omit_defaults=True):
    status: str  # "ok", "loading" or "failed"
    model: str | None = None  # the alias the worker serves
    error: str | None = None  # why loading failed
    slots_total: int | None = None
    slots_busy: int | None = None
    queue_depth: int | None = None
    queue_limit: int | None = None
    model_sha256: str | None = None  # of the weights file: the response cache keys on it
    n_ctx: int | None = None
    gpu_layers: int | None = None
    # The worker's limits (appliance.core.wire.ModelLimits), flat as on /v1/models.
    context_length: int | None = None
    max_tokens: int | None = None
    max_choices: int | None = None
    max_prompts: int | None = None
    decode: dict[str, Any] | None = None  # how the worker decodes (its mode and settings), as it describes it
    # Since the worker started, over every model it served: its counters appliance_worker_prompt_tokens_total and
    # appliance_worker_prompt_tokens_reused_total (the admin dashboard's prefix reuse rate is their ratio).
    prompt_tokens: int | None = None
    prompt_tokens_reused: int | None = None
    # Model swapping (docs/CONTRACTS.md C2). A swap host serves any on_demand catalogue entry, one at a time,
    # switched by ``POST /admin/model``. While it loads one (503, status "loading"), ``model`` is the alias being
    # loaded and ``loading`` is true; a swap host holding no model answers 503 with status "empty" and model "".
    swap_host: bool | None = None
    loading: bool | None = None
    memory_bytes: int | None = None  # the memory this worker may use for weights and KV cache (0: not bounded)

    @property
    def ready(self) -> bool:
        return self.status == "ok" and bool(self.model)

    def limits(self) -> ModelLimits | None:
        """The limits it publishes (None when ``context_length`` or ``max_tokens`` is missing)."""
        if not (self.context_length and self.max_tokens and self.context_length > 0 and self.max_tokens > 0):
            return None
        return ModelLimits(context_length=self.context_length, max_tokens=self.max_tokens,
                           max_choices=_positive(self.max_choices), max_prompts=_positive(self.max_prompts))


def _positive(value: int | None) -> int | None:
    return value if value is not None and value > 0 else None


_decoder = msgspec.json.Decoder(WorkerHealth)
_encoder = msgspec.json.Encoder()


def decode_worker_health(raw: bytes) -> WorkerHealth:
    """Parse a ``/health`` body; raises ``msgspec.DecodeError`` or ``msgspec.ValidationError``."""
    return _decoder.decode(raw)


def encode_worker_health(health: WorkerHealth) -> bytes:
    return _encoder.encode(health)
