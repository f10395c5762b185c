"""The balancer in front of a real swap host (the bundled GGUF as two on_demand aliases) and a real Redis.

A request for the model the host does not hold waits in the balancer's queue (with queue notices) while the
host is drained (the running stream ends normally) and told to load it; the models view shows the states on
the way; a wait longer than the swap queue timeout is a 503 with Retry-After before any byte; a pinned model
is never unloaded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from redis.asyncio import Redis

from appliance.bench.harness import until
from appliance.core.model_catalogue import CATALOGUE_KEY, entry_bytes, put_entry
from appliance.core.model_files import sha256_file
from balancer.app import POOL, SWAPPER
from tests.support.balancer_app import balancer
from tests.support.inference_worker import TOKEN, Worker
from tests.support.swap_hosts import catalogue_entry, metric_value, models_by_id, swap_host, write_entries

pytestmark = pytest.mark.integration

A, B = "gemma-bal-a", "gemma-bal-b"
SLOTS = 2
AUTH = {"X-Internal-Token": TOKEN}


@pytest.fixture(scope="module")
def host(model_path: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with swap_host(model_path, redis_url, tmp_path_factory.mktemp("bal-swap"), (A, B), slots=SLOTS,
                   threads="1") as worker:
        yield worker


@asynccontextmanager
async def balancer_for(host: Worker, redis_url: str, **settings: Any) -> AsyncIterator[tuple[str, web.Application]]:
    """A balancer app in this loop with the host as its one worker and the catalogue from Redis."""
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        async with balancer([host.url], redis_client=client, registry_poll_s=0.2,
                            interactive_headroom=0, queue_notice_after_s=0, **settings) as (url, app):
            await until(lambda: {A, B} <= set(app[SWAPPER].catalogue), 30, "the balancer read the catalogue")
            await until(lambda: any(w.routable and w.model in (A, B) for w in app[POOL]), 120,
                        "the swap host serving a model")
            yield url, app
    finally:
        await client.aclose()


async def current_and_other(session: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    models = await models_by_id(session, url, TOKEN)
    current = A if models[A]["state"] == "loaded" else B
    return current, B if current == A else A


async def raw_stream(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int) -> dict[str, Any]:
    """A streamed chat read line by line: its queue comments, the models its chunks name, how it ended."""
    body = {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "stream": True,
            "max_tokens": max_tokens}
    seen: dict[str, Any] = {"comments": [], "models": set(), "finish": None, "done": False, "status": 0}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as response:
        seen["status"] = response.status
        seen["retry_after"] = response.headers.get("Retry-After")
        if response.status != 200:
            seen["error"] = await response.json()
            return seen
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith(":"):
                seen["comments"].append(line)
            elif line == "data: [DONE]":
                seen["done"] = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                seen["models"].add(chunk.get("model"))
                for choice in chunk.get("choices", []):
                    seen["finish"] = choice.get("finish_reason") or seen["finish"]
    return seen


async def test_an_unloaded_model_waits_while_the_host_drains_and_loads_it_and_no_stream_is_cut(
        host: Worker, redis_url: str) -> None:
    async with balancer_for(host, redis_url, max_swap_wait_s=0) as (url, _), aiohttp.ClientSession() as session:
        current, other = await current_and_other(session, url)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120,
                                      default_headers=AUTH) as api:
            stream = await api.chat.completions.create(
                model=current, messages=[{"role": "user", "content": "Write the numbers from 1 to 200, separated by "
                                                                    "commas."}], max_tokens=64,
                stream=True, extra_body={"ignore_eos": True})
            chunks = [await anext(aiter(stream))]  # running on the host now
            waiting = asyncio.create_task(raw_stream(session, url, other, max_tokens=4))
            states: list[tuple[str, str]] = []

            async def draining_seen() -> bool:
                models = await models_by_id(session, url, TOKEN)
                states.append((models[current]["state"], models[other]["state"]))
                return states[-1] == ("draining", "loading")

            deadline = time.monotonic() + 30
            while not await draining_seen() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert ("draining", "loading") in states, states
            async with session.get(f"{url}/queue", headers=AUTH) as response:
                queue = {m["model"]: m for m in (await response.json())["models"]}
            waiting_for_load = queue[other]["state"] == "loading" and queue[other]["waiting"] == 1
            assert waiting_for_load or queue[other]["state"] == "loaded", queue  # (the load may have just ended)
            chunks.extend([chunk async for chunk in stream])  # the drained host's stream runs to its end
        # ("draining", "loading") is only shown while a request runs on the drained host: this stream ran on
        # through the drain and ended normally (a cut stream ends without a finish reason, or raises).
        assert any(c.choices and c.choices[0].finish_reason in ("stop", "length") for c in chunks)
        assert {c.model for c in chunks} == {current}
        answer = await asyncio.wait_for(waiting, 120)
        assert answer["status"] == 200 and answer["done"] and answer["finish"] in ("stop", "length"), answer
        assert answer["models"] == {other}
        assert any(c.startswith(": queued position=") for c in answer["comments"]), answer["comments"]
        models = await models_by_id(session, url, TOKEN)
        assert (models[other]["state"], models[current]["state"]) == ("loaded", "unloaded")
        assert models[other]["workers"] == [host.url] and models[current]["workers"] == []
        swaps = await metric_value(session, url, "appliance_balancer_model_swaps_total", **{"from": current,
                                                                                             "to": other})
        assert swaps == 1
        assert await metric_value(session, url, "appliance_balancer_model_loads_total", model=other) == 1
        assert await metric_value(session, url, "appliance_balancer_swap_wait_seconds_count") >= 1
        assert await metric_value(session, url, "appliance_balancer_model_requests_total", model=other) == 1
    assert host.health()["model"] == other


async def test_the_models_view_lists_every_catalogue_entry_with_its_state(host: Worker, redis_url: str,
                                                                        model_path: Path) -> None:
    async with balancer_for(host, redis_url) as (url, _), aiohttp.ClientSession() as session:
        current, other = await current_and_other(session, url)
        async with session.get(f"{url}/v1/models") as response:
            assert response.status == 401  # internal token required
        models = await models_by_id(session, url, TOKEN)
        expected = entry_bytes(catalogue_entry(current, model_path, sha256_file(model_path), slots=SLOTS))
        wanted = {"state": "loaded", "resident": "on_demand", "pinned": False, "workers": [host.url],
                  "memory_bytes": expected}
        assert {key: models[current].get(key) for key in wanted} == wanted
        assert models[other]["state"] == "unloaded" and models[other]["workers"] == []
        assert models[other]["memory_bytes"] == expected


async def test_a_wait_past_the_swap_queue_timeout_is_503_with_retry_after_before_any_byte(
        host: Worker, redis_url: str) -> None:
    async with (balancer_for(host, redis_url, swap_queue_timeout_s=0.5) as (url, _),
                aiohttp.ClientSession() as session):
        current, other = await current_and_other(session, url)
        started = time.monotonic()
        answer = await raw_stream(session, url, other, max_tokens=4)
        assert answer["status"] == 503, answer
        assert answer["error"]["error"]["code"] == "overloaded" and other in answer["error"]["error"]["message"]
        assert answer["retry_after"] is not None and int(answer["retry_after"]) >= 1
        assert time.monotonic() - started < 10  # refused at once, not after waiting
        assert await metric_value(session, url, "appliance_balancer_model_swaps_total", **{"from": current,
                                                                                             "to": other}) == 0
        assert (await models_by_id(session, url, TOKEN))[current]["state"] == "loaded"


async def test_a_pinned_model_is_never_unloaded(host: Worker, redis_url: str, model_path: Path) -> None:
    digest = sha256_file(model_path)
    async with balancer_for(host, redis_url, max_swap_wait_s=0) as (url, app), aiohttp.ClientSession() as session:
        current, other = await current_and_other(session, url)
        await write_entries(redis_url, [catalogue_entry(current, model_path, digest, slots=SLOTS, pinned=True)])
        try:
            await until(lambda: app[SWAPPER].catalogue[current].pinned, 30, "the balancer saw the pin")
            answer = await raw_stream(session, url, other, max_tokens=4)
            assert answer["status"] == 503 and "pinned" in answer["error"]["error"]["message"], answer
            assert answer["retry_after"] is not None
            assert host.health()["model"] == current
        finally:
            await write_entries(redis_url, [catalogue_entry(current, model_path, digest, slots=SLOTS)])


async def test_a_catalogue_entry_not_signed_with_the_internal_token_is_not_served(
        host: Worker, redis_url: str, model_path: Path) -> None:
    """Whoever can write Redis but lacks the token cannot make the balancer list a model or drain a host to load it."""
    forged = catalogue_entry("gemma-bal-forged", model_path, sha256_file(model_path), slots=SLOTS)
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        await put_entry(client, "not-the-internal-token-but-just-as-long-0123456789", forged)
        async with balancer_for(host, redis_url, max_swap_wait_s=0) as (url, app), \
                aiohttp.ClientSession() as session:
            current, _ = await current_and_other(session, url)
            assert "gemma-bal-forged" not in app[SWAPPER].catalogue
            assert "gemma-bal-forged" not in await models_by_id(session, url, TOKEN)
            answer = await raw_stream(session, url, "gemma-bal-forged", max_tokens=4)
            assert answer["status"] == 404 and answer["error"]["error"]["code"] == "model_not_found", answer
            assert host.health()["model"] == current
    finally:
        await client.hdel(CATALOGUE_KEY, "gemma-bal-forged")
        await client.aclose()
