"""A failure-mode fake inference worker (aiohttp) for balancer and gateway tests.

Real workers run the real model; this fake exists only to produce failures on demand.
Modes (switch a running fake with ``POST /_mode {"mode": ...}``):

- ``ok``: answers like a worker (JSON, or SSE chunks + ``[DONE]`` when ``stream``).
- ``slow-stream``: like ``ok`` but streams ``chunks`` events ``delay`` seconds apart.
- ``die``: every request, ``/health`` included, drops the connection without a response.
- ``die-mid-stream``: streams two events, then drops the connection.
- ``hang``: every request, ``/health`` included, waits forever.
- ``429`` / ``503``: OpenAI-shaped error with ``Retry-After`` (``/health`` stays ok).
- ``loading``: ``/health`` and requests answer 503 ``{"status": "loading"}``.

``GET /_stats`` reports requests, completed, disconnected (client went away mid-request),
active and max_active, and the last request id / token seen.
Run as a process: ``python -m tests.support.fake_worker --port N [--model M] [--mode ok]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

MODES = ("ok", "slow-stream", "die", "die-mid-stream", "hang", "429", "503", "loading")


@dataclass
class FakeState:
    model: str = "fake-model"
    mode: str = "ok"
    slots: int = 8
    chunks: int = 5
    delay: float = 0.05
    name: str = "fake"
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    active: int = 0
    max_active: int = 0
    last_request_id: str | None = None
    last_token: str | None = None
    paths: list[str] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)  # published on /health like a worker's ModelLimits


STATE = web.AppKey("state", FakeState)


def _chunk(state: FakeState, text: str, finish: str | None = None) -> bytes:
    payload = {"id": "cmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
               "model": state.model, "worker": state.name,
               "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": f"fake_{status}"}}
    return web.json_response(body, status=status, headers={"Retry-After": "1"})


async def _hang_or_die(request: web.Request, mode: str) -> None:
    if mode == "die":
        assert request.transport is not None
        request.transport.abort()  # RST, like a process that crashed
        raise asyncio.CancelledError
    await asyncio.Event().wait()


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.mode in ("die", "hang"):
        await _hang_or_die(request, state.mode)
    if state.mode == "loading":
        return web.json_response({"status": "loading", "model": state.model}, status=503)
    return web.json_response({"status": "ok", "model": state.model, "slots_total": state.slots,
                              "slots_busy": state.active, "queue_depth": 0, "queue_limit": 64, **state.limits})


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.requests += 1
    state.paths.append(request.path)
    state.last_request_id = request.headers.get("X-Request-Id")
    state.last_token = request.headers.get("X-Internal-Token")
    state.active += 1
    state.max_active = max(state.max_active, state.active)
    try:
        response = await _answer(request, state)
        state.completed += 1
        return response
    except (asyncio.CancelledError, ConnectionError):
        state.disconnected += 1
        raise
    finally:
        state.active -= 1


async def _answer(request: web.Request, state: FakeState) -> web.StreamResponse:
    body = await request.json()
    mode = state.mode
    if mode in ("die", "hang"):
        await _hang_or_die(request, mode)
    if mode in ("429", "503"):
        return _error(int(mode), f"fake worker answers {mode}")
    if mode == "loading":
        return web.json_response({"status": "loading", "model": state.model}, status=503)
    if not body.get("stream"):
        await asyncio.sleep(state.delay if mode == "slow-stream" else 0)
        return web.json_response({"id": "cmpl-fake", "object": "chat.completion", "model": state.model,
                                  "worker": state.name, "echo": body,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                               "finish_reason": "stop"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunks = 2 if mode == "die-mid-stream" else state.chunks
    for index in range(chunks):
        if mode == "slow-stream":
            await asyncio.sleep(state.delay)
        await response.write(_chunk(state, f"t{index} "))
    if mode == "die-mid-stream":
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError
    await response.write(_chunk(state, "", "stop") + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def set_mode(request: web.Request) -> web.Response:
    state = request.app[STATE]
    payload: dict[str, Any] = await request.json()
    for key in ("mode", "slots", "chunks", "delay", "model"):
        if key in payload:
            setattr(state, key, payload[key])
    if state.mode not in MODES:
        return web.json_response({"error": f"unknown mode {state.mode}"}, status=400)
    return web.json_response(asdict(state))


async def stats(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[STATE]))


def create_fake_worker(state: FakeState | None = None) -> web.Application:
    app = web.Application()
    app[STATE] = state or FakeState()
    app.router.add_get("/health", health)
    app.router.add_post("/_mode", set_mode)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/v1/completions", generate)
    return app


async def start_fake_worker(state: FakeState | None = None, port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve in this event loop on loopback; returns the runner (clean up!) and the base URL."""
    app = create_fake_worker(state)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    sockets = runner.addresses
    return runner, f"http://127.0.0.1:{sockets[0][1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--mode", default="ok", choices=MODES)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    state = FakeState(model=args.model, mode=args.mode, slots=args.slots, name=f"fake:{args.port}")
    web.run_app(create_fake_worker(state), host="127.0.0.1", port=args.port, access_log=None,
                handler_cancellation=True, print=None)


if __name__ == "__main__":
    main()
