"""The worker's aiohttp app factory: routes, middlewares (request id, internal token, errors), lifecycle."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from appliance.core.errors import APIError, not_found, unauthorized
from appliance.core.metrics import CONTENT_TYPE, render
from appliance.core.request_id import HEADER as REQUEST_ID_HEADER
from appliance.core.request_id import accept_or_mint, request_id_var
from inference import handlers
from inference.keys import METRICS, SERVICE, SETTINGS, TOKEN
from inference.metrics import WorkerMetrics
from inference.model import load_model
from inference.registration import registration_ctx
from inference.service import ModelLoader, WorkerService
from inference.settings import WorkerSettings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/health", "/metrics"})
TOKEN_HEADER = "X-Internal-Token"  # noqa: S105 - a header name, not a secret


def _error_response(error: APIError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def _request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id on every log line, the internal token check, and the one error mapping."""
    request_id = accept_or_mint(request.headers.get(REQUEST_ID_HEADER))
    token = request_id_var.set(request_id)
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "unmatched"  # bounded label values
    try:
        response = await _guarded(request, handler)
    finally:
        request_id_var.reset(token)
    if endpoint.startswith("/v1/"):
        request.app[METRICS].request(endpoint, response.status)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> APIError:
    if exc.status == 404:
        return not_found(f"No route {request.method} {request.path}.")
    if exc.status == 405:
        return APIError(405, f"Method {request.method} not allowed on {request.path}.")
    if exc.status == 413:
        return APIError(413, "The request body is too large.", code="payload_too_large")
    return APIError(exc.status, exc.reason)


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.path not in PUBLIC_PATHS:
            supplied = request.headers.get(TOKEN_HEADER, "")
            if not hmac.compare_digest(supplied.encode(), request.app[TOKEN].encode()):
                raise unauthorized(f"Missing or invalid {TOKEN_HEADER}.")
        return await handler(request)
    except APIError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        return _error_response(_from_http_exception(request, exc))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error")
        return _error_response(APIError(500, "Internal error in the inference worker.", type_="server_error"))


async def _health(request: web.Request) -> web.Response:
    status, body = request.app[SERVICE].health()
    return web.json_response(body, status=status)


async def _metrics(request: web.Request) -> web.Response:
    scheduler = request.app[SERVICE].scheduler
    if scheduler is not None:  # gauges are set per decode step; no step runs after the last sequence is cancelled
        request.app[METRICS].slots_busy.set(scheduler.slots_busy)
        request.app[METRICS].queue_depth.set(scheduler.queue_depth)
    body = render(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _engine(app: web.Application) -> AsyncIterator[None]:
    """Load the model in the background (health says 503 meanwhile); stop the decode thread on exit."""
    service = app[SERVICE]
    loading = asyncio.create_task(service.load())
    yield
    loading.cancel()
    await asyncio.gather(loading, return_exceptions=True)
    await asyncio.to_thread(service.close)


def create_app(settings: WorkerSettings, *, loader: ModelLoader = load_model,
               metrics: WorkerMetrics | None = None, internal_token: str | None = None) -> web.Application:
    """The worker app; ``loader`` is the seam for tests that need a model that fails to load."""
    app = web.Application(middlewares=[_request_context], client_max_size=8 * 1024 * 1024)
    metrics = metrics or WorkerMetrics(settings.model_alias)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[TOKEN] = internal_token if internal_token is not None else settings.resolved_internal_token()
    app[SERVICE] = WorkerService(settings, metrics, loader)
    app.cleanup_ctx.append(_engine)
    app.cleanup_ctx.append(registration_ctx)  # after the engine: withdrawn before the model closes
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app
