"""One batch line sent exactly as an interactive request of its key would be, at batch priority.

The key is admitted by its stored hash (scope, model allow-list, rate and token limits, concurrency),
the caller is the key lowered to ``batch`` (the balancer's fair queue then gives it idle slots only),
and the request takes the route's own internal path: ``gateway.generation.dispatch`` for chat and
completions (RAG, cache, balancer), ``gateway.routes.responses.respond`` for the Responses API, the RAG
service's embeddings for ``/v1/embeddings``. What the caller of :meth:`LineSender.send` gets is the
status and body the client would have had; a refusal that is not the line's fault (a limit, an
unavailable or failing upstream) is raised as :class:`Retry` instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Response

from appliance.core.errors import APIError
from appliance.core.ids import ModelId
from appliance.core.wire import ChatCompletionRequest, CompletionRequest, RequestCost, parse_request
from gateway.access import AccessRecord
from gateway.cache import cache_policy
from gateway.caller import Caller
from gateway.generation import Admitted, check, decode_body, dispatch
from gateway.responses.store import ResponseStore
from gateway.routes.responses import respond
from gateway.service_client import ensure_error_body
from gateway.services import GatewayServices

__all__ = ["LineReply", "LineSender", "Retry"]

BATCH = "batch"
_TRANSIENT = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_WAIT = frozenset({429, 503})  # a limit or a busy/unreachable stack: wait for it, the line is not at fault


@dataclass(frozen=True, slots=True)
class LineReply:
    status: int
    body: bytes


class Retry(Exception):
    """Not the line's fault: send it again after ``after_s``; ``counted`` tries count toward the line's limit."""

    def __init__(self, reply: LineReply, after_s: float, *, counted: bool) -> None:
        super().__init__(f"HTTP {reply.status}")
        self.reply, self.after_s, self.counted = reply, after_s, counted


def _error_reply(exc: APIError) -> LineReply:
    return LineReply(exc.status, msgspec.json.encode(exc.body()))


def _retry_after(headers: dict[str, str]) -> float:
    try:
        return max(0.5, float(headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


class LineSender:
    """Sends batch lines for the app's services; ``responses`` gives the stored-responses store."""

    def __init__(self, svc: GatewayServices, responses: Callable[[], ResponseStore]) -> None:
        self._svc = svc
        self._responses = responses

    async def send(self, digest: str, endpoint: str, body: bytes, request_id: str) -> LineReply:
        try:
            reply = await self._send(digest, endpoint, body, request_id)
        except APIError as exc:
            reply = _error_reply(exc)
            if exc.status in _TRANSIENT:
                raise Retry(reply, _retry_after(exc.headers), counted=exc.status not in _WAIT) from exc
            return reply
        if reply.status in _TRANSIENT:
            raise Retry(reply, 1.0, counted=reply.status not in _WAIT)
        return reply

    async def _send(self, digest: str, endpoint: str, body: bytes, request_id: str) -> LineReply:
        payload = decode_body(body)
        model = payload.get("model")
        record = AccessRecord(request_id=request_id, model=model if ModelId.matches(model) else "")
        if endpoint == "/v1/embeddings":
            return await self._embed(digest, record, body)
        if endpoint == "/v1/responses":
            admitted = await self._admit(digest, "chat", record)
            return await _presented(await respond(admitted, self._responses(), payload, {}, int(time.time())))
        parsed: ChatCompletionRequest | CompletionRequest
        if endpoint == "/v1/chat/completions":
            parsed = parse_request(ChatCompletionRequest, payload)
        else:
            parsed = parse_request(CompletionRequest, payload)
        check(self._svc, parsed)
        policy = cache_policy(parsed, {}, self._svc.settings.cache_enabled, self._svc.settings.cache_ttl_s)
        admitted = await self._admit(digest, "chat", record, slots=RequestCost.of(parsed).slots)
        if isinstance(parsed, ChatCompletionRequest):
            return await _presented(await dispatch(admitted, "chat", parsed, body, policy))
        return await _presented(await dispatch(admitted, "completions", parsed, body, policy))

    async def _admit(self, digest: str, scope: str, record: AccessRecord, *, slots: int = 1) -> Admitted:
        ticket = await self._svc.admission.admit_digest(digest, scope, record.model, slots=slots)
        record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
        return Admitted(self._svc, ticket, record, Caller.of(ticket.principal, BATCH))

    async def _embed(self, digest: str, record: AccessRecord, body: bytes) -> LineReply:
        svc = self._svc
        ModelId.parse(record.model or None, param="model")
        admitted = await self._admit(digest, "embeddings", record)
        prompt = 0
        try:
            reply = await svc.rag.post_json("/v1/embeddings", body, caller=admitted.caller)
            if reply.status == 200:
                usage = msgspec.json.decode(reply.body).get("usage") or {}
                prompt = int(usage.get("prompt_tokens") or 0)
                svc.metrics.count_tokens(record.model, prompt, 0)
        finally:
            svc.tasks.spawn(svc.admission.settle(admitted.ticket, prompt, 0))
        content = reply.body if reply.status == 200 else ensure_error_body(reply.status, reply.body)
        return LineReply(reply.status, content)


async def _presented(response: Response[Any]) -> LineReply:
    """The status and body a route's whole (not streamed) answer carries; its settling runs here."""
    try:
        content = response.content
        body = content if isinstance(content, bytes) else msgspec.json.encode(content)
        return LineReply(response.status_code or 200, body)
    finally:
        if response.background is not None:
            await response.background()
