"""A swap host: one worker that serves any catalogue entry, one at a time (docs/CONTRACTS.md C2).

``POST /admin/model`` ``{"model": "<alias>"}`` (internal token, like every route but ``/health``): 404
``model_not_found`` for an alias the signed catalogue (appliance.core.model_catalogue) does not hold, 409
``worker_busy`` while a request is in flight or another swap runs (the balancer drains first), 400
``model_too_large`` past ``memory_bytes``, 403 ``model_not_allowed`` outside ``allowed_sha256``. Otherwise the
loaded model's prompt cache, its slots' cells included, is saved (inference.diskcache), the model freed,
the entry loaded with its own slots and n_ctx after its file's sha256 matched the entry's, that model's
saved cache read back, and the worker announced under the new alias; the answer is 200 ``{"model",
"load_s", "unload_s", "restored_prefixes", "restored_tokens"}``. The swap runs in a task this object owns:
a caller that goes away does not leave a half-loaded worker. Generation requests meanwhile get 503 with
``Retry-After`` (inference.service), ``/health`` says ``loading``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from appliance.core.errors import APIError, forbidden, not_found
from appliance.core.ids import ModelId
from appliance.core.model_catalogue import CatalogueEntry, entry_bytes
from appliance.core.wire import parse_json
from inference.metrics import WorkerMetrics
from inference.service import WorkerService
from inference.settings import WorkerSettings

__all__ = ["SWAPPER", "CatalogueReader", "ModelSwapper", "admin_model", "entry_settings"]

log = logging.getLogger(__name__)

# The catalogue entry of an alias (None when it has none or its signature fails).
CatalogueReader = Callable[[str], Awaitable[CatalogueEntry | None]]
# Tell the registry which model this worker serves now (None: none).
Announcer = Callable[[str | None], Awaitable[None]]


def busy(message: str) -> APIError:
    return APIError(409, message, type_="invalid_request_error", code="worker_busy", retry_after=1)


def entry_settings(base: WorkerSettings, entry: CatalogueEntry) -> WorkerSettings:
    """The worker's settings for serving ``entry``: its file (only if its sha256 is the entry's), alias, slots
    and n_ctx; raises a 403 or 400 APIError when the worker's own rules refuse it."""
    if base.allowed_sha256 and entry.sha256 not in base.allowed_sha256:
        raise forbidden(f"The model {entry.alias!r} (sha256 {entry.sha256}) is not in this worker's allowed_sha256.")
    needed = entry_bytes(entry)
    if base.memory_bytes and needed > base.memory_bytes:
        raise APIError(400, f"The model {entry.alias!r} needs {needed} bytes ({entry.size_bytes} of weights + "
                            f"{entry.slots} slots x {entry.n_ctx} tokens x {entry.kv_bytes_per_token} bytes of KV), "
                            f"more than this worker's memory_bytes {base.memory_bytes}.",
                       param="model", code="model_too_large")
    return base.model_copy(update={"model_path": entry.path, "model_alias": entry.alias, "slots": entry.slots,
                                   "n_ctx": entry.n_ctx, "allowed_sha256": [entry.sha256]})


class ModelSwapper:
    def __init__(self, service: WorkerService, metrics: WorkerMetrics, read_entry: CatalogueReader,
                 announce: Announcer) -> None:
        self._service = service
        self._metrics = metrics
        self._read_entry = read_entry
        self._announce = announce
        self._task: asyncio.Task[dict[str, Any]] | None = None

    @property
    def swapping(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """At startup: load ``initial_model`` when one is set, else hold none."""
        service = self._service
        alias = service.base.initial_model
        if not alias:
            service.state, service.alias = "empty", ""
            return
        try:
            await self.swap(alias)
        except APIError as exc:  # the catalogue lacks it, or its file is refused: serve nothing, say why
            log.error("initial model not loaded: %s", exc.message)
        except Exception:  # a load that crashed: the worker stays up, empty, for the next swap
            log.exception("initial model not loaded")

    async def swap(self, alias: str) -> dict[str, Any]:
        """Serve ``alias`` (see the module docstring); the 200 body."""
        service = self._service
        if not service.base.swap_host:
            raise APIError(409, "This worker is not a swap host: it serves its one model.", code="not_a_swap_host")
        if self.swapping:
            raise busy("This worker is already loading a model.")
        entry = await self._read_entry(alias)
        if entry is None:
            raise not_found(f"The model {alias!r} is not in the model catalogue.", param="model",
                            code="model_not_found")
        settings = entry_settings(service.base, entry)
        if service.state == "ok" and service.alias == alias and service.model is not None \
                and service.model.sha256 == entry.sha256 and service.settings == settings:
            return {"model": alias, "load_s": 0.0, "unload_s": 0.0, "restored_prefixes": 0, "restored_tokens": 0}
        if not await service.settle():
            raise busy("Requests are in flight on this worker; drain it before swapping its model.")
        if self.swapping:  # another swap began while this one waited
            raise busy("This worker is already loading a model.")
        service.state = "loading"  # from now on (no await before this) a new request gets 503
        self._task = asyncio.create_task(self._replace(settings), name=f"swap-to-{alias}")
        return await asyncio.shield(self._task)

    async def _replace(self, settings: WorkerSettings) -> dict[str, Any]:
        service, metrics = self._service, self._metrics
        old, alias = service.alias, settings.model_alias
        started = time.perf_counter()
        if service.model is not None:
            saved = await service.unload()
            metrics.model_unloads.labels(old).inc()
            log.info("model unloaded", extra={"model": old, "saved_prefixes": saved.prefixes,
                                              "saved_tokens": saved.tokens})
        unloaded = time.perf_counter()
        service.state, service.alias = "loading", alias
        await self._announce(alias)  # balancers see this worker loading the new model
        try:
            restored = await service.open(settings)
        except Exception as exc:
            service.state, service.alias, service.failure = "empty", "", str(exc)
            log.error("model load failed", extra={"model": alias, "error": str(exc)[:300]})
            await self._announce(None)
            raise APIError(500, f"The model {alias!r} could not be loaded: {exc}", type_="server_error",
                           code="model_load_failed") from None
        load_s = time.perf_counter() - unloaded
        metrics.model_loads.labels(alias).inc()
        metrics.model_load_seconds.observe(load_s)
        log.info("model swapped in", extra={"model": alias, "previous": old, "load_s": round(load_s, 3),
                                            "restored_prefixes": restored.prefixes,
                                            "restored_tokens": restored.tokens, "ignored_files": restored.ignored})
        return {"model": alias, "load_s": round(load_s, 3), "unload_s": round(unloaded - started, 3),
                "restored_prefixes": restored.prefixes, "restored_tokens": restored.tokens}

    async def close(self) -> None:
        """On the way out: a swap under way finishes first (a model half loaded is freed by the service)."""
        task, self._task = self._task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)


SWAPPER = web.AppKey("swapper", ModelSwapper)


class ModelChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str


async def admin_model(request: web.Request) -> web.Response:
    """``POST /admin/model``: serve another catalogue entry."""
    choice = parse_json(ModelChoice, await request.read())
    alias = ModelId.parse(choice.model, param="model")
    return web.json_response(await request.app[SWAPPER].swap(str(alias)))
