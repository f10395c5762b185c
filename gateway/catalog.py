"""What the balancer knows about models: their ids, the sha256 of each model file, and their limits.

The response cache keys on the model's file hash, so replacing the weights
behind an alias never replays an old answer. The limits (``context_length``,
``max_tokens``, ``max_choices``, ``max_prompts``) are the workers' own, published on
``/v1/models``: the gateway refuses what the worker would refuse, with the
same error, and the chat UI sizes its controls from them. Refreshed in the background (owner:
the app lifespan); a failed refresh keeps the last known values.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import msgspec

from appliance.core.errors import APIError
from appliance.core.wire import ModelLimits, model_limits
from gateway.upstream import Upstream

__all__ = ["ModelCatalog", "find_model_hashes"]

_log = logging.getLogger("gateway.catalog")


def find_model_hashes(document: Any) -> dict[str, str]:
    """Every ``{"model": id, "model_sha256": hash}`` pair (or ``sha256``) anywhere in a JSON document."""
    found: dict[str, str] = {}
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            model = node.get("model") or node.get("id")
            digest = node.get("model_sha256") or node.get("sha256")
            if isinstance(model, str) and isinstance(digest, str) and digest:
                found.setdefault(model, digest)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _worker_urls(document: Any) -> list[str]:
    urls: list[str] = []
    stack = [document]
    while stack and len(urls) < 32:
        node = stack.pop()
        if isinstance(node, dict):
            url = node.get("url")
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                urls.append(url.rstrip("/"))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return urls


class ModelCatalog:
    def __init__(self, balancer: Upstream, session: aiohttp.ClientSession, refresh_s: float) -> None:
        self._balancer = balancer
        self._session = session
        self._refresh_s = refresh_s
        self._hashes: dict[str, str] = {}
        self._limits: dict[str, ModelLimits] = {}
        self.balancer_health: dict[str, Any] | None = None
        self.balancer_up = False
        self.workers: list[dict[str, Any]] = []  # the balancer's /workers view, for the admin dashboard
        self.checked_at = 0.0

    def model_sha256(self, model: str) -> str:
        return self._hashes.get(model, "")

    def limits(self, model: str) -> ModelLimits | None:
        """The limits the workers serving ``model`` publish (None until one has been seen)."""
        return self._limits.get(model)

    async def _json(self, path: str) -> Any:
        reply = await self._balancer.request("GET", path)
        try:
            return reply.status, msgspec.json.decode(reply.body)
        except msgspec.DecodeError:
            return reply.status, None

    async def _worker_hashes(self, urls: list[str]) -> dict[str, str]:
        """The balancer does not report file hashes; each worker's public /health does."""
        found: dict[str, str] = {}
        timeout = aiohttp.ClientTimeout(total=2)
        for url in urls:
            try:
                async with self._session.get(url + "/health", timeout=timeout) as resp:
                    found.update(find_model_hashes(await resp.json(content_type=None)))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
        return found

    async def refresh(self) -> None:
        hashes: dict[str, str] = {}
        try:
            status, health = await self._json("/health")
            self.balancer_health = health if isinstance(health, dict) else None
            self.balancer_up = status == 200
            hashes.update(find_model_hashes(health))
            status, models = await self._json("/v1/models")
            hashes.update(find_model_hashes(models))
            if status == 200:
                self._limits.update(model_limits(models))
            status, workers = await self._json("/workers")
            if status == 200:
                self.workers = [w for w in (workers or {}).get("workers", []) if isinstance(w, dict)]
                hashes.update(await self._worker_hashes(_worker_urls(workers)))
        except APIError as exc:
            self.balancer_up = False
            _log.debug("balancer refresh failed", extra={"error": exc.message})
        self._hashes.update(hashes)
        self.checked_at = time.time()

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s or 10.0)
