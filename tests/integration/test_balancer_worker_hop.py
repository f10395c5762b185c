"""The balancer's worker hop against scripted workers on loopback: what a worker may have read is sent once
(a resend is the proxy's retry, on another worker, within the retry budget), and what the workers publish
on /health (WorkerHealth) is what the balancer lists on /v1/models.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from appliance.core.worker_health import WorkerHealth, encode_worker_health
from balancer import BalancerSettings, create_app
from balancer.app import BUDGET, POOL
from balancer.worker import Worker, WorkerState

pytestmark = pytest.mark.integration

TOKEN = "test-internal-token-padded-to-32-characters"
AUTH = {"X-Internal-Token": TOKEN}
MODEL = "hop-model"
SHA = "a" * 64


class ScriptedWorker:
    """A worker that answers ``/health`` and chat completions over raw HTTP/1.1 keep-alive; the
    ``hang_up_at``-th request on a connection is read whole, then the connection closed without a word."""

    def __init__(self, name: str, *, hang_up_at: int | None = None, sha256: str = SHA) -> None:
        self.name = name
        self.hang_up_at = hang_up_at
        self.sha256 = sha256
        self.bodies: list[bytes] = []  # every completion request read, in order
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                if head.startswith(b"GET /health"):
                    self._answer(writer, encode_worker_health(self.health()))
                else:
                    served += 1
                    self.bodies.append(body)
                    if served == self.hang_up_at:
                        return  # read, never answered: the connection closes below
                    self._answer(writer, json.dumps(self.completion()).encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def health(self) -> WorkerHealth:
        return WorkerHealth(status="ok", model=MODEL, slots_total=4, slots_busy=0, queue_depth=0, queue_limit=8,
                            model_sha256=self.sha256, n_ctx=512, gpu_layers=0, context_length=512, max_tokens=64,
                            max_choices=4, max_prompts=8, decode={"mode": "fast"})

    def completion(self) -> dict[str, Any]:
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL, "served_by": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}

    @staticmethod
    def _answer(writer: asyncio.StreamWriter, payload: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(payload) + payload)


@asynccontextmanager
async def stack(*workers: ScriptedWorker, **overrides: Any) -> AsyncIterator[tuple[str, web.Application]]:
    async with AsyncExitStack() as exits:
        for worker in workers:
            server = await asyncio.start_server(worker.handle, "127.0.0.1", 0)
            exits.push_async_callback(server.wait_closed)
            exits.callback(server.close)
            worker.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        options: dict[str, Any] = {"probe_interval_s": 0.2, "probe_timeout_s": 2.0, "routing": "least_connections",
                                   "strategy": "round_robin", **overrides}
        settings = BalancerSettings(workers=tuple(w.url for w in workers), internal_token=TOKEN, **options)
        app = create_app(settings)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        exits.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app


async def chat(client: aiohttp.ClientSession, url: str, text: str) -> tuple[int, dict[str, Any]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    async with client.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as response:
        return response.status, await response.json()


def read(worker: ScriptedWorker, text: str) -> int:
    """How many times ``worker`` read the request whose message is ``text``."""
    return sum(json.loads(body)["messages"][0]["content"] == text for body in worker.bodies)


async def test_a_request_the_worker_read_before_closing_is_not_sent_to_it_again() -> None:
    """One worker: it reads the second request on the kept-alive connection and hangs up. The request is not
    resent (the client gets the failure), the worker is not ejected for it, and no retry was spent."""
    worker = ScriptedWorker("a", hang_up_at=2)
    async with stack(worker) as (url, app), aiohttp.ClientSession() as client:
        assert (await chat(client, url, "first"))[0] == 200
        status, body = await chat(client, url, "second")
        assert status == 502 and "kept-alive" in body["error"]["message"]
        await asyncio.sleep(0.2)  # room for a resend to arrive, were one made
        assert read(worker, "second") == 1
        assert app[BUDGET].granted == 0
        pool = app[POOL]
        assert next(iter(pool)).state is WorkerState.HEALTHY  # a stale connection is no verdict on it
        assert (await chat(client, url, "third"))[0] == 200  # a new connection


async def test_a_resend_after_a_hang_up_is_a_retry_on_another_worker_within_the_budget() -> None:
    """Round robin over a (hangs up on its second request per connection) and b: the request a read and
    dropped is retried once, on b, and that retry is counted against the budget."""
    a, b = ScriptedWorker("a", hang_up_at=2), ScriptedWorker("b")
    async with stack(a, b) as (url, app), aiohttp.ClientSession() as client:
        for text in ("one", "two"):  # a, then b: a's connection is kept alive
            assert (await chat(client, url, text))[0] == 200
        status, body = await chat(client, url, "three")  # a reads it on the kept connection and hangs up
        assert status == 200 and body["served_by"] == "b"
        assert (read(a, "three"), read(b, "three")) == (1, 1)
        assert app[BUDGET].granted == 1
        async with client.get(f"{url}/metrics") as response:
            assert "appliance_balancer_retries_total 1.0" in await response.text()


async def test_v1_models_lists_the_weights_sha256_the_workers_publish_while_they_agree() -> None:
    a, b = ScriptedWorker("a"), ScriptedWorker("b")
    async with stack(a, b) as (url, app), aiohttp.ClientSession(headers=AUTH) as client:
        async with client.get(f"{url}/v1/models") as response:
            (model,) = (await response.json())["data"]
        assert model["id"] == MODEL and model["model_sha256"] == SHA
        assert (model["context_length"], model["max_tokens"], model["max_choices"]) == (512, 64, 4)
        async with client.get(f"{url}/workers") as response:
            rows = (await response.json())["workers"]
        assert all(row["health"]["decode"] == {"mode": "fast"} for row in rows)
        b.sha256 = "b" * 64  # b's weights replaced: no single file answers for the model until they agree
        for worker in app[POOL]:
            for _ in range(2):  # the first may have been under way before the change
                await asyncio.wait_for(_probed_again(worker), 5)
        async with client.get(f"{url}/v1/models") as response:
            (model,) = (await response.json())["data"]
        assert "model_sha256" not in model and model["context_length"] == 512


async def _probed_again(worker: Worker) -> None:
    before = worker.last_probe_at
    while worker.last_probe_at == before:
        await asyncio.sleep(0.05)
