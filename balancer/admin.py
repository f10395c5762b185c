"""Membership without restart: ``GET/POST/DELETE /workers`` (internal token)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from appliance.core import strict_json
from appliance.core.errors import bad_request, not_found
from balancer.health import Prober
from balancer.http import json_response, require_token
from balancer.pool import WorkerPool
from balancer.settings import normalise_worker_url

__all__ = ["WorkerAdmin"]

_DRAIN_POLL_S = 0.05


class WorkerAdmin:
    def __init__(self, pool: WorkerPool, token: str) -> None:
        self._pool = pool
        self._token = token.encode()
        self._prober: Prober | None = None

    def attach(self, prober: Prober | None) -> None:
        self._prober = prober

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/workers", self.list_workers),
            web.post("/workers", self.add_worker),
            web.delete("/workers", self.remove_worker),
        ]

    async def list_workers(self, request: web.Request) -> web.Response:
        require_token(request, self._token)
        return json_response({
            "workers": [w.describe() for w in self._pool],
            "queue_depth": self._pool.queue_depth,
        })

    async def add_worker(self, request: web.Request) -> web.Response:
        """Body ``{"url": "http://host:port"}``; probed at once, so the answer shows its state."""
        require_token(request, self._token)
        url = await _url_from(request)
        existed = self._pool.get(url) is not None
        worker = self._pool.add(url, source="admin")
        if self._prober is not None:
            await self._prober.probe(worker)
        return json_response(worker.describe(), 200 if existed else 201)

    async def remove_worker(self, request: web.Request) -> web.Response:
        """``?url=…`` (or the same JSON body): drain, then remove; ``?wait=SECONDS`` waits for the drain."""
        require_token(request, self._token)
        url = await _url_from(request)
        worker = self._pool.remove(url)
        if worker is None:
            raise not_found(f"No worker {url}.", param="url", code="worker_not_found")
        try:
            wait_s = float(request.query.get("wait", "0"))
        except ValueError:
            raise bad_request("wait must be a number of seconds.", param="wait") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, min(wait_s, 600.0))
        while worker.inflight and loop.time() < deadline:  # noqa: ASYNC110 - bounded admin wait
            await asyncio.sleep(_DRAIN_POLL_S)
        removed = self._pool.get(url) is not worker
        return json_response({**worker.describe(), "removed": removed}, 200 if removed else 202)


async def _url_from(request: web.Request) -> str:
    raw = request.query.get("url")
    if raw is None and request.can_read_body:
        try:
            payload = await request.json(loads=strict_json.loads)
        except ValueError:
            raise bad_request("Body must be JSON like {\"url\": \"http://host:port\"}.") from None
        raw = payload.get("url") if isinstance(payload, dict) else None
    if not isinstance(raw, str):
        raise bad_request("Give the worker's base URL as ?url= or {\"url\": ...}.", param="url")
    try:
        return normalise_worker_url(raw)
    except ValueError as exc:
        raise bad_request(str(exc), param="url") from None
