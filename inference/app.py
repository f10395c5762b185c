"""The worker's aiohttp app factory: routes, the shared edge (request id, internal token, errors), lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from appliance.core.edge import edge_middleware
from appliance.core.errors import APIError
from appliance.core.metrics import CONTENT_TYPE, render
from appliance.core.model_catalogue import CatalogueEntry, read_entry
from appliance.core.worker_health import encode_worker_health
from inference import handlers
from inference.cachekeeper import PromptCacheKeeper
from inference.diskcache import DiskPromptCache
from inference.keys import METRICS, SERVICE, SETTINGS, TOKEN
from inference.metrics import WorkerMetrics
from inference.model import load_model
from inference.registration import REDIS, REDIS_TIMEOUT_S, REGISTRATION, RedisFailure, redis_ctx, registration_ctx
from inference.service import ModelLoader, WorkerService
from inference.settings import WorkerSettings
from inference.swap import SWAPPER, ModelSwapper, admin_model

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _observe(request: web.Request, response: web.StreamResponse) -> None:
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "unmatched"  # bounded label values
    if endpoint.startswith("/v1/"):
        request.app[METRICS].request(endpoint, response.status)


async def _health(request: web.Request) -> web.Response:
    status, health = request.app[SERVICE].health()
    return web.Response(body=encode_worker_health(health), status=status, content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    scheduler = request.app[SERVICE].scheduler
    if scheduler is not None:  # gauges are set per decode step; no step runs after the last sequence is cancelled
        request.app[METRICS].slots_busy.set(scheduler.slots_busy)
        request.app[METRICS].queue_depth.set(scheduler.queue_depth)
    body = render(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _engine(app: web.Application) -> AsyncIterator[None]:
    """Load the model in the background (health says 503 meanwhile); stop the decode thread on exit (the prompt
    cache is saved then: inference.diskcache)."""
    service, swapper = app[SERVICE], app[SWAPPER]
    loading = asyncio.create_task(swapper.start() if app[SETTINGS].swap_host else service.load())
    yield
    loading.cancel()
    await asyncio.gather(loading, return_exceptions=True)
    await swapper.close()
    await service.settle()  # cancelled sequences leave their slots: their cells are saved with the cache
    await asyncio.to_thread(service.close)


def _swapper(app: web.Application, service: WorkerService, metrics: WorkerMetrics, token: str) -> ModelSwapper:
    """The swap host's half (inference.swap): the signed catalogue and the registry through the worker's Redis."""

    async def read(alias: str) -> CatalogueEntry | None:
        client = app.get(REDIS)
        if client is None:
            return None
        try:
            return await asyncio.wait_for(read_entry(client, token, alias), REDIS_TIMEOUT_S)
        except RedisFailure as exc:
            raise APIError(503, "The model catalogue cannot be read (Redis); retry shortly.", type_="server_error",
                           code="catalogue_unavailable", retry_after=2) from exc

    async def announce(alias: str | None) -> None:
        registration = app.get(REGISTRATION)
        if registration is not None:
            await registration.switch(alias)

    return ModelSwapper(service, metrics, read, announce)


def create_app(settings: WorkerSettings, *, loader: ModelLoader = load_model,
               metrics: WorkerMetrics | None = None, internal_token: str | None = None) -> web.Application:
    """The worker app; ``loader`` is the seam for tests that need a model that fails to load."""
    token = internal_token if internal_token is not None else settings.resolved_internal_token()
    edge = edge_middleware("inference worker", token, observe=_observe)
    app = web.Application(middlewares=[edge], client_max_size=8 * 1024 * 1024)
    metrics = metrics or WorkerMetrics(settings.model_alias)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[TOKEN] = token
    keeper = PromptCacheKeeper(DiskPromptCache(settings.data_dir / "kvcache", token, settings.prompt_cache_disk_bytes))
    app[SERVICE] = service = WorkerService(settings, metrics, loader, keeper)
    app[SWAPPER] = _swapper(app, service, metrics, token)
    app.cleanup_ctx.append(redis_ctx)  # first: the engine's swap host reads the catalogue through it
    app.cleanup_ctx.append(_engine)
    app.cleanup_ctx.append(registration_ctx)  # after the engine: withdrawn before the model closes
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/v1/models/{model:.+}", handlers.model)
    app.router.add_get("/health", _health)
    app.router.add_post("/admin/model", admin_model)
    app.router.add_get("/metrics", _metrics)
    return app
