"""The OpenAI-compatible surface: chat, completions, embeddings, models."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.params import FromPath

from appliance.core.errors import not_found
from appliance.core.ids import ModelId
from appliance.core.wire import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.access import access_record
from gateway.admission import parse_bearer
from gateway.caller import Caller
from gateway.generation import decode_body, generate
from gateway.openapi import (
    ChatCompletion,
    ChatCompletionChunk,
    EmbeddingList,
    ModelList,
    ModelObject,
    TextCompletion,
    documented,
)
from gateway.service_client import decode_json_object, ensure_error_body
from gateway.services import Services

__all__ = ["chat_completions", "completions", "embeddings", "list_models", "retrieve_model"]

JSON = "application/json"
_GENERATION_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)


@post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible; `rag` extension)", status_code=200,
      opt=documented(body=ChatCompletionRequest, answers={200: ChatCompletion}, streams=ChatCompletionChunk,
                     errors=_GENERATION_ERRORS))
async def chat_completions(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    return await generate(request, svc, "chat")


@post("/v1/completions", summary="Text completion (OpenAI-compatible)", status_code=200,
      opt=documented(body=CompletionRequest, answers={200: TextCompletion}, streams=TextCompletion,
                     errors=_GENERATION_ERRORS))
async def completions(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    return await generate(request, svc, "completions")


@post("/v1/embeddings", summary="Embeddings (OpenAI-compatible, served by the RAG service)", status_code=200,
      opt=documented(body=EmbeddingRequest, answers={200: EmbeddingList},
                     errors=(400, 401, 403, 404, 413, 429, 502, 503)))
async def embeddings(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    record = access_record(request)
    secret = parse_bearer(request.headers.get("authorization"))
    raw = await request.body()
    payload = decode_body(raw)
    model = payload.get("model")
    record.model = model if ModelId.matches(model) else ""  # anything else is refused once the key is known
    ticket = await svc.admission.admit(secret, "embeddings", record.model)
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    started = time.perf_counter()
    try:
        ModelId.parse(model, param="model")
        reply = await svc.rag.post_json("/v1/embeddings", raw, caller=Caller.of(ticket.principal))
    except BaseException:
        svc.tasks.spawn(svc.admission.settle(ticket))
        raise
    record.upstream_s = time.perf_counter() - started
    prompt = 0
    body = reply.body
    if reply.status == 200:
        usage = decode_json_object(body, "rag service").get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        record.prompt_tokens = prompt
        svc.metrics.count_tokens(record.model, prompt, 0)
    else:
        body = ensure_error_body(reply.status, body)
    return Response(body, status_code=reply.status, media_type=JSON, headers=ticket.rate_headers,
                    background=BackgroundTask(svc.admission.settle, ticket, prompt, 0))


@get("/v1/models", summary="Models served by the workers (filtered by the key's allowed models)",
     opt=documented(answers={200: ModelList}, errors=(401, 502, 503)))
async def list_models(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    record = access_record(request)
    secret = parse_bearer(request.headers.get("authorization"))
    ticket = await svc.admission.admit(secret, "", limited=False)
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    reply = await svc.balancer.request("GET", "/v1/models", caller=None)
    if reply.status != 200:
        return Response(ensure_error_body(reply.status, reply.body), status_code=reply.status, media_type=JSON)
    if not ticket.principal.models:
        return Response(reply.body, media_type=JSON)
    document = msgspec.json.decode(reply.body)
    allowed = ticket.principal.models
    document["data"] = [m for m in document.get("data", []) if m.get("id") in allowed]
    return Response(msgspec.json.encode(document), media_type=JSON)


@get("/v1/models/{model:str}",
     summary="One model served by the workers, with its limits (context_length, max_tokens, max_choices)",
     opt=documented(answers={200: ModelObject}, errors=(400, 401, 404, 502, 503)))
async def retrieve_model(request: Request[Any, Any, Any], svc: Services, model: FromPath[str]) -> Response[Any]:
    record = access_record(request)
    secret = parse_bearer(request.headers.get("authorization"))
    ticket = await svc.admission.admit(secret, "", limited=False)
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    wanted = record.model = ModelId.parse(model, param="model")
    reply = await svc.balancer.request("GET", "/v1/models", caller=None)
    if reply.status != 200:
        return Response(ensure_error_body(reply.status, reply.body), status_code=reply.status, media_type=JSON)
    document = decode_json_object(reply.body, "balancer")
    allowed = ticket.principal.models
    for item in document.get("data") or []:
        if isinstance(item, dict) and item.get("id") == wanted and (not allowed or wanted in allowed):
            return Response(msgspec.json.encode(item), media_type=JSON)
    raise not_found(f"The model {wanted!r} does not exist.", param="model", code="model_not_found")
