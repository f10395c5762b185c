"""The fake upstream of the benchmarks and the tests: an inference worker, a balancer and a RAG service in one.

One aiohttp app answers what the gateway and the balancer ask of their upstreams, instantly or after the
configured service time, with OpenAI-shaped bodies:

- worker: ``/health`` (status, slots, limits, ``model_sha256``), ``POST /v1/chat/completions`` and
  ``/v1/completions`` (JSON, or SSE chunks ``t0 t1 ...`` + ``[DONE]`` with ``stream``; a usage chunk with
  ``stream_options.include_usage``); every answer has its own id (``fake-N``, N counting requests), so a
  replayed (cached) answer is told apart from a fresh one;
- balancer: ``/v1/models`` (with the published limits) and ``/queue``;
- RAG service: collections, documents, a word-overlap search and embeddings.

Failure modes (switch a running fake with ``POST /_mode {"mode": ...}``, which also takes ``slots``,
``chunks``, ``delay``, ``service_s``, ``model`` and ``queue_keys``, the rows ``/queue`` shows waiting):

- ``ok``: answers as above.
- ``slow-stream``: like ``ok`` but streams ``chunks`` events ``delay`` seconds apart.
- ``die``: every request, ``/health`` included, drops the connection without a response.
- ``die-mid-stream``: streams two events, then drops the connection.
- ``hang``: every request, ``/health`` included, waits forever.
- ``429`` / ``503``: OpenAI-shaped error with ``Retry-After`` (``/health`` stays ok).
- ``loading``: ``/health`` and requests answer 503 ``{"status": "loading"}``.

``GET /_stats`` reports the state (requests, completed, disconnected, active, max_active, the last request
id and internal token seen, the headers of each generation and /queue request); ``GET /_last`` the last
generation body. With ``token`` set, a request without that internal token is refused (401), as the real
services do.

In this event loop: ``async with fake_workers(FakeState(), ...) as urls``. As a process:
``python -m appliance.bench.fake_worker --port N [--model M] [--mode ok] [--slots S] [--token T]``.
:func:`serve_raw` is the lean alternative for throughput runs: an asyncio protocol answering ``/health`` and
every POST with one fixed completion.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from appliance.core.hop import INTERNAL_TOKEN_HEADER

__all__ = ["MODES", "FakeState", "create_fake_worker", "fake_workers", "serve_raw", "serving", "start_app",
           "start_fake_worker"]

MODES = ("ok", "slow-stream", "die", "die-mid-stream", "hang", "429", "503", "loading")
_CONTROL = ("/health", "/_mode", "/_stats", "/_last")  # answered without the internal token
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class FakeState:
    model: str = "fake-model"
    mode: str = "ok"
    slots: int = 8
    chunks: int = 5
    delay: float = 0.05  # between stream chunks (and before a JSON answer) in slow-stream mode
    service_s: float = 0.0  # every generation is held this long before it answers
    name: str = "fake"
    token: str = ""  # the internal token it requires; empty: none
    prompt_tokens: int = 7
    tokens_out: int = 16  # completion tokens in usage; 0: the request's max_tokens
    max_tokens: int = 64  # the limit it publishes on /v1/models, as a balancer does
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    active: int = 0
    max_active: int = 0
    last_request_id: str | None = None
    last_token: str | None = None
    paths: list[str] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)  # published on /health like a worker's ModelLimits
    queue_keys: list[dict[str, Any]] = field(default_factory=list)  # the rows /queue shows as waiting
    headers: list[dict[str, str]] = field(default_factory=list)  # of every generation and /queue request
    last: dict[str, Any] = field(default_factory=dict)
    collections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


STATE = web.AppKey("state", FakeState)


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _error(status: int, message: str, code: str, kind: str = "server_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return web.json_response(body, status=status, headers=headers)


def _usage(state: FakeState, body: dict[str, Any]) -> dict[str, int]:
    completion = state.tokens_out or int(body.get("max_tokens") or 16)
    return {"prompt_tokens": state.prompt_tokens, "completion_tokens": completion,
            "total_tokens": state.prompt_tokens + completion}


async def _hang_or_die(request: web.Request, mode: str) -> None:
    if mode == "die":
        assert request.transport is not None
        request.transport.abort()  # RST, like a process that crashed
        raise asyncio.CancelledError
    await asyncio.Event().wait()


@web.middleware
async def _token_check(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[STATE]
    if state.token and request.path not in _CONTROL and not hmac.compare_digest(
        request.headers.get(INTERNAL_TOKEN_HEADER, ""), state.token
    ):
        return _error(401, "bad internal token", "invalid_internal_token", "authentication_error")
    response: web.StreamResponse = await handler(request)
    return response


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.mode in ("die", "hang"):
        await _hang_or_die(request, state.mode)
    if state.mode == "loading":
        return web.json_response({"status": "loading", "model": state.model}, status=503)
    return web.json_response({"status": "ok", "model": state.model, "model_sha256": "f" * 64,
                              "slots_total": state.slots, "slots_busy": state.active, "queue_depth": 0,
                              "queue_limit": 64, **state.limits})


async def _generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.requests += 1
    state.paths.append(request.path)
    state.headers.append(dict(request.headers))
    state.last_request_id = request.headers.get("X-Request-Id")
    state.last_token = request.headers.get(INTERNAL_TOKEN_HEADER)
    state.active += 1
    state.max_active = max(state.max_active, state.active)
    try:
        response = await _answer(request, state, f"fake-{state.requests}")
        state.completed += 1
        return response
    except (asyncio.CancelledError, ConnectionError):
        state.disconnected += 1
        raise
    finally:
        state.active -= 1


async def _answer(request: web.Request, state: FakeState, ident: str) -> web.StreamResponse:
    body = await request.json()
    state.last = body
    mode = state.mode
    if mode in ("die", "hang"):
        await _hang_or_die(request, mode)
    if mode in ("429", "503"):
        return _error(int(mode), f"fake worker answers {mode}", f"fake_{mode}")
    if mode == "loading":
        return web.json_response({"status": "loading", "model": state.model}, status=503)
    if state.service_s:
        await asyncio.sleep(state.service_s)
    chat = request.path.endswith("/chat/completions")
    model, created = body.get("model") or state.model, int(time.time())
    if not body.get("stream"):
        await asyncio.sleep(state.delay if mode == "slow-stream" else 0)
        text = f"answer {state.requests}"
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return web.json_response({"id": ident, "object": "chat.completion" if chat else "text_completion",
                                  "created": created, "model": model, "worker": state.name, "choices": [choice],
                                  "usage": _usage(state, body)})
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str, finish: str | None = None, first: bool = False) -> bytes:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        content = {"delta": delta} if chat else {"text": text}
        choice = {"index": 0, "finish_reason": finish, "logprobs": None, **content}
        return _data({"id": ident, "object": kind, "created": created, "model": model, "worker": state.name,
                      "choices": [choice]})

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunks = 2 if mode == "die-mid-stream" else state.chunks
    parts = []
    for index in range(chunks):
        if mode == "slow-stream":
            await asyncio.sleep(state.delay)
            await response.write(chunk(f"t{index} ", first=index == 0))
        else:
            parts.append(chunk(f"t{index} ", first=index == 0))
    if mode == "die-mid-stream":
        await response.write(b"".join(parts))
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError
    parts.append(chunk("", "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        parts.append(_data({"id": ident, "object": kind, "created": created, "model": model, "choices": [],
                            "usage": _usage(state, body)}))
    await response.write(b"".join(parts) + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    limits = {"context_length": 2048, "max_tokens": state.max_tokens}
    return web.json_response({"object": "list", "data": [{"id": state.model, "object": "model", "created": 0,
                                                          "owned_by": "fake", **limits}]})


async def _queue(request: web.Request) -> web.Response:
    """The balancer's queue view (GET /queue): the rows of ``queue_keys`` (none by default) are waiting."""
    state = request.app[STATE]
    state.headers.append(dict(request.headers))
    waiting = len(state.queue_keys)
    return web.json_response({"queue_depth": waiting, "scheduling": "fair", "routing": "prefix",
                              "models": [{"model": state.model, "waiting": waiting, "virtual_time": 0.0,
                                          "keys": state.queue_keys}]})


async def _set_mode(request: web.Request) -> web.Response:
    state = request.app[STATE]
    payload: dict[str, Any] = await request.json()
    for key in ("mode", "slots", "chunks", "delay", "service_s", "model", "queue_keys"):
        if key in payload:
            setattr(state, key, payload[key])
    if state.mode not in MODES:
        return web.json_response({"error": f"unknown mode {state.mode}"}, status=400)
    return web.json_response(asdict(state))


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[STATE]))


async def _last(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].last)


def _no_collection(name: str) -> web.Response:
    return _error(404, f"no collection {name}", "not_found", "invalid_request_error")


async def _collections(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.method == "POST":
        name = (await request.json()).get("name", "")
        state.collections.setdefault(name, [])
        return web.json_response({"name": name, "documents": 0}, status=201)
    return web.json_response({"data": [{"name": n, "documents": len(d)} for n, d in state.collections.items()]})


async def _documents(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["name"]
    if name not in state.collections:
        return _no_collection(name)
    if request.method == "GET":
        return web.json_response({"object": "list", "documents": state.collections[name]})
    if request.content_type == "multipart/form-data":  # a file upload: like the RAG service, keep its size only
        doc = {"title": "upload", "text": f"{len(await request.read())} bytes"}
    else:
        doc = await request.json()
    doc_id = f"doc-{len(state.collections[name]) + 1}"
    state.collections[name].append({"id": doc_id, **doc})
    return web.json_response({"id": doc_id, "title": doc.get("title"), "chunks": 1, "sha256": "0" * 64,
                              "duplicate": False}, status=201)


async def _search(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["name"]
    if name not in state.collections:
        return _no_collection(name)
    query = await request.json()
    words = set(_WORD.findall(str(query.get("query", "")).lower()))
    scored = []
    for doc in state.collections[name]:
        overlap = len(words & set(_WORD.findall(str(doc.get("text", "")).lower())))
        scored.append((overlap / (len(words) or 1), doc))
    scored.sort(key=lambda item: -item[0])
    results = [{"document_id": d["id"], "title": d.get("title"), "chunk_id": f"{d['id']}:0", "chunk_index": 0,
                "text": d.get("text", ""), "heading_path": [], "score": round(s, 4)}
               for s, d in scored[: int(query.get("top_k", 4))]]
    return web.json_response({"results": results})


async def _embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    inputs = body.get("input")
    items = [inputs] if isinstance(inputs, str) else list(inputs or [])
    data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(items))]
    return web.json_response({"object": "list", "data": data, "model": body.get("model"),
                              "usage": {"prompt_tokens": 3 * len(items), "total_tokens": 3 * len(items)}})


def create_fake_worker(state: FakeState | None = None) -> web.Application:
    app = web.Application(middlewares=[_token_check])
    app[STATE] = state or FakeState()
    app.router.add_get("/health", _health)
    app.router.add_post("/_mode", _set_mode)
    app.router.add_get("/_stats", _stats)
    app.router.add_get("/_last", _last)
    app.router.add_post("/v1/chat/completions", _generate)
    app.router.add_post("/v1/completions", _generate)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/queue", _queue)
    app.router.add_route("*", "/collections", _collections)
    app.router.add_route("*", "/collections/{name}/documents", _documents)
    app.router.add_post("/collections/{name}/search", _search)
    app.router.add_post("/v1/embeddings", _embeddings)
    return app


async def start_app(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve ``app`` in this event loop on loopback; returns the runner (clean up!) and the base URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=512).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` served in this event loop on a free loopback port while the block runs; its base URL."""
    runner, url = await start_app(app)
    try:
        yield url
    finally:
        await runner.cleanup()


async def start_fake_worker(state: FakeState | None = None, port: int = 0) -> tuple[web.AppRunner, str]:
    """A fake served in this event loop on loopback; returns the runner (clean up!) and the base URL."""
    return await start_app(create_fake_worker(state), port)


@asynccontextmanager
async def fake_workers(*states: FakeState) -> AsyncIterator[list[str]]:
    """One fake per state, served in this event loop; their base URLs, in order. Stopped on exit."""
    async with AsyncExitStack() as exits:
        yield [await exits.enter_async_context(serving(create_fake_worker(state))) for state in states]


# -- the lean variant: one fixed completion, no aiohttp ------------------------------------------------

RAW_MODEL = "bench-fake"
_RAW_COMPLETION = json.dumps({
    "id": "cmpl-bench", "object": "chat.completion", "created": 0, "model": RAW_MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}).encode()
_RAW_HEALTH = json.dumps({"status": "ok", "model": RAW_MODEL, "slots_total": 8, "slots_busy": 0,
                          "queue_depth": 0, "queue_limit": 64}).encode()


def _http_response(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def content_length(head: bytes) -> int:
    """The Content-Length of an HTTP/1.1 head (0 when absent); chunked bodies are refused."""
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        raise ValueError("the raw client reads Content-Length bodies only")
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = lower.find(b"\r\n", at + 2)
    return int(lower[at + 17 : end if end > 0 else None])


class _RawWorker(asyncio.Protocol):
    _answers = {b"/health": _http_response(_RAW_HEALTH)}
    _default = _http_response(_RAW_COMPLETION)

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCP transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            size = end + 4 + content_length(self._buffer[:end])
            if len(self._buffer) < size:
                return
            path = self._buffer.split(b" ", 2)[1]
            self._buffer = self._buffer[size:]
            assert self._transport is not None
            self._transport.write(self._answers.get(path, self._default))


async def serve_raw(ports: list[int]) -> None:
    """The lean fake on each of ``ports`` (``/health``, and one fixed completion for anything else), forever."""
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_server(_RawWorker, "127.0.0.1", port, backlog=512)
    await asyncio.Event().wait()


async def serve(ports: list[int], state: FakeState) -> None:
    """The aiohttp fake on each of ``ports`` (one state shared), forever."""
    runner = web.AppRunner(create_fake_worker(state), handler_cancellation=True, access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port, backlog=512).start()
    await asyncio.Event().wait()


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.bench.fake_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--mode", default="ok", choices=MODES)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--token", default="")
    args = parser.parse_args(argv)
    state = FakeState(model=args.model, mode=args.mode, slots=args.slots, token=args.token, name=f"fake:{args.port}")
    asyncio.run(serve([args.port], state))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
