"""The RAG service's aiohttp app factory: state, the shared edge (request id, token, errors) and lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from appliance.core.edge import edge_middleware
from rag.embedder import load_embedder
from rag.embedding import Embedder, EmbedderOptions
from rag.metrics import RagMetrics
from rag.routes import add_routes
from rag.service import RagService
from rag.settings import RagSettings
from rag.state import STATE, EmbedderFactory, RagState

__all__ = ["STATE", "RagState", "create_app"]

log = logging.getLogger(__name__)


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
    token = settings.resolved_internal_token()
    app = web.Application(
        middlewares=[edge_middleware("RAG service", token)], client_max_size=settings.max_upload_bytes + 256 * 1024
    )
    app[STATE] = RagState(settings, token, RagMetrics(), embedder_factory)
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
