"""OpenAI endpoints: chat and text completions (streamed as SSE or whole), model list."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from aiohttp import web

from appliance.core import strict_json
from appliance.core.errors import APIError, bad_request
from appliance.core.sse import DONE, encode_data, encode_error
from appliance.core.wire import (
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    model_list,
    new_id,
    parse_request,
    reject_unsupported,
)
from inference.keys import SERVICE
from inference.logprobs import TokenLogprob
from inference.replies import ChatReply, CompletionReply, Emitter
from inference.sequence import GenerationFailed, SequenceHandle
from inference.structured import LAZY_TRIGGER, plan_structured

__all__ = ["chat_completions", "completions", "models"]

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=strict_json.loads)  # lone surrogates: a 400 here, not a 500 later
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.") from None


def _usage(handle: SequenceHandle) -> Usage:
    return Usage(prompt_tokens=handle.prompt_tokens, completion_tokens=handle.completion_tokens,
                 total_tokens=handle.prompt_tokens + handle.completion_tokens)


async def _whole(handle: SequenceHandle) -> tuple[str, list[TokenLogprob]]:
    try:
        return await handle.whole()
    except GenerationFailed as exc:
        raise APIError(500, f"Generation failed: {exc}", type_="server_error", code="generation_failed") from None
    finally:
        handle.cancel()  # no-op when finished; frees the slot when the client went away


async def _stream(request: web.Request, handle: SequenceHandle, emitter: Emitter,
                  usage_chunk: dict[str, Any] | None) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        for item in emitter.start():
            await response.write(encode_data(item))
        try:
            async for text, logprobs in handle.pieces():
                for item in emitter.piece(text, logprobs):
                    await response.write(encode_data(item))
        except GenerationFailed as exc:
            await response.write(encode_error(
                APIError(500, f"Generation failed: {exc}", type_="server_error", code="generation_failed").body()
            ))
            return response
        for item in emitter.end(handle.finish_reason or "stop"):
            await response.write(encode_data(item))
        if usage_chunk is not None:
            usage_chunk["usage"] = _usage(handle).model_dump()
            await response.write(encode_data(usage_chunk))
        await response.write(DONE)
    except ConnectionError:
        return response  # the client went away; the slot is freed below
    finally:
        handle.cancel()
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


def _chat_top_logprobs(body: ChatCompletionRequest) -> int | None:
    """How many alternatives per token the request wants (None: no logprobs at all)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true.", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    payload = await _json_body(request)
    body = parse_request(ChatCompletionRequest, payload)
    reject_unsupported(body)
    service.check_model(body.model)
    top_logprobs = _chat_top_logprobs(body)
    plan = plan_structured(body)
    tokens, template_stops = await service.chat_prompt(body, plan)
    lazy = plan.grammar is None and plan.lazy_grammar is not None
    generation = service.generation(
        body, tokens, template_stops, ignore_eos=bool(payload.get("ignore_eos")),
        grammar=plan.lazy_grammar if lazy else plan.grammar, grammar_trigger=LAZY_TRIGGER if lazy else None,
        logprobs=top_logprobs,
    )
    handle = service.submit(generation)
    reply = ChatReply(new_id("chatcmpl"), service.alias, int(time.time()), plan, top_logprobs is not None)
    if not body.stream:
        text, logprobs = await _whole(handle)
        return web.json_response(reply.whole(text, logprobs, handle.finish_reason or "stop", _usage(handle)))
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    usage_chunk = reply.chunk({}) if include_usage else None
    if usage_chunk is not None:
        usage_chunk["choices"] = []
    return await _stream(request, handle, reply.emitter(), usage_chunk)


async def completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    payload = await _json_body(request)
    body = parse_request(CompletionRequest, payload)
    reject_unsupported(body)
    service.check_model(body.model)
    if body.echo:
        raise bad_request("echo is not supported.", param="echo")
    tokens = await service.completion_prompt(body)
    generation = service.generation(body, tokens, ignore_eos=bool(payload.get("ignore_eos")),
                                    logprobs=body.logprobs)
    handle = service.submit(generation)
    reply = CompletionReply(new_id("cmpl"), service.alias, int(time.time()), body.logprobs is not None)
    if not body.stream:
        text, logprobs = await _whole(handle)
        return web.json_response(reply.whole(text, logprobs, handle.finish_reason or "stop", _usage(handle)))
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    usage_chunk = {"id": reply.id_, "object": "text_completion", "created": reply.created, "model": reply.model,
                   "choices": []} if include_usage else None
    return await _stream(request, handle, reply, usage_chunk)


async def models(request: web.Request) -> web.Response:
    return web.json_response(model_list([request.app[SERVICE].alias]))
