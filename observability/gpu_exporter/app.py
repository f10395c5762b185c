"""aiohttp app factory for the GPU exporter: ``GET /metrics`` and ``GET /health``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from appliance.core.metrics import CONTENT_TYPE
from observability.gpu_exporter.exposition import render_snapshot
from observability.gpu_exporter.nvml import NvmlApi, NvmlReader
from observability.gpu_exporter.settings import GpuExporterSettings

__all__ = ["READER", "create_app"]

READER = web.AppKey("reader", NvmlReader)


async def _metrics(request: web.Request) -> web.Response:
    snapshot = await asyncio.to_thread(request.app[READER].snapshot)
    body = render_snapshot(snapshot)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _health(request: web.Request) -> web.Response:
    snapshot = await asyncio.to_thread(request.app[READER].snapshot)
    return web.json_response({
        "status": "ok",
        "nvml_available": snapshot.nvml_available,
        "gpu_count": len(snapshot.gpus),
        "reason": snapshot.reason,
    })


def create_app(settings: GpuExporterSettings, nvml: NvmlApi) -> web.Application:
    """The exporter; ``nvml`` is the ``pynvml`` module in production, a fake in tests."""
    app = web.Application()
    app[READER] = NvmlReader(nvml, settings.nvml_retry_s)

    async def nvml_session(app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(app[READER].snapshot)  # first init (and the "no GPU" log line) at start
        yield
        await asyncio.to_thread(app[READER].close)

    app.cleanup_ctx.append(nvml_session)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    return app
