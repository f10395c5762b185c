"""OpenAI endpoints: chat and text completions (streamed as SSE or whole), model list."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from appliance.core.errors import APIError, bad_request
from appliance.core.sse import DONE, encode_data, encode_error
from appliance.core.wire import (
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    model_list,
    new_id,
    parse_request,
    reject_unsupported,
)
from inference.keys import SERVICE
from inference.sequence import GenerationFailed, SequenceHandle
from inference.structured import parse_tool_call, plan_structured

__all__ = ["chat_completions", "completions", "models"]

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Builds one stream chunk from (text, finish_reason).
ChunkBuilder = Callable[[str, str | None], dict[str, Any]]


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.") from None


def _usage(handle: SequenceHandle) -> Usage:
    return Usage(prompt_tokens=handle.prompt_tokens, completion_tokens=handle.completion_tokens,
                 total_tokens=handle.prompt_tokens + handle.completion_tokens)


async def _whole_text(handle: SequenceHandle) -> str:
    try:
        return await handle.text()
    except GenerationFailed as exc:
        raise APIError(500, f"Generation failed: {exc}", type_="server_error", code="generation_failed") from None
    finally:
        handle.cancel()  # no-op when finished; frees the slot when the client went away


async def _stream(request: web.Request, handle: SequenceHandle, first: bytes | None, chunk: ChunkBuilder,
                  usage_chunk: dict[str, Any] | None) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        if first is not None:
            await response.write(first)
        try:
            async for text in handle.chunks():
                await response.write(encode_data(chunk(text, None)))
        except GenerationFailed as exc:
            await response.write(encode_error(
                APIError(500, f"Generation failed: {exc}", type_="server_error", code="generation_failed").body()
            ))
            return response
        await response.write(encode_data(chunk("", handle.finish_reason)))
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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    payload = await _json_body(request)
    body = parse_request(ChatCompletionRequest, payload)
    reject_unsupported(body)
    service.check_model(body.model)
    if body.logprobs or body.top_logprobs:
        raise bad_request("logprobs are not supported by this worker.", param="logprobs")
    plan = plan_structured(body)
    tokens, template_stops = await service.chat_prompt(body, plan)
    generation = service.generation(body, tokens, template_stops, ignore_eos=bool(payload.get("ignore_eos")),
                                    grammar=plan.grammar)
    handle = service.submit(generation)
    id_, created, model = new_id("chatcmpl"), int(time.time()), service.alias
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    usage_chunk = chat_chunk(id_=id_, model=model, created=created, delta={}, include_choice=False) \
        if include_usage else None
    if plan.tools:
        text = await _whole_text(handle)
        calls = parse_tool_call(text)
        finish = "tool_calls" if calls else handle.finish_reason or "stop"
        if not body.stream:
            return web.json_response(chat_response(
                id_=id_, model=model, created=created, content=None if calls else text, finish_reason=finish,
                usage=_usage(handle), tool_calls=calls or None))
        delta: dict[str, Any] = {"role": "assistant", "content": None if calls else text}
        if calls:
            delta["tool_calls"] = [{"index": 0, **call} for call in calls]
        chunks = [chat_chunk(id_=id_, model=model, created=created, delta=delta),
                  chat_chunk(id_=id_, model=model, created=created, delta={}, finish_reason=finish)]
        return await _send_chunks(request, chunks, usage_chunk, handle)
    if not body.stream:
        text = await _whole_text(handle)
        return web.json_response(chat_response(id_=id_, model=model, created=created, content=text,
                                               finish_reason=handle.finish_reason or "stop", usage=_usage(handle)))

    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return chat_chunk(id_=id_, model=model, created=created, delta=delta, finish_reason=finish_reason)

    first = encode_data(chat_chunk(id_=id_, model=model, created=created, delta={"role": "assistant", "content": ""}))
    return await _stream(request, handle, first, chunk, usage_chunk)


async def _send_chunks(request: web.Request, chunks: list[dict[str, Any]], usage_chunk: dict[str, Any] | None,
                       handle: SequenceHandle) -> web.StreamResponse:
    """A stream whose content was produced whole (a tool call is only sent once it parses)."""
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        for item in chunks:
            await response.write(encode_data(item))
        if usage_chunk is not None:
            usage_chunk["usage"] = _usage(handle).model_dump()
            await response.write(encode_data(usage_chunk))
        await response.write(DONE)
        await response.write_eof()
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    payload = await _json_body(request)
    body = parse_request(CompletionRequest, payload)
    reject_unsupported(body)
    service.check_model(body.model)
    if body.echo:
        raise bad_request("echo is not supported.", param="echo")
    if body.logprobs is not None:
        raise bad_request("logprobs are not supported by this worker.", param="logprobs")
    tokens = await service.completion_prompt(body)
    generation = service.generation(body, tokens, ignore_eos=bool(payload.get("ignore_eos")))
    handle = service.submit(generation)
    id_, created, model = new_id("cmpl"), int(time.time()), service.alias
    if not body.stream:
        text = await _whole_text(handle)
        return web.json_response(completion_response(id_=id_, model=model, created=created, text=text,
                                                     finish_reason=handle.finish_reason or "stop",
                                                     usage=_usage(handle)))

    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        return completion_chunk(id_=id_, model=model, created=created, text=text, finish_reason=finish_reason)

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    usage_chunk = {"id": id_, "object": "text_completion", "created": created, "model": model, "choices": []} \
        if include_usage else None
    return await _stream(request, handle, None, chunk, usage_chunk)


async def models(request: web.Request) -> web.Response:
    return web.json_response(model_list([request.app[SERVICE].alias]))
