"""Chat and text completions: admit, validate, augment, look up the cache, forward, settle.

The steps are shared by every route that generates: chat and completions present the balancer's answer
as it is (``PASS_THROUGH``); another surface (the Responses API) admits with ``admit``, validates the chat
request it builds with ``validate``, and hands ``forward`` an ``Output`` that turns the chat answer (a JSON
document, or the chat SSE bytes) into its own shape. Cache hits go through the same ``Output``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec
from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from appliance.core.errors import APIError, bad_request
from appliance.core.hop_client import HopError
from appliance.core.ids import ModelId
from appliance.core.wire import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestCost,
    check_max_tokens,
    check_n,
    check_prompts,
    message_text,
    parse_json,
    parse_request,
    reject_unsupported,
)
from gateway.access import AccessRecord, access_record
from gateway.admission import Ticket, parse_bearer
from gateway.cache import CachePolicy, cache_key, cache_policy
from gateway.caller import Caller
from gateway.rag import augment, parse_rag_options
from gateway.relay import StreamOutcome, relay_stream
from gateway.service_client import CLIENT_PRIORITY_HEADER, decode_json_object, ensure_error_body
from gateway.services import GatewayServices

__all__ = ["PASS_THROUGH", "Admitted", "Job", "Output", "admit", "check", "decode_body", "dispatch", "forward",
           "generate", "validate", "with_usage"]

Kind = Literal["chat", "completions"]
_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
JSON = "application/json"
_NOT_FETCHED = object()
SSE = "text/event-stream"


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request whose key passed admission: the ticket to settle, its access record, who it is for."""

    svc: GatewayServices
    ticket: Ticket
    record: AccessRecord
    caller: Caller


@dataclass(slots=True)
class Job:
    """One admitted generation request, as it travels through the steps."""

    admitted: Admitted
    kind: Kind
    parsed: ChatCompletionRequest | CompletionRequest
    body: bytes
    policy: CachePolicy
    output: Output
    key: str = ""
    citations: list[dict[str, Any]] | None = None
    hide_usage: bool = False

    @property
    def svc(self) -> GatewayServices:
        return self.admitted.svc

    @property
    def ticket(self) -> Ticket:
        return self.admitted.ticket

    @property
    def record(self) -> AccessRecord:
        return self.admitted.record

    def headers(self, cache: str) -> dict[str, str]:
        self.record.cache = cache
        return {**self.ticket.rate_headers, "X-Cache": cache}


class Output(Protocol):
    """How a route presents the chat answer it asked for (chat presents it as it is)."""

    async def complete(self, job: Job, document: dict[str, Any], body: bytes) -> bytes:
        """The client's body for a complete chat answer (``document`` is ``body`` decoded)."""
        ...

    def stream(self, job: Job, chat: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The client's bytes for a chat SSE stream (already relayed: usage counted, cut streams marked)."""
        ...


class _PassThrough:
    async def complete(self, job: Job, document: dict[str, Any], body: bytes) -> bytes:
        if job.citations is None:
            return body
        return msgspec.json.encode({**document, "citations": job.citations})

    def stream(self, job: Job, chat: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return chat


PASS_THROUGH: Output = _PassThrough()


def decode_body(raw: bytes) -> dict[str, Any]:
    try:
        payload = msgspec.json.decode(raw) if raw else None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # bad UTF-8 / hostile nesting: a 400, not a 500
        raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return payload


async def generate(request: Request[Any, Any, Any], svc: GatewayServices, kind: Kind) -> Response[Any]:
    parse_bearer(request.headers.get("authorization"))  # a missing key is a 401 before any body error
    raw = await request.body()
    # Validate (once, from the raw bytes) before admission so the cache lookup can ride in the admission
    # round trip; report a bad request only after the key is known to be good (a bad key is a 401 whatever
    # the body). Only a body that is not a JSON object is refused first.
    invalid: APIError | None = None
    try:
        parsed, policy = _validated(request, svc, kind, raw)
        facts: dict[str, Any] = {"model": parsed.model, "service_tier": parsed.service_tier}
    except APIError as exc:
        if exc.code == "invalid_json":
            raise
        invalid, facts = exc, decode_body(raw)
    key = ""
    if invalid is None and policy.active and not (isinstance(parsed, ChatCompletionRequest) and parsed.rag):
        key = cache_key(kind, parsed, svc.catalog.model_sha256(parsed.model))
    lookup = svc.cache.get_command(key) if key and policy.lookup else None
    # What the request occupies counts against the key's concurrency limit: a slot per sequence.
    slots = RequestCost.of(parsed).slots if invalid is None else 1
    admitted = await admit(request, svc, facts, slots=slots, lookup=lookup)
    if invalid is not None:
        svc.tasks.spawn(svc.admission.settle(admitted.ticket))
        raise invalid
    return await dispatch(admitted, kind, parsed, raw, policy, key=key,
                          prefetched=admitted.ticket.prefetched if lookup else _NOT_FETCHED)


async def dispatch(admitted: Admitted, kind: Kind, parsed: ChatCompletionRequest | CompletionRequest, body: bytes,
                   policy: CachePolicy, *, key: str = "", prefetched: Any = _NOT_FETCHED) -> Response[Any]:
    """A validated request (``body``: its JSON) presented as it is: RAG, the cache, the balancer; the ticket is
    settled when the answer ends. Also what a batch line runs (``gateway.batches``)."""
    svc = admitted.svc
    try:
        job = Job(admitted, kind, parsed, body, policy, PASS_THROUGH, key=key)
        await _prepare(job)
        return await _dispatch(job, prefetched)
    except BaseException:
        svc.tasks.spawn(svc.admission.settle(admitted.ticket))
        raise


async def admit(request: Request[Any, Any, Any], svc: GatewayServices, payload: dict[str, Any], *,
                slots: int = 1, lookup: Any = None) -> Admitted:
    """Verify the key for a generation (scope ``chat``, the body's model, ``slots`` of concurrency).

    Whoever gets the ``Admitted`` owns its ticket: ``forward`` settles it, anything raised before must
    ``svc.admission.settle(admitted.ticket)``."""
    record = access_record(request)
    model = payload.get("model")
    record.model = model if ModelId.matches(model) else ""  # anything else is refused once the key is known
    ticket = await svc.admission.admit(parse_bearer(request.headers.get("authorization")), "chat", record.model,
                                       extra=lookup, slots=slots)
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    asked = request.headers.get(CLIENT_PRIORITY_HEADER) or payload.get("service_tier")
    return Admitted(svc, ticket, record, Caller.of(ticket.principal, asked))


async def forward(admitted: Admitted, parsed: ChatCompletionRequest, policy: CachePolicy, body: bytes,
                  output: Output) -> Response[Any]:
    """Send a validated chat request (``body``: its JSON) through the cache and the balancer, present the
    answer with ``output``, and settle the ticket when the answer ends."""
    svc = admitted.svc
    try:
        key = cache_key("chat", parsed, svc.catalog.model_sha256(parsed.model)) if policy.active else ""
        job = Job(admitted, "chat", parsed, body, policy, output, key=key)
        admitted.record.stream = parsed.stream
        if parsed.stream and not (parsed.stream_options and parsed.stream_options.include_usage):
            job.body = with_usage(body)
            job.hide_usage = output is PASS_THROUGH  # another output reads the usage chunk itself
        return await _dispatch(job, _NOT_FETCHED)
    except BaseException:
        svc.tasks.spawn(svc.admission.settle(admitted.ticket))
        raise


def validate(headers: Mapping[str, str], svc: GatewayServices, kind: Kind,
             payload: dict[str, Any]) -> tuple[ChatCompletionRequest | CompletionRequest, CachePolicy]:
    """The request (a decoded body) as the workers will read it, refused here exactly as they would refuse
    it, and the cache policy its ``headers`` ask for (a batch line has none)."""
    if kind == "chat":
        return _checked(headers, svc, parse_request(ChatCompletionRequest, payload))
    return _checked(headers, svc, parse_request(CompletionRequest, payload))


def _validated(request: Request[Any, Any, Any], svc: GatewayServices, kind: Kind,
               raw: bytes) -> tuple[ChatCompletionRequest | CompletionRequest, CachePolicy]:
    """``validate`` straight from the client's bytes: parsed once, no intermediate dict."""
    if kind == "chat":
        return _checked(request.headers, svc, parse_json(ChatCompletionRequest, raw))
    return _checked(request.headers, svc, parse_json(CompletionRequest, raw))


def _checked(headers: Mapping[str, str], svc: GatewayServices, parsed: ChatCompletionRequest | CompletionRequest,
             ) -> tuple[ChatCompletionRequest | CompletionRequest, CachePolicy]:
    check(svc, parsed)
    asked = {name: headers.get(name, "") for name in ("cache-control", "x-cache", "x-cache-ttl")}
    return parsed, cache_policy(parsed, asked, svc.settings.cache_enabled, svc.settings.cache_ttl_s)


def check(svc: GatewayServices, parsed: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse here what the workers would refuse, exactly as they would (their own published limits)."""
    settings = svc.settings
    ModelId.parse(parsed.model, param="model")  # one rule for every model id (a key's allow-list, routing)
    if isinstance(parsed, ChatCompletionRequest) and len(parsed.messages) > settings.max_messages:
        raise bad_request(f"Too many messages: at most {settings.max_messages}.", param="messages",
                          code="too_many_messages")
    reject_unsupported(parsed)
    limits = svc.catalog.limits(parsed.model)  # the workers' own limits, refused here exactly as they would refuse
    if limits is not None:
        check_max_tokens(parsed, limits.max_tokens)
        if limits.max_choices is not None:
            check_n(parsed, limits.max_choices)
        if limits.max_prompts is not None:
            check_prompts(parsed, limits.max_prompts)


async def _prepare(job: Job) -> None:
    """RAG augmentation, and the body the balancer gets: the client's own bytes unless something changed."""
    parsed, svc = job.parsed, job.svc
    job.record.stream = parsed.stream
    if svc.settings.log_prompts:
        job.record.prompt = _prompt_text(parsed)[:2000]
    if isinstance(parsed, ChatCompletionRequest) and parsed.rag is not None:
        options = parse_rag_options(parsed.rag)
        await svc.owners.check(options.collection, job.ticket.principal, write=False)
        job.parsed, job.citations = await augment(parsed, options, svc.rag, caller=job.admitted.caller,
                                                  secret=svc.fence_secret,
                                                  max_chars=svc.settings.rag_max_context_chars)
        payload = {k: v for k, v in decode_body(job.body).items() if k != "rag"}
        payload["messages"] = [m.model_dump(mode="json", exclude_none=True, by_alias=True)
                               for m in job.parsed.messages]
        job.body = msgspec.json.encode(payload)
        if job.policy.active:
            job.key = cache_key(job.kind, job.parsed, svc.catalog.model_sha256(parsed.model))
    if parsed.stream and not (parsed.stream_options and parsed.stream_options.include_usage):
        job.body, job.hide_usage = with_usage(job.body), True


def with_usage(body: bytes) -> bytes:
    """A streaming request's body asking for the usage chunk (the gateway counts tokens from it).

    The member is appended to the client's own validated object, as its last member: JSON readers here
    keep the last of duplicate names, so whatever the client spelled (``"stream\\u005foptions": null``
    included) cannot hide the usage the key is charged from."""
    tail = body.rstrip()
    if tail.endswith(b"}") and not tail[:-1].rstrip().endswith(b"{"):
        return tail[:-1] + b',"stream_options":{"include_usage":true}}'
    return msgspec.json.encode({**decode_body(body), "stream_options": {"include_usage": True}})


async def _dispatch(job: Job, prefetched: Any) -> Response[Any]:
    svc = job.svc
    if job.policy.lookup:
        hit = (await svc.cache.get(job.key) if prefetched is _NOT_FETCHED else svc.cache.decode(prefetched))
        if hit is not None and hit.stream == job.parsed.stream:
            svc.metrics.cache.labels("hit").inc()
            settle = BackgroundTask(svc.admission.settle, job.ticket, 0, 0, "hit")
            if job.output is PASS_THROUGH:
                return Response(hit.body, media_type=SSE if hit.stream else JSON, headers=job.headers("HIT"),
                                background=settle)
            if hit.stream:
                return Stream(job.output.stream(job, _once(hit.body)), media_type=SSE,
                              headers={**job.headers("HIT"), "Cache-Control": "no-cache"}, background=settle)
            body = await job.output.complete(job, decode_json_object(hit.body, "cache"), hit.body)
            return Response(body, media_type=JSON, headers=job.headers("HIT"), background=settle)
    result = "miss" if job.policy.active else "bypass"
    svc.metrics.cache.labels(result).inc()
    if job.parsed.stream:
        return await _stream(job, result)
    return await _complete(job, result)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _complete(job: Job, result: str) -> Response[Any]:
    svc = job.svc
    started = time.perf_counter()
    reply = await svc.balancer.post_json(_PATHS[job.kind], job.body, caller=job.admitted.caller)
    job.record.upstream_s = time.perf_counter() - started
    if reply.status != 200:
        headers = {k: v for k, v in reply.headers.items() if k.lower() == "retry-after"}
        return Response(ensure_error_body(reply.status, reply.body), status_code=reply.status, media_type=JSON,
                        headers={**headers, **job.ticket.rate_headers},
                        background=BackgroundTask(svc.admission.settle, job.ticket))
    document = decode_json_object(reply.body, "balancer")
    usage = document.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    _count(job, prompt, completion)
    body = await job.output.complete(job, document, reply.body)
    cached = body if job.output is PASS_THROUGH else reply.body  # a hit is presented by its output again
    store = svc.cache.put_command(job.key, cached, False, job.policy.ttl_s) if job.policy.store else None
    return Response(body, media_type=JSON, headers=job.headers(result.upper()),
                    background=BackgroundTask(svc.admission.settle, job.ticket, prompt, completion, result, store))


async def _stream(job: Job, result: str) -> Response[Any]:
    svc = job.svc
    started = time.perf_counter()
    resp = await svc.balancer.open_stream(_PATHS[job.kind], job.body, caller=job.admitted.caller)
    if resp.status != 200:
        try:
            raw = await resp.read()
        except HopError:
            raw = b""
        finally:
            resp.release()
        error = msgspec.json.decode(ensure_error_body(resp.status, raw))["error"]
        retry = resp.headers.get("Retry-After")
        raise APIError(resp.status, str(error.get("message")), type_=str(error.get("type") or "server_error"),
                       param=error.get("param"), code=error.get("code"),
                       retry_after=float(retry) if retry and retry.isdigit() else None)
    outcome = StreamOutcome(recorded=bytearray() if job.policy.store else None)

    def on_end(done: StreamOutcome) -> None:
        job.record.upstream_s = time.perf_counter() - started
        _count(job, done.prompt_tokens, done.completion_tokens)
        store = None
        if done.finished and done.recorded is not None:
            store = svc.cache.put_command(job.key, bytes(done.recorded), True, job.policy.ttl_s)
        svc.tasks.spawn(svc.admission.settle(job.ticket, done.prompt_tokens, done.completion_tokens, result, store))

    stream = relay_stream(resp, outcome, hide_usage=job.hide_usage, citations=job.citations, on_end=on_end)
    return Stream(job.output.stream(job, stream), media_type=SSE,
                  headers={**job.headers(result.upper()), "Cache-Control": "no-cache"})


def _prompt_text(request: ChatCompletionRequest | CompletionRequest) -> str:
    if isinstance(request, ChatCompletionRequest):
        return "\n".join(f"{m.role}: {message_text(m)}" for m in request.messages)
    return request.prompt if isinstance(request.prompt, str) else json.dumps(request.prompt)


def _count(job: Job, prompt: int, completion: int) -> None:
    job.record.prompt_tokens, job.record.completion_tokens = prompt, completion
    job.svc.metrics.count_tokens(job.parsed.model, prompt, completion)
