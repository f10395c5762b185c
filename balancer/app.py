"""App factory: ``create_app(settings)`` builds the balancer; clients are injectable for tests."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from appliance.core.hop_client import HopClient
from appliance.core.metrics import CONTENT_TYPE
from balancer.admin import WorkerAdmin
from balancer.catalogue import CatalogueWatcher
from balancer.health import Prober
from balancer.http import error_middleware, json_response, require_token
from balancer.metrics import BalancerMetrics
from balancer.models_view import model_state, models_view
from balancer.pool import WorkerPool
from balancer.prefix import PrefixTable
from balancer.proxy import Proxy, ProxyTimeouts, QueueNotices
from balancer.registry import RegistryWatcher
from balancer.retry import RetryBudget
from balancer.settings import BalancerSettings
from balancer.swap_metrics import SwapMetrics
from balancer.swapper import Swapper, SwapSettings

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["BUDGET", "METRICS", "POOL", "PROBER", "SETTINGS", "SWAPPER", "create_app"]

SETTINGS = web.AppKey("settings", BalancerSettings)
POOL = web.AppKey("pool", WorkerPool)
BUDGET = web.AppKey("budget", RetryBudget)
METRICS = web.AppKey("metrics", BalancerMetrics)
PROBER = web.AppKey("prober", Prober)
SESSION = web.AppKey("session", aiohttp.ClientSession)
SWAPPER = web.AppKey("swapper", Swapper)


def create_app(settings: BalancerSettings, *, session: aiohttp.ClientSession | None = None,
               redis: Redis | None = None, rng: random.Random | None = None) -> web.Application:
    """Build the app. ``session``/``redis`` are used as given (and not closed) when passed."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    prefixes = PrefixTable(settings.prefix_table_size) if settings.routing == "prefix" else None
    token = settings.resolved_internal_token()
    swap_settings = SwapSettings(policy=settings.swap_policy, max_wait_s=settings.max_swap_wait_s,
                                 queue_timeout_s=settings.swap_queue_timeout_s,
                                 load_timeout_s=settings.swap_load_timeout_s)
    pool = WorkerPool(settings.strategy, settings.queue_size, rng, fair=settings.scheduling == "fair",
                      prefixes=prefixes, max_imbalance=settings.prefix_max_imbalance,
                      reserve=settings.interactive_headroom)
    for url in settings.workers:
        pool.add(url, source="static")
    budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_burst)
    metrics = BalancerMetrics(pool, budget)
    swapper = Swapper(pool, SwapMetrics(metrics.registry), token=token, settings=swap_settings)
    pool.attach_on_demand(swapper)
    proxy = Proxy(pool, budget, metrics, token=token, max_attempts=settings.max_attempts,
                  timeouts=ProxyTimeouts(first_byte_s=settings.first_byte_timeout_s,
                                         queue_s=settings.queue_timeout_s),
                  notices=QueueNotices(settings.queue_notice_after_s, settings.queue_notice_interval_s),
                  swapper=swapper)
    admin = WorkerAdmin(pool, token)
    app[SETTINGS], app[POOL], app[BUDGET], app[METRICS] = settings, pool, budget, metrics
    app[SWAPPER] = swapper

    app.cleanup_ctx.append(_session_ctx(settings, session, proxy))
    app.cleanup_ctx.append(_prober_ctx(settings, admin))
    if redis is not None or settings.redis_url:
        app.cleanup_ctx.append(_registry_ctx(settings, redis))

    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/queue", _queue_handler(token))
    app.router.add_routes(admin.routes())
    app.router.add_get("/v1/models", _models_handler(token))
    app.router.add_route("*", "/v1/{tail:.*}", proxy.handle)
    return app


Ctx = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]


def _session_ctx(settings: BalancerSettings, given: aiohttp.ClientSession | None, proxy: Proxy) -> Ctx:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        session = given or aiohttp.ClientSession(
            # No pool limit: in-flight is bounded by the workers' slots; no total timeout, which
            # would cut long generations.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=settings.worker_keepalive_s),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s,
                                          sock_read=settings.read_timeout_s),
            auto_decompress=False,
        )
        app[SESSION] = session  # probes and the admin API
        client = HopClient(connect_timeout_s=settings.connect_timeout_s, read_timeout_s=settings.read_timeout_s,
                              keepalive_s=settings.worker_keepalive_s)
        proxy.attach(client)  # the proxied requests
        try:
            yield
        finally:
            proxy.attach(None)
            await client.close()
            if given is None:
                await session.close()

    return ctx


def _prober_ctx(settings: BalancerSettings, admin: WorkerAdmin) -> Ctx:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        prober = Prober(app[POOL], app[SESSION], interval_s=settings.probe_interval_s,
                        timeout_s=settings.probe_timeout_s, eject_after=settings.eject_after_failed_probes,
                        readmit_after=settings.readmit_after_good_probes)
        app[PROBER] = prober
        admin.attach(prober)
        swapper = app[SWAPPER]
        swapper.attach(app[SESSION], prober)
        await prober.probe_all()  # serve with known workers from the first request
        try:
            async with _owned_task(prober.run()), _owned_task(swapper.run()):
                yield
        finally:
            await swapper.close()
            swapper.attach(None, None)
            admin.attach(None)

    return ctx


def _registry_ctx(settings: BalancerSettings, given: Redis | None) -> Ctx:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from redis.asyncio import Redis

        client = given or Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2,
                                         **settings.redis_login())
        token = settings.resolved_internal_token()
        watcher = RegistryWatcher(app[POOL], app[PROBER], client, settings.registry_poll_s, token)
        catalogue = CatalogueWatcher(app[SWAPPER], client, settings.registry_poll_s, token)
        try:
            async with _owned_task(watcher.run()), _owned_task(catalogue.run()):
                yield
        finally:
            if given is None:
                await client.aclose()

    return ctx


@contextlib.asynccontextmanager
async def _owned_task(coro: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    task = asyncio.create_task(coro)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _health(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    healthy = pool.healthy_count
    payload = {
        "status": "ok" if healthy else "unavailable",
        "healthy_workers": healthy,
        "workers": len(pool),
        "models": pool.routable_models(),
        "queue_depth": pool.queue_depth,
    }
    return json_response(payload, 200 if healthy else 503, None if healthy else {"Retry-After": "2"})


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _queue_handler(token: str) -> Callable[[web.Request], Coroutine[Any, Any, web.Response]]:
    token_bytes = token.encode()

    async def queue(request: web.Request) -> web.Response:
        """Who waits and who runs, per model and key, and each model's state (a model waiting for a swap host
        is ``unloaded`` or ``loading``) (internal token): the admin page's queue view."""
        require_token(request, token_bytes)
        pool = request.app[POOL]
        now = time.monotonic()
        workers = list(pool)
        models = [{"model": model, "state": model_state(model, workers), "waiting": len(q),
                   "virtual_time": round(q.vtime, 1), "keys": q.describe(now)}
                  for model, q in sorted(pool.queues().items())]
        return json_response({"queue_depth": pool.queue_depth, "scheduling": request.app[SETTINGS].scheduling,
                              "routing": request.app[SETTINGS].routing, "models": models})

    return queue


def _models_handler(token: str) -> Callable[[web.Request], Coroutine[Any, Any, web.Response]]:
    token_bytes = token.encode()

    async def models(request: web.Request) -> web.Response:
        """Every servable model, loaded or not, with its state (balancer.models_view)."""
        require_token(request, token_bytes)
        return json_response(models_view(request.app[POOL], request.app[SWAPPER].catalogue))

    return models
