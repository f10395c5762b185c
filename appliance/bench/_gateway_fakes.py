"""Fast fake upstreams for the gateway benchmark and the gateway's own tests.

One aiohttp app plays both the balancer (OpenAI endpoints, ``/health``,
``/v1/models``) and the RAG service (collections, search, embeddings). Answers
are instant and carry a counter, so a replayed (cached) answer is told apart
from a fresh one. ``GET /_last`` returns the last generation body it received.
Run as a process: ``python -m appliance.bench._gateway_fakes --port N [--token T]``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from appliance.core.hop import INTERNAL_TOKEN_HEADER

__all__ = ["FakeState", "create_fake_upstream"]


@dataclass
class FakeState:
    model: str = "fake-model"
    token: str = ""
    tokens_out: int = 16
    slots: int = 8
    max_tokens: int = 64  # the limit it publishes on /v1/models, as a worker does (the gateway enforces it)
    served: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    collections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


STATE = web.AppKey("state", FakeState)
_WORD = re.compile(r"[a-z0-9]+")


def _usage(state: FakeState) -> dict[str, int]:
    return {"prompt_tokens": 7, "completion_tokens": state.tokens_out, "total_tokens": 7 + state.tokens_out}


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@web.middleware
async def _token_check(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[STATE]
    if state.token and request.path not in ("/health", "/_last") and not hmac.compare_digest(
        request.headers.get(INTERNAL_TOKEN_HEADER, ""), state.token
    ):
        return web.json_response({"error": {"message": "bad internal token", "type": "authentication_error",
                                             "param": None, "code": "invalid_internal_token"}}, status=401)
    response: web.StreamResponse = await handler(request)
    return response


async def _generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await request.json()
    state.served += 1
    state.last = body
    chat = request.path.endswith("/chat/completions")
    ident, created, text = f"fake-{state.served}", int(time.time()), f"answer {state.served}"
    if not body.get("stream"):
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return web.json_response({"id": ident, "object": "chat.completion" if chat else "text_completion",
                                  "created": created, "model": body.get("model"), "choices": [choice],
                                  "usage": _usage(state)})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    kind = "chat.completion.chunk" if chat else "text_completion"
    parts = []
    for index, word in enumerate(["answer ", str(state.served)]):
        delta: dict[str, Any] = ({"role": "assistant", "content": word} if index == 0 else {"content": word})
        choice = {"index": 0, "finish_reason": None, "logprobs": None, **({"delta": delta} if chat else {"text": word})}
        parts.append(_data({"id": ident, "object": kind, "created": created, "model": body.get("model"),
                            "choices": [choice]}))
    tail: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
    end: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None, **tail}
    parts.append(_data({"id": ident, "object": kind, "created": created, "model": body.get("model"),
                        "choices": [end]}))
    if (body.get("stream_options") or {}).get("include_usage"):
        parts.append(_data({"id": ident, "object": kind, "created": created, "model": body.get("model"),
                            "choices": [], "usage": _usage(state)}))
    await response.write(b"".join(parts) + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _models(request: web.Request) -> web.Response:
    model = request.app[STATE].model
    limits = {"context_length": 2048, "max_tokens": request.app[STATE].max_tokens}
    return web.json_response({"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                                          "owned_by": "fake", **limits}]})


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"status": "ok", "model": state.model, "model_sha256": "f" * 64,
                              "slots_total": state.slots, "slots_busy": 0})


async def _queue(request: web.Request) -> web.Response:
    """The balancer's queue view (GET /queue): an instant upstream never has anyone waiting."""
    return web.json_response({"queue_depth": 0, "scheduling": "fair", "routing": "prefix",
                              "models": [{"model": request.app[STATE].model, "waiting": 0, "virtual_time": 0.0,
                                          "keys": []}]})


async def _last(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].last)


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
        return web.json_response({"error": {"message": f"no collection {name}", "type": "invalid_request_error",
                                            "param": None, "code": "not_found"}}, status=404)
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
        return web.json_response({"error": {"message": f"no collection {name}", "type": "invalid_request_error",
                                            "param": None, "code": "not_found"}}, status=404)
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


def create_fake_upstream(state: FakeState | None = None) -> web.Application:
    app = web.Application(middlewares=[_token_check])
    app[STATE] = state or FakeState()
    app.router.add_post("/v1/chat/completions", _generate)
    app.router.add_post("/v1/completions", _generate)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/_last", _last)
    app.router.add_get("/queue", _queue)
    app.router.add_route("*", "/collections", _collections)
    app.router.add_route("*", "/collections/{name}/documents", _documents)
    app.router.add_post("/collections/{name}/search", _search)
    app.router.add_post("/v1/embeddings", _embeddings)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args(argv)
    web.run_app(create_fake_upstream(FakeState(model=args.model, token=args.token, slots=args.slots)), host="127.0.0.1",
                port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
