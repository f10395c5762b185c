"""The balancer app in this event loop, in front of fake workers, and the requests its tests send it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from appliance.bench.fake_worker import serving
from appliance.bench.harness import until
from appliance.core.sse import SSEDecoder
from balancer import BalancerSettings, create_app

__all__ = ["AUTH", "FAST", "MODEL", "PROBE_TIMEOUT_S", "TOKEN", "balancer", "chat", "post", "stream_events", "until"]

TOKEN = "test-internal-token-padded-to-32-characters"
AUTH = {"X-Internal-Token": TOKEN}
MODEL = "fake-model"
# Probes often, but with timeouts a loaded 2-core machine always meets (a healthy fake answering a probe
# late must not be ejected); tests that need a timeout to fire wait for the event, bounded by the setting.
PROBE_TIMEOUT_S = 2.0
FAST = {"probe_interval_s": 0.1, "probe_timeout_s": PROBE_TIMEOUT_S, "eject_after_failed_probes": 1,
        "readmit_after_good_probes": 2, "connect_timeout_s": 2.0}


@asynccontextmanager
async def balancer(workers: list[str], **overrides: Any) -> AsyncIterator[tuple[str, web.Application]]:
    options: dict[str, Any] = {**FAST, **overrides}
    settings = BalancerSettings(workers=tuple(workers), internal_token=TOKEN, **options)
    app = create_app(settings, redis=options.pop("redis_client", None))
    async with serving(app) as url:
        yield url, app


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


async def post(client: aiohttp.ClientSession, url: str, body: dict[str, Any], **kw: Any) -> tuple[int, Any, Any]:
    async with client.post(f"{url}/v1/chat/completions", json=body, headers={**AUTH, **kw}) as response:
        raw = await response.read()
        return response.status, json.loads(raw), response.headers


async def stream_events(client: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    async with client.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as response:
        assert response.status == 200
        decoder = SSEDecoder()
        events = []
        async for chunk in response.content.iter_any():
            events.extend(decoder.feed(chunk))
        return events
