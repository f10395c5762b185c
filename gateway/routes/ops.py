"""Operations: liveness, readiness (names the failing dependency), metrics, and the web UI files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Response, get
from litestar.response import File
from litestar.static_files import create_static_files_router

from appliance.core.metrics import CONTENT_TYPE, render
from gateway.openapi import documented
from gateway.services import Services

__all__ = ["healthz", "metrics", "readyz", "ui_routes"]


@get("/healthz", summary="Liveness", include_in_schema=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="Readiness: 503 if the balancer is down; 200 'degraded' if only Redis or RAG is",
     opt=documented(answers={200: None, 503: None}, errors=()))
async def readyz(svc: Services) -> Response[Any]:
    redis_up = await svc.guard.ping()
    await svc.catalog.refresh()
    try:
        rag = await svc.rag.request("GET", "/health", caller=None)
        rag_up = rag.status == 200
    except Exception:  # any failure means "not up"
        rag_up = False
    deps = {"redis": redis_up, "balancer": svc.catalog.balancer_up, "rag": rag_up}
    for name, up in deps.items():
        svc.metrics.dependency_up.labels(name).set(1 if up else 0)
    failing = [name for name, up in deps.items() if not up]
    status = "ok" if not failing else ("unavailable" if "balancer" in failing else "degraded")
    code = 503 if status == "unavailable" else 200
    headers = {"Retry-After": "2"} if code == 503 else {}
    return Response({"status": status, "dependencies": deps, "failing": failing}, status_code=code,
                    headers=headers)


@get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE)
async def metrics(svc: Services) -> Response[bytes]:
    return Response(render(svc.metrics.registry), media_type=CONTENT_TYPE)


def ui_routes(static_dir: Path) -> list[Any]:
    """Serve ``gateway/ui/static`` at ``/`` and ``/static/…`` when the web UI is installed."""
    if not static_dir.is_dir():
        return []
    index = static_dir / "index.html"

    @get("/", include_in_schema=False)
    async def ui_index() -> File:
        return File(index, content_disposition_type="inline", media_type="text/html")

    admin_page = static_dir / "admin.html"

    @get("/admin", include_in_schema=False)
    async def ui_admin() -> File:
        return File(admin_page, content_disposition_type="inline", media_type="text/html")

    handlers: list[Any] = [create_static_files_router(path="/static", directories=[static_dir])]
    if index.is_file():
        handlers.append(ui_index)
    if admin_page.is_file():
        handlers.append(ui_admin)
    return handlers

