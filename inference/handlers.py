"""OpenAI endpoints over HTTP only: parse the body once, ask the service, send or stream its answer."""

from __future__ import annotations

import contextlib
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel

from appliance.core.errors import APIError
from appliance.core.hop import KEY_ID_HEADER, PRIORITY_HEADER
from appliance.core.ids import KeyId
from appliance.core.priority import Priority
from appliance.core.sse import DONE, encode_data, encode_error
from appliance.core.wire import ChatCompletionRequest, CompletionRequest, parse_json
from inference.answers import Answer, Whole
from inference.keys import SERVICE
from inference.prefix import Scope

__all__ = ["chat_completions", "completions", "model", "models"]

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T", bound=BaseModel)


async def _body(request: web.Request, model: type[T]) -> T:
    return parse_json(model, await request.read())


async def _send(request: web.Request, answer: Answer) -> web.StreamResponse:
    if isinstance(answer, Whole):
        return web.json_response(answer.body)
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        try:
            async for item in answer.chunks:
                await response.write(encode_data(item))
        except APIError as exc:  # failed after the status line went out: an error event ends the stream
            await response.write(encode_error(exc.body()))
            return response
        await response.write(DONE)
    except ConnectionError:
        return response  # the client went away; the slots are freed below
    finally:
        await answer.aclose()
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


def _scope(request: web.Request) -> Scope:
    """The calling API key as the gateway named it (None when called without one): prefix reuse stays within it."""
    raw = request.headers.get(KEY_ID_HEADER)
    return None if raw is None else KeyId.parse(raw, param=KEY_ID_HEADER)


def _priority(request: web.Request) -> Priority:
    """The request's class as the balancer named it (interactive when absent): batch work yields the compute."""
    return Priority.parse(request.headers.get(PRIORITY_HEADER), param=PRIORITY_HEADER)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    with service.serving():
        scope, priority = _scope(request), _priority(request)
        body = await _body(request, ChatCompletionRequest)
        return await _send(request, await service.chat(body, scope, priority))


async def completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    with service.serving():
        scope, priority = _scope(request), _priority(request)
        body = await _body(request, CompletionRequest)
        return await _send(request, await service.complete(body, scope, priority))


async def models(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].models())


async def model(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].model_card(request.match_info["model"]))
