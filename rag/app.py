"""The RAG service's aiohttp app factory: state, middlewares (request id, errors, token) and lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from appliance.core.errors import APIError, error_body, not_found, payload_too_large, unauthorized
from appliance.core.request_id import HEADER as REQUEST_ID
from appliance.core.request_id import accept_or_mint, request_id_var
from rag.embedder import Embedder, EmbedderOptions, load_embedder
from rag.metrics import RagMetrics
from rag.routes import add_routes
from rag.service import RagService
from rag.settings import RagSettings
from rag.state import STATE, EmbedderFactory, RagState

__all__ = ["STATE", "RagState", "create_app"]

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PUBLIC = frozenset({"/health", "/metrics"})


def create_app(
    settings: RagSettings, *, embedder: Embedder | None = None, embedder_factory: EmbedderFactory | None = None
) -> web.Application:
    """The app; the embedder (or a factory, run off the event loop at start) is the test seam."""
    if embedder is not None:
        ready = embedder
        embedder_factory = lambda: ready  # noqa: E731
    elif embedder_factory is None:
        options = EmbedderOptions(
            settings.embedding_model,
            settings.embedding_device,
            settings.embed_batch_size,
            settings.compute_threads,
            settings.embedding_backend,
            settings.onnx_cache_dir,
            settings.query_threads,
            settings.query_int8,
        )
        embedder_factory = lambda: load_embedder(options)  # noqa: E731
    app = web.Application(
        middlewares=[_request_context, _errors, _internal_token], client_max_size=settings.max_upload_bytes + 256 * 1024
    )
    app[STATE] = RagState(settings, settings.resolved_internal_token(), RagMetrics(), embedder_factory)
    app.cleanup_ctx.append(_lifecycle)
    add_routes(app)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    starting = asyncio.create_task(_start(state), name="rag-start")
    flushing = asyncio.create_task(_flush_forever(state), name="rag-flush")
    yield
    for task in (starting, flushing):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await state.jobs.close()
    if state.service is not None:
        await state.service.close()
        state.service = None


async def _start(state: RagState) -> None:
    try:
        embedder = await asyncio.to_thread(state.embedder_factory)
        service = RagService(state.settings, embedder, state.metrics)
        await service.open()
    except Exception as exc:
        log.exception("RAG service failed to start")
        state.failure = f"{type(exc).__name__}: {exc}"
        return
    state.service = service
    log.info("RAG service ready", extra={"model": embedder.model_name, "dimension": embedder.dimension})


async def _flush_forever(state: RagState) -> None:
    """Persist dirty indexes now and then; the store already holds every acknowledged document."""
    while True:
        await asyncio.sleep(state.settings.index_flush_interval_s)
        if state.service is None:
            continue
        try:
            await state.service.flush()
        except Exception:  # a failed flush only delays it: the store holds every acknowledged document
            log.exception("index flush failed; will retry")


@web.middleware
async def _request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = accept_or_mint(request.headers.get(REQUEST_ID))
    token = request_id_var.set(request_id)
    try:
        response = await handler(request)
        response.headers[REQUEST_ID] = request_id
        return response
    finally:
        request_id_var.reset(token)


def _error_response(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where errors become OpenAI-shaped responses."""
    try:
        return await handler(request)
    except APIError as exc:
        return _error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return _error_response(payload_too_large("The request body is too large."))
    except web.HTTPNotFound:
        return _error_response(not_found(f"No route for {request.method} {request.path}."))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(
            error_body(exc.reason, code=exc.reason.lower().replace(" ", "_")),
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return web.json_response(
            error_body("Internal server error.", "server_error", code="internal_error"), status=500
        )


@web.middleware
async def _internal_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not (request.method == "GET" and request.path in _PUBLIC):
        given = request.headers.get("X-Internal-Token", "")
        if not hmac.compare_digest(given.encode(), request.app[STATE].token.encode()):
            raise unauthorized("Missing or invalid internal token.")
    return await handler(request)
