"""What the balancer knows about models: their ids, the sha256 of each model's weights, and their limits.

All of it comes from the balancer's ``/v1/models``, never from the workers directly: each worker
publishes its :class:`~appliance.core.worker_health.WorkerHealth`, and the balancer lists per model
the limits every worker of it accepts (``context_length``, ``max_tokens``, ``max_choices``,
``max_prompts``) and the sha256 of the weights they serve, when they agree. The gateway refuses what
the worker would refuse, with the same error, and the chat UI sizes its controls from the limits.
The response cache keys on the weights' sha256, so replacing the weights behind an alias never
replays an old answer; a model whose workers disagree (mid-change) has no sha256 until they agree.
Refreshed in the background (owner: the app lifespan); a failed refresh keeps the last known values.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec

from appliance.core.errors import APIError
from appliance.core.wire import ModelLimits, model_limits
from gateway.service_client import ServiceClient

__all__ = ["ModelCatalog", "model_hashes"]

_log = logging.getLogger("gateway.catalog")


class _Model(msgspec.Struct):
    id: str
    model_sha256: str = ""


class _ModelList(msgspec.Struct):
    data: list[_Model] = msgspec.field(default_factory=list)


def model_hashes(document: Any) -> dict[str, str]:
    """The ``model_sha256`` of each model of a balancer's ``/v1/models`` list that has one."""
    try:
        listing = msgspec.convert(document, _ModelList)
    except msgspec.ValidationError:
        return {}
    return {model.id: model.model_sha256 for model in listing.data if model.model_sha256}


class ModelCatalog:
    def __init__(self, balancer: ServiceClient, refresh_s: float) -> None:
        self._balancer = balancer
        self._refresh_s = refresh_s
        self._hashes: dict[str, str] = {}
        self._limits: dict[str, ModelLimits] = {}
        self.balancer_health: dict[str, Any] | None = None
        self.balancer_up = False
        self.workers: list[dict[str, Any]] = []  # the balancer's /workers view, for the admin dashboard
        self.checked_at = 0.0

    def model_sha256(self, model: str) -> str:
        """The sha256 of the weights serving ``model`` ("" while unknown)."""
        return self._hashes.get(model, "")

    def limits(self, model: str) -> ModelLimits | None:
        """The limits the workers serving ``model`` publish (None until one has been seen)."""
        return self._limits.get(model)

    async def _json(self, path: str) -> Any:
        reply = await self._balancer.request("GET", path, caller=None)
        try:
            return reply.status, msgspec.json.decode(reply.body)
        except msgspec.DecodeError:
            return reply.status, None

    async def refresh(self) -> None:
        try:
            status, health = await self._json("/health")
            self.balancer_health = health if isinstance(health, dict) else None
            self.balancer_up = status == 200
            status, models = await self._json("/v1/models")
            if status == 200:
                self._limits.update(model_limits(models))
                self._hashes = model_hashes(models)  # a model listed without one lost it: its workers differ
            status, workers = await self._json("/workers")
            if status == 200 and isinstance(workers, dict):
                self.workers = [w for w in workers.get("workers") or [] if isinstance(w, dict)]
        except APIError as exc:
            self.balancer_up = False
            _log.debug("balancer refresh failed", extra={"error": exc.message})
        self.checked_at = time.time()

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s or 10.0)
