"""The balancer's fair queue over HTTP: caller identity on the hop, queue notices, the queue view, metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from appliance.bench.fake_worker import FakeState, fake_workers, serving
from appliance.core.hop import KEY_ID_HEADER, PRIORITY_HEADER, WEIGHT_HEADER
from appliance.core.sse import SSEDecoder
from tests.support.balancer_app import AUTH, MODEL, balancer, chat, until

pytestmark = pytest.mark.integration


def caller(key: str, priority: str = "interactive", weight: float = 1.0) -> dict[str, str]:
    return {**AUTH, KEY_ID_HEADER: key, PRIORITY_HEADER: priority, WEIGHT_HEADER: f"{weight:g}"}


@asynccontextmanager
async def recording_worker(seen: list[dict[str, str]], hold: asyncio.Event) -> AsyncIterator[str]:
    """One slot; records each request's headers; answers once ``hold`` is set."""

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": MODEL, "slots_total": 1, "slots_busy": 0})

    async def complete(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        body = await request.json()
        await hold.wait()
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": int(body.get("max_tokens", 3))},
            }
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", complete)
    async with serving(app) as url:
        yield url


async def test_key_id_reaches_the_worker_and_the_queue_serves_the_light_key_first() -> None:
    seen: list[dict[str, str]] = []
    hold = asyncio.Event()
    async with (
        recording_worker(seen, hold) as worker,
        balancer([worker]) as (url, _),
        aiohttp.ClientSession() as client,
    ):

        async def send(headers: dict[str, str]) -> tuple[int, dict[str, str]]:
            async with client.post(f"{url}/v1/chat/completions", json=chat(max_tokens=3), headers=headers) as r:
                await r.read()
                return r.status, dict(r.headers)

        first = asyncio.create_task(send(caller("key_heavy")))
        await until(lambda: len(seen) == 1)
        heavy = [asyncio.create_task(send(caller("key_heavy"))) for _ in range(3)]
        await asyncio.sleep(0.05)
        batch = asyncio.create_task(send(caller("key_bulk", "batch")))
        light = asyncio.create_task(send(caller("key_light")))

        async def waiting() -> dict[str, Any]:
            async with client.get(f"{url}/queue", headers=AUTH) as response:
                assert response.status == 200
                return dict(await response.json())

        view: dict[str, Any] = {}

        async def five_waiting() -> bool:
            nonlocal view
            view = await waiting()
            return bool(view["queue_depth"] == 5)

        for _ in range(100):
            if await five_waiting():
                break
            await asyncio.sleep(0.02)
        rows = {row["key_id"]: row for row in view["models"][0]["keys"]}
        assert rows["key_heavy"]["waiting"] == 3 and rows["key_heavy"]["running"] == 1
        assert rows["key_bulk"]["priority"] == "batch" and rows["key_light"]["waiting"] == 1
        async with client.get(f"{url}/metrics") as response:
            exposition = await response.text()
        assert f'appliance_balancer_queue_waiting{{model="{MODEL}",priority="batch"}} 1.0' in exposition
        assert f'appliance_balancer_queue_waiting{{model="{MODEL}",priority="interactive"}} 4.0' in exposition
        hold.set()
        results = await asyncio.gather(first, *heavy, batch, light)
        assert {status for status, _ in results} == {200}
        order = [h.get(KEY_ID_HEADER) for h in seen]
        assert order[:2] == ["key_heavy", "key_light"]  # the light key overtook the heavy backlog
        assert order[-1] == "key_bulk"  # batch after every interactive request
        assert all(WEIGHT_HEADER not in h for h in seen)  # the key id and its priority (decode lanes) go on
        assert {h[KEY_ID_HEADER]: h[PRIORITY_HEADER] for h in seen} == {
            "key_heavy": "interactive", "key_light": "interactive", "key_bulk": "batch"}
        assert "X-Appliance-Queue-Wait" in results[-1][1]


async def test_a_waiting_stream_gets_queue_comments_then_its_answer() -> None:
    state = FakeState(mode="slow-stream", slots=1, delay=0.2, chunks=3)
    async with (
        fake_workers(state) as urls,
        balancer(urls, queue_notice_after_s=0.05, queue_notice_interval_s=0.05) as (url, _),
        aiohttp.ClientSession() as client,
    ):
        blocker = asyncio.create_task(client.post(f"{url}/v1/chat/completions", json=chat(), headers=AUTH))
        await until(lambda: state.active == 1)
        async with client.post(f"{url}/v1/chat/completions", json=chat(stream=True), headers=caller("k")) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            raw = await r.read()
        (await blocker).release()
        text = raw.decode()
        assert text.startswith(": queued position=0 eta_s=")
        events = SSEDecoder().feed(raw)
        assert events[-1].is_done and not any(e.is_error for e in events)


async def test_queue_timeout_after_notices_ends_the_stream_with_an_error_event() -> None:
    state = FakeState(mode="slow-stream", slots=1, delay=1.0, chunks=3)
    async with (
        fake_workers(state) as urls,
        balancer(urls, queue_notice_after_s=0.02, queue_notice_interval_s=0.02, queue_timeout_s=0.3) as (url, _),
        aiohttp.ClientSession() as client,
    ):
        blocker = asyncio.create_task(client.post(f"{url}/v1/chat/completions", json=chat(), headers=AUTH))
        await until(lambda: state.active == 1)
        async with client.post(f"{url}/v1/chat/completions", json=chat(stream=True), headers=AUTH) as r:
            assert r.status == 200
            raw = await r.read()
        (await blocker).release()
        assert raw.startswith(b": queued ")
        events = SSEDecoder().feed(raw)
        assert events and events[-1].is_error and not any(e.is_done for e in events)
        assert json.loads(events[-1].data)["error"]["code"] == "overloaded"


async def test_odd_field_types_still_route_and_bad_hop_headers_fall_back() -> None:
    async with fake_workers(FakeState()) as urls, balancer(urls) as (url, _), aiohttp.ClientSession() as client:
        headers = {**AUTH, KEY_ID_HEADER: "bad key\u00e9", PRIORITY_HEADER: "urgent", WEIGHT_HEADER: "nan"}
        body = chat(max_tokens="many", messages="not a list")
        async with client.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status == 200  # the balancer routes; validating the body is the worker's job
