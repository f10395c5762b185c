"""The Responses API: create (``POST /v1/responses``), retrieve, delete, list a response's input items.

Creating admits the key like chat (scope ``chat``, the model allow-list, limits), builds the chat request
the workers run (``gateway.responses.translate``), validates it like chat, and sends it through the
cache, the fair queue and the balancer (``gateway.generation.forward``), presented as a Response
(``gateway.responses.output``). Stored responses belong to the key that made them: any other key gets the
404 of an id that does not exist. What a request asks for and the appliance does not do is ignored and
named in ``X-Appliance-Ignored`` (``gateway.responses.request``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from appliance.core.errors import APIError, not_found
from appliance.core.ids import ResponseId
from appliance.core.wire import ChatCompletionRequest, parse_request
from gateway.access import access_record
from gateway.admission import parse_bearer
from gateway.generation import Admitted, admit, decode_body, forward, validate
from gateway.openapi import documented, link
from gateway.responses.events import encode_json
from gateway.responses.listing import items_page
from gateway.responses.output import ResponsesOutput
from gateway.responses.request import ResponsesRequest
from gateway.responses.schema import DeletedResponse, ResponseItemList, ResponseObject, ResponseStreamEvent
from gateway.responses.shape import Draft
from gateway.responses.store import ResponseStore, StoredResponse
from gateway.responses.translate import chat_payload
from gateway.services import Services

__all__ = ["HANDLERS", "IGNORED_HEADER", "create_response", "delete_response", "list_input_items", "respond",
           "retrieve_response"]

IGNORED_HEADER = "X-Appliance-Ignored"
JSON = "application/json"
ResponseStoreDep = NamedDependency[ResponseStore]
_GENERATION_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)
# A chat parameter a refusal names, as the Responses request calls it.
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


def _in_responses_terms(error: APIError) -> APIError:
    head = (error.param or "").split(".", 1)[0]
    if head in _PARAMS:
        if head == "max_tokens":  # "max_tokens is N, above this model's limit..." names the parameter itself
            error.message = error.message.replace(head, _PARAMS[head], 1)
        error.param = _PARAMS[head]
    return error


_MADE = "$response.body#/id"
_LINKS = {"RetrieveResponse": link("GET", "/v1/responses/{response_id}", response_id=_MADE),
          "ListInputItems": link("GET", "/v1/responses/{response_id}/input_items", response_id=_MADE),
          "DeleteResponse": link("DELETE", "/v1/responses/{response_id}", response_id=_MADE)}


@post("/v1/responses", summary="Create a response (OpenAI Responses API; stored per key unless store is false)",
      status_code=200, opt=documented(body=ResponsesRequest, answers={200: ResponseObject}, streams=ResponseStreamEvent,
                                      errors=_GENERATION_ERRORS, links={200: _LINKS}))
async def create_response(request: Request[Any, Any, Any], svc: Services, responses: ResponseStoreDep) -> Response[Any]:
    parse_bearer(request.headers.get("authorization"))  # a missing key is a 401 before any body error
    payload = decode_body(await request.body())
    created_at = int(time.time())
    admitted = await admit(request, svc, payload)
    return await respond(admitted, responses, payload, request.headers, created_at)


async def respond(admitted: Admitted, responses: ResponseStore, payload: dict[str, Any], headers: Mapping[str, str],
                  created_at: int) -> Response[Any]:
    """An admitted Responses request (``payload``, its decoded body) answered; the ticket is settled when the
    answer ends. Also what a batch line of ``/v1/responses`` runs (``gateway.batches``)."""
    svc = admitted.svc
    try:
        parsed = parse_request(ResponsesRequest, payload)
        key_id = admitted.caller.key_id
        earlier = _history(responses, parsed.previous_response_id, key_id)
        turn = chat_payload(parsed, earlier)
        try:
            chat, policy = validate(headers, svc, "chat", turn.chat)
        except APIError as exc:
            raise _in_responses_terms(exc) from None
        assert isinstance(chat, ChatCompletionRequest)
        output = ResponsesOutput(Draft.of(ResponseId.mint(), created_at, parsed), turn, key_id,
                                 responses if parsed.stored else None, parsed.max_tool_calls)
        ignored = parsed.ignored(payload)
    except BaseException:
        svc.tasks.spawn(svc.admission.settle(admitted.ticket))
        raise
    reply = await forward(admitted, chat, policy, encode_json(turn.chat), output)
    if ignored:
        reply.headers[IGNORED_HEADER] = ",".join(ignored)
    return reply


def _history(store: ResponseStore, previous: str | None, key_id: str) -> list[dict[str, Any]]:
    if previous is None:
        return []
    found = store.get(ResponseId.parse(previous, param="previous_response_id"), key_id)
    if found is None:
        raise _missing(previous, "previous_response_id")
    return found.history


def _missing(response_id: str, param: str) -> APIError:
    return not_found(f"No response with id {response_id!r} (or one this key may not see).", param=param,
                     code="response_not_found")


async def _verified(request: Request[Any, Any, Any], svc: Services, response_id: str) -> tuple[ResponseId, str]:
    """Verify the key (scope chat, not counted against its limits), then parse the id: (the id, the key's id)."""
    record = access_record(request)
    ticket = await svc.admission.admit(parse_bearer(request.headers.get("authorization")), "chat", limited=False)
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    return ResponseId.parse(response_id, param="response_id"), ticket.principal.key_id


async def _stored(request: Request[Any, Any, Any], svc: Services, store: ResponseStore,
                  response_id: str) -> StoredResponse:
    parsed, key_id = await _verified(request, svc, response_id)
    found = store.get(parsed, key_id)
    if found is None:
        raise _missing(parsed, "response_id")
    return found


@get("/v1/responses/{response_id:str}", summary="A stored response of this key",
     opt=documented(answers={200: ResponseObject}, errors=(400, 401, 403, 404, 503)))
async def retrieve_response(request: Request[Any, Any, Any], svc: Services, responses: ResponseStoreDep,
                            response_id: FromPath[str]) -> Response[Any]:
    found = await _stored(request, svc, responses, response_id)
    return Response(encode_json(found.response), media_type=JSON)


@delete("/v1/responses/{response_id:str}", summary="Delete a stored response of this key", status_code=200,
        opt=documented(answers={200: DeletedResponse}, errors=(400, 401, 403, 404, 503)))
async def delete_response(request: Request[Any, Any, Any], svc: Services, responses: ResponseStoreDep,
                          response_id: FromPath[str]) -> Response[Any]:
    parsed, key_id = await _verified(request, svc, response_id)
    if not responses.delete(parsed, key_id):
        raise _missing(parsed, "response_id")
    return Response(encode_json({"id": str(parsed), "object": "response", "deleted": True}), media_type=JSON)


@get("/v1/responses/{response_id:str}/input_items", summary="The input items of a stored response of this key",
     opt=documented(answers={200: ResponseItemList}, errors=(400, 401, 403, 404, 503)))
async def list_input_items(request: Request[Any, Any, Any], svc: Services, responses: ResponseStoreDep,
                           response_id: FromPath[str]) -> Response[Any]:
    found = await _stored(request, svc, responses, response_id)
    return Response(encode_json(items_page(found.items, request.query_params)), media_type=JSON)


HANDLERS = (create_response, retrieve_response, delete_response, list_input_items)
