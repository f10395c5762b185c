"""The gateway's app factory: routes, injected clients, lifespan, one error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from appliance.core.audit import AuditLog
from gateway.access import access_middleware
from gateway.admission import Admission
from gateway.audit_trail import AdminViews
from gateway.auth.middleware import session_middleware
from gateway.auth.web import new_web_auth
from gateway.batches import BatchesLifecycle
from gateway.bootstrap import ensure_admin_key
from gateway.cache import ResponseCache
from gateway.catalog import ModelCatalog
from gateway.exceptions import exception_handlers
from gateway.hot_redis import HotRedis
from gateway.keys import KeyLimits, KeyStore
from gateway.metrics import GatewayMetrics
from gateway.openapi import complete_openapi
from gateway.ownership import CollectionOwners
from gateway.redis_guard import RedisGuard, RedisUnavailable
from gateway.resp import PipelinedRedis
from gateway.responses import ResponsesLifecycle
from gateway.routes import admin, batches, openai, ops, responses
from gateway.routes import auth as sign_in_routes
from gateway.routes import users as user_routes
from gateway.routes.collections import collections_router
from gateway.routes.files import files_router
from gateway.service_client import ServiceClient
from gateway.services import GatewayServices
from gateway.settings import GatewaySettings

__all__ = ["create_app", "new_http_session", "new_redis"]

_log = logging.getLogger("gateway")
# Builds the hot path's Redis client from the settings and the admin paths' redis-py client.
HotRedisFactory = Callable[[GatewaySettings, Redis], HotRedis]
UI_STATIC = Path(__file__).resolve().parent / "ui" / "static"


def new_redis(settings: GatewaySettings) -> Redis:
    # No retries with back-off: a dead Redis must cost milliseconds, not seconds (the guard degrades). One
    # immediate retry on a dropped connection only: a pooled connection Redis closed when it restarted is
    # replaced instead of failing the request (a timeout is not retried).
    return Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                          socket_connect_timeout=settings.redis_timeout_s,
                          retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                          max_connections=512, **settings.redis_login())


def new_http_session(settings: GatewaySettings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=settings.upstream_pool_size, keepalive_timeout=30)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False)


def _pipelined(settings: GatewaySettings, _: Redis) -> HotRedis:
    return PipelinedRedis.from_url(settings.redis_url, timeout_s=settings.redis_timeout_s, **settings.redis_login())


def _services(settings: GatewaySettings, redis: Redis, http: aiohttp.ClientSession,
              metrics: GatewayMetrics, hot_redis: HotRedisFactory) -> GatewayServices:
    token = settings.resolved_internal_token()
    guard = RedisGuard(redis, hot_redis(settings, redis))
    balancer = ServiceClient("balancer", settings.balancer_url, http, token,
                             connect_timeout_s=settings.connect_timeout_s, read_timeout_s=settings.read_timeout_s,
                             keepalive_s=settings.upstream_keepalive_s)
    return GatewayServices(
        settings=settings, guard=guard,
        admission=Admission(guard, key_cache_ttl_s=settings.key_cache_ttl_s,
                            fail_open=settings.rate_limit_fail_open, inflight_ttl_s=settings.concurrency_ttl_s,
                            on_refused=lambda limit: metrics.rate_limited.labels(limit).inc()),
        cache=ResponseCache(guard, settings.cache_max_entry_bytes, max_bytes=settings.cache_max_bytes,
                            max_ttl_s=settings.cache_max_ttl_s), keys=KeyStore(redis),
        balancer=balancer,
        rag=ServiceClient("rag service", settings.rag_url, http, token,
                          connect_timeout_s=settings.connect_timeout_s, read_timeout_s=settings.read_timeout_s,
                          keepalive_s=settings.upstream_keepalive_s),
        catalog=ModelCatalog(balancer, settings.model_info_ttl_s), metrics=metrics, fence_secret=token,
        owners=CollectionOwners(guard),
        web_auth=new_web_auth(settings.auth, redis, KeyStore(redis), server_secret=token,
                              default_limits=KeyLimits(settings.default_rpm, settings.default_tpm, settings.default_tpd,
                                                       settings.default_max_concurrent),
                              tls=bool(settings.tls_cert or settings.tls_self_signed)),
        audit=AuditLog(settings.resolved_audit_path(), anchor_every=settings.audit_anchor_every),
        admin_views=AdminViews(settings.audit_view_gap_s),
    )


def create_app(settings: GatewaySettings, *, redis: Redis | None = None,
               http: aiohttp.ClientSession | None = None, hot_redis: HotRedisFactory = _pipelined) -> Litestar:
    """Build the gateway. ``redis`` and ``http`` are injected (tests pass their own); when omitted
    they are created and closed in the lifespan. ``hot_redis`` builds the hot path's Redis client
    (default: :class:`PipelinedRedis`; ``appliance bench gateway`` also runs redis-py's pipeline)."""
    state: dict[str, GatewayServices] = {}
    metrics = GatewayMetrics()
    stored_responses = ResponsesLifecycle(settings)
    batch_api = BatchesLifecycle(settings, lambda: state["svc"], stored_responses.provide)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        own_redis, own_http = redis is None, http is None
        redis_client = redis if redis is not None else new_redis(settings)
        session = http if http is not None else new_http_session(settings)
        svc = _services(settings, redis_client, session, metrics, hot_redis)
        state["svc"] = svc
        catalog = svc.catalog  # a model is a label value once the workers publish it (limits or file hash)
        metrics.follow_models(lambda model: catalog.limits(model) is not None or bool(catalog.model_sha256(model)))
        try:
            await svc.guard.call(lambda: ensure_admin_key(svc.keys, settings.data_dir, svc.audit))
        except RedisUnavailable:
            _log.warning("redis unavailable at start; the bootstrap admin key will be checked at next start")
        refresher = asyncio.get_running_loop().create_task(svc.catalog.run())
        # Everything built so far lives as long as the process: keep it out of every future GC pass.
        gc.freeze()
        _log.info("gateway ready", extra={"balancer": settings.balancer_url, "rag": settings.rag_url})
        try:
            yield
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await svc.tasks.drain()
            await svc.web_auth.close()
            await svc.guard.pipe.close()
            await svc.balancer.close()
            await svc.rag.close()
            if own_http:
                await session.close()
            if own_redis:
                await redis_client.aclose()

    def provide_services() -> GatewayServices:
        return state["svc"]

    handlers: list[Any] = [
        openai.chat_completions, openai.completions, openai.embeddings, openai.list_models, openai.retrieve_model,
        admin.create_key, admin.list_keys, admin.get_key, admin.revoke_key, admin.usage, admin.admin_status,
        admin.update_key, admin.queue, admin.share_collection, *responses.HANDLERS,
        ops.healthz, ops.readyz, ops.metrics,
        *sign_in_routes.HANDLERS, *user_routes.HANDLERS,
        collections_router(settings.max_upload_bytes), files_router(settings.files_max_bytes), *batches.HANDLERS,
        *ops.ui_routes(UI_STATIC),
    ]
    app = Litestar(
        route_handlers=handlers,
        dependencies={"svc": Provide(provide_services, sync_to_thread=False),
                      "responses": Provide(stored_responses.provide, sync_to_thread=False),
                      "batches": Provide(batch_api.provide, sync_to_thread=False)},
        lifespan=[lifespan, stored_responses.lifespan, batch_api.lifespan],
        exception_handlers=exception_handlers(),
        middleware=[access_middleware(metrics), session_middleware(lambda: state["svc"].web_auth)],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="LLM appliance gateway", version="0.1.0", path="/schema"),
        logging_config=None,
        debug=False,
    )
    complete_openapi(app)
    return app
