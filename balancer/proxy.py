"""The streaming proxy: pick a worker, forward, retry before the first byte, stream after it.

A request is committed to a worker once the first body byte reaches the client; before
that, a failed attempt is retried on another worker (at most ``max_attempts`` in all,
within the retry budget; a 4xx is never retried). After it, a broken upstream stream ends
with the SSE error event and never with ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from appliance.core.errors import APIError, bad_request, error_body, not_found, overloaded
from appliance.core.hop import KEY_ID_HEADER, PRIORITY_HEADER, QUEUE_WAIT_HEADER, WEIGHT_HEADER
from appliance.core.hop import REQUEST_ID_HEADER as REQUEST_ID
from appliance.core.request_id import is_sane, request_id_var
from appliance.core.sse import encode_error
from appliance.core.wire import prompt_count
from balancer.fairqueue import ANONYMOUS, BATCH, INTERACTIVE, PRIORITIES, Caller, Demand, Waiter
from balancer.health import note_failure
from balancer.http import TOKEN_HEADER, require_token
from balancer.metrics import BalancerMetrics
from balancer.pool import NoHealthyWorker, QueueFull, QueueTimeout, WorkerPool
from balancer.prefix import prefix_chain, prompt_blocks
from balancer.retry import RetryBudget
from balancer.upstream import Upstream, UpstreamError, UpstreamResponse
from balancer.worker import Worker

__all__ = ["QUEUE_WAIT_HEADER", "Proxy", "ProxyTimeouts", "QueueNotices"]

log = logging.getLogger("balancer.proxy")

RETRYABLE_STATUS = frozenset({502, 503, 504})
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "content-length", "date", "server",
})
_SSE = "text/event-stream"
_TAIL = 2048  # bytes of a stream's end kept to see how it ended
_MAX_WEIGHT = 1000.0
_MAX_CHOICES = 256  # a worker's most slots: the worker refuses more, the estimate ignores it
_MAX_PROMPTS = 4096  # a worker's most max_prompts: the same


class _Target(msgspec.Struct):
    model: str = ""
    stream: bool = False


class _Routed(msgspec.Struct):
    """What routing and scheduling read from a body (the worker validates the rest)."""

    model: str = ""
    stream: bool = False
    messages: list[msgspec.Raw] | None = None
    prompt: msgspec.Raw = msgspec.Raw()  # empty: none (msgspec cannot decode Raw | None: a string failed it)
    max_tokens: int | float | str | None = None
    max_completion_tokens: int | float | str | None = None
    n: int | float | str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: _Usage | None = None


_decode_target = msgspec.json.Decoder(_Target).decode
_decode_routed = msgspec.json.Decoder(_Routed).decode
_decode_usage = msgspec.json.Decoder(_WithUsage).decode


@dataclass(frozen=True, slots=True)
class ProxyTimeouts:
    first_byte_s: float  # streaming requests: send → first body byte
    queue_s: float


@dataclass(frozen=True, slots=True)
class QueueNotices:
    """Streaming requests queued ``after_s`` get 200 and SSE comments every ``every_s`` while they wait."""

    after_s: float = 1.0
    every_s: float = 1.0


@dataclass(slots=True)
class _Call:
    """One client request, as forwarded to every attempt."""

    request: web.Request
    body: bytes
    headers: dict[str, str]
    model: str
    stream: bool
    demand: Demand
    out: web.StreamResponse | None = None  # committed early (queue notices): errors become SSE events
    usage: _Usage | None = None
    waited_s: float | None = None


@dataclass(slots=True)
class _Failure:
    """A failed attempt that may be retried; ``response`` is the worker's own answer, if any."""

    kind: str
    detail: str
    response: web.Response | None = None


class Proxy:
    def __init__(self, pool: WorkerPool, budget: RetryBudget, metrics: BalancerMetrics, *, token: str,
                 timeouts: ProxyTimeouts, max_attempts: int, notices: QueueNotices | None = None) -> None:
        self._pool = pool
        self._notices = notices or QueueNotices()
        self._budget = budget
        self._metrics = metrics
        self._token = token
        self._token_bytes = token.encode()
        self._timeouts = timeouts
        self._max_attempts = max_attempts
        self._upstream: Upstream | None = None
        # Ids for requests that came without one: a random per-process prefix and a counter
        # (unique, cheaper than a uuid4 per request; the gateway normally sends its own).
        self._id_prefix = f"bal-{secrets.token_hex(6)}-"
        self._id_counter = itertools.count(1)

    def attach(self, upstream: Upstream | None) -> None:
        self._upstream = upstream

    async def handle(self, request: web.Request) -> web.StreamResponse:
        require_token(request, self._token_bytes)
        body = await request.read()
        incoming = request.headers
        caller = _caller(incoming)
        demand = Demand(caller)
        model, stream = self._target(body, demand)
        given = incoming.get(REQUEST_ID)
        request_id = given if given and is_sane(given) else f"{self._id_prefix}{next(self._id_counter):x}"
        request_id_var.set(request_id)
        headers = {
            "Content-Type": incoming.get("Content-Type", "application/json"),
            "Accept-Encoding": incoming.get("Accept-Encoding", "identity"),
            REQUEST_ID: request_id,
            TOKEN_HEADER: self._token,
        }
        if caller.key_id:
            headers[KEY_ID_HEADER] = caller.key_id  # the worker scopes prompt-prefix reuse by key
        call = _Call(request, body, headers, model, stream, demand)
        try:
            return await self._serve(call)
        except APIError as exc:
            if call.out is None:
                raise
            return await _end_with_error(call.out, exc.body())  # the client already has 200 and queue notices
        except (ConnectionError, aiohttp.ClientConnectionError):
            if call.out is None:
                raise
            return call.out  # the client left while it waited (a queue notice found the socket closed)

    async def _serve(self, call: _Call) -> web.StreamResponse:
        model = call.model
        self._budget.deposit()
        tried: list[Worker] = []
        failure: _Failure | None = None
        for attempt in range(self._max_attempts):
            if attempt and not (self._pool.can_serve(model, tried) and self._budget.try_spend()):
                break  # nobody else to try, or retries would add more load than the budget allows
            worker = await self._lease(call, tried, first=not attempt)
            if worker is None:
                break  # nobody else to try
            outcome: web.StreamResponse | _Failure | None = None
            call.usage = None
            try:
                outcome = await self._attempt(call, worker)
            finally:
                usage = call.usage
                if usage is not None:
                    self._pool.release(worker, call.demand, prompt_tokens=usage.prompt_tokens,
                                       completion_tokens=usage.completion_tokens)
                else:
                    self._pool.release(worker, call.demand, refund=outcome is None or isinstance(outcome, _Failure))
            if not isinstance(outcome, _Failure):
                return await self._committed(call, outcome)
            failure = outcome
            tried.append(worker)
            log.warning("attempt failed", extra={"worker": worker.url, "kind": outcome.kind, "attempt": attempt + 1})
        assert failure is not None
        return await self._committed(call, self._give_up(model, failure))

    async def _committed(self, call: _Call, response: web.StreamResponse) -> web.StreamResponse:
        """A worker's plain answer to a request that already got 200 and queue notices: as an SSE event."""
        out = call.out
        if out is None or response is out or not isinstance(response, web.Response):
            return response
        raw = response.body if isinstance(response.body, bytes) else b""
        try:
            document = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            document = None
        if not (isinstance(document, dict) and isinstance(document.get("error"), dict)):
            document = error_body(f"The worker answered {response.status} without a stream.", "server_error",
                                  code="upstream_error")
        return await _end_with_error(out, document)

    def _target(self, body: bytes, demand: Demand) -> tuple[str, bool]:
        parts: list[bytes] = []
        if body:
            try:
                routed = _decode_routed(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                routed = None  # odd field types: the worker answers those; route on model and stream alone
            if routed is not None:
                model, stream = routed.model, routed.stream
                parts = self._describe(demand, body, routed)
            else:
                try:
                    target = _decode_target(body)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise bad_request(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
                model, stream = target.model, target.stream
                demand.prompt_tokens = len(body) / 4
        else:
            model, stream = "", False
        if not model:
            served = self._pool.models()
            if len(served) != 1:
                raise bad_request("The request must name a model.", param="model", code="missing_model")
            model = served[0]
        if parts:
            demand.route = prefix_chain(demand.caller.key_id, model, parts)
        return model, stream

    def _describe(self, demand: Demand, body: bytes, routed: _Routed) -> list[bytes]:
        """Cost and token estimate (about 4 bytes a token); the parts of the prompt for prefix routing.

        The body is the one source of a request's cost: its sequences are prompts x ``n``, counted by the rule
        the gateway and the worker apply (:func:`appliance.core.wire.prompt_count`); values the worker will
        refuse count as one."""
        demand.prompt_tokens = len(body) / 4
        n = routed.n
        choices = n if isinstance(n, int) and type(n) is not bool and 1 < n <= _MAX_CHOICES else 1
        prompts = _prompts(routed.prompt)
        demand.slots = choices * (prompts if prompts <= _MAX_PROMPTS else 1)
        limit = routed.max_completion_tokens if routed.max_completion_tokens is not None else routed.max_tokens
        if isinstance(limit, int | float) and type(limit) is not bool and limit >= 0:
            demand.max_tokens = int(limit)  # per sequence: the fair queue charges it for every one
        if not self._pool.prefix_routing:
            return []
        if routed.messages:
            return [bytes(message) for message in routed.messages]
        if routed.prompt:
            return list(prompt_blocks(bytes(routed.prompt)))
        return []

    async def _lease(self, call: _Call, tried: list[Worker], *, first: bool) -> Worker | None:
        pool, model, demand = self._pool, call.model, call.demand
        worker = pool.try_acquire(model, tried, demand)
        if worker is not None:
            return worker
        loop = asyncio.get_running_loop()
        started = loop.time()
        notice = self._notice(call) if call.stream and call.out is None else None
        try:
            worker = await pool.wait_for_worker(model, self._timeouts.queue_s, tried, demand, notice=notice,
                                                notice_after_s=self._notices.after_s,
                                                notice_every_s=self._notices.every_s)
        except NoHealthyWorker:
            if not first:
                return None
            if not pool.has_model(model):
                raise self._reject(model, not_found(f"The model {model!r} does not exist.", param="model",
                                                    code="model_not_found")) from None
            raise self._reject(model, overloaded(f"No healthy worker serves {model!r} right now.",
                                                 retry_after=2)) from None
        except QueueFull:
            raise self._reject(model, overloaded("Every worker is busy and the queue is full.")) from None
        except QueueTimeout:
            raise self._reject(model, overloaded("Every worker stayed busy for too long.")) from None
        waited = loop.time() - started
        call.waited_s = waited if call.waited_s is None else call.waited_s + waited
        self._metrics.queue_wait_by_priority[demand.caller.priority].observe(waited)
        return worker

    def _notice(self, call: _Call) -> Callable[[Waiter], Awaitable[None]]:
        async def notice(waiter: Waiter) -> None:
            out = call.out
            if out is None:
                out = web.StreamResponse(status=200, headers={"Content-Type": _SSE, "Cache-Control": "no-cache"})
                await out.prepare(call.request)
                call.out = out
            ahead, eta = self._pool.position(call.model, waiter)
            await out.write(f": queued position={ahead} eta_s={eta:.1f}\n\n".encode())

        return notice

    def _reject(self, model: str, error: APIError) -> APIError:
        self._metrics.unrouted[(self._metrics.model_label(model), error.status)] += 1
        return error

    async def _attempt(self, call: _Call, worker: Worker) -> web.StreamResponse | _Failure:
        started = asyncio.get_running_loop().time()
        got = await self._first_byte(call, worker)
        if isinstance(got, _Failure):
            return got
        upstream, first, sse = got
        self._metrics.upstream_latency(worker).observe(asyncio.get_running_loop().time() - started)
        status = upstream.status
        worker.responses[(call.model, status)] += 1
        if sse and first:
            return await self._stream(call, worker, upstream, first)
        upstream.release()
        headers = _copy_headers(upstream.headers)
        if call.waited_s is not None:
            headers[QUEUE_WAIT_HEADER] = f"{call.waited_s:.3f}"
        response = web.Response(body=first, status=status, headers=headers)
        if status == 200:
            call.usage = _usage_of(first)
        if status in RETRYABLE_STATUS:
            note_failure(self._pool, worker, f"status_{status}")
            return _Failure(f"status_{status}", f"worker answered {status}", response)
        if sse:  # 200 with an empty event stream: the worker died before its first event
            return self._failed(worker, "reset", "empty event stream")
        return response

    async def _first_byte(self, call: _Call, worker: Worker) -> tuple[UpstreamResponse, bytes, bool] | _Failure:
        """Send, then wait for the first body byte (all of a non-SSE body); nothing reached the client yet."""
        client = self._upstream
        assert client is not None, "proxy used before the app started"
        task = asyncio.current_task()
        assert task is not None
        upstream: UpstreamResponse | None = None
        worker.pending.add(task)  # ejecting the worker aborts this wait (a hung worker's requests move on)
        try:
            pending = client.request(worker.url, call.request.method, call.request.raw_path, call.body, call.headers)
            if not call.stream:  # no first-byte deadline: the answer comes whole (read_timeout_s applies)
                upstream = await pending
                return upstream, await upstream.read(), False
            async with asyncio.timeout(self._timeouts.first_byte_s):
                upstream = await pending
                sse = upstream.status == 200 and upstream.headers.get("Content-Type", "").startswith(_SSE)
                first = await upstream.readany() if sse else await upstream.read()
            return upstream, first, sse
        except TimeoutError:  # only the first-byte deadline raises this; the client's own are UpstreamError
            _close(upstream)
            return self._failed(worker, "first_byte_timeout", "no first byte in time")
        except UpstreamError as exc:
            _close(upstream)
            return self._failed(worker, exc.kind, str(exc))
        except asyncio.CancelledError:
            _close(upstream)  # client gone (handler cancelled) or worker ejected: free the slot now
            if task in worker.aborted and task.uncancel() == 0:
                return self._failed(worker, "ejected", "worker ejected before it answered")
            raise
        finally:
            worker.pending.discard(task)
            worker.aborted.discard(task)

    def _failed(self, worker: Worker, kind: str, detail: str) -> _Failure:
        note_failure(self._pool, worker, kind, detail)
        return _Failure(kind, detail)

    async def _stream(self, call: _Call, worker: Worker, upstream: UpstreamResponse,
                      first: bytes) -> web.StreamResponse:
        out = call.out
        if out is None:
            headers = _copy_headers(upstream.headers)
            if call.waited_s is not None:
                headers[QUEUE_WAIT_HEADER] = f"{call.waited_s:.3f}"
            out = web.StreamResponse(status=upstream.status, headers=headers)
        clean = False
        events = first.count(b"data: ")
        tail = first[-_TAIL:]
        try:
            if not out.prepared:
                await out.prepare(call.request)
            await out.write(first)
            while True:
                try:
                    chunk = await upstream.readany()
                except UpstreamError as exc:
                    kind = exc.kind
                    note_failure(self._pool, worker, kind, f"mid-stream: {exc}")
                    await out.write(_stream_error(f"The worker failed mid-stream ({kind})."))
                    break
                if not chunk:
                    clean = True
                    if not _ended_properly(tail):
                        note_failure(self._pool, worker, "truncated", "stream ended without [DONE]")
                        await out.write(_stream_error("The worker ended the stream early."))
                    break
                await out.write(chunk)
                events += chunk.count(b"data: ")
                tail = (tail + chunk)[-_TAIL:] if len(chunk) < _TAIL else chunk[-_TAIL:]
            await out.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionError):
            worker.errors["client_disconnect"] += 1  # the client left: closing upstream frees the slot
        finally:
            if clean:
                upstream.release()
            else:
                upstream.close()
            # Tokens for the fair queue: the final usage chunk when the stream has one, else ~1 per event.
            call.usage = _stream_usage(tail) or _Usage(round(call.demand.prompt_tokens), max(0, events - 2))
        return out

    def _give_up(self, model: str, failure: _Failure) -> web.StreamResponse:
        if failure.response is not None:
            return failure.response
        if failure.kind in ("timeout", "first_byte_timeout"):
            error = APIError(504, "The worker did not answer in time.", type_="server_error", code="upstream_timeout")
        else:
            error = APIError(502, f"The worker failed: {failure.detail}", type_="server_error", code="upstream_error")
        self._metrics.unrouted[(self._metrics.model_label(model), error.status)] += 1
        raise error


def _caller(headers: CIMultiDictProxy[str]) -> Caller:
    """Who is asking, from the gateway's hop headers (trusted behind the internal token)."""
    key_id = headers.get(KEY_ID_HEADER)
    priority = headers.get(PRIORITY_HEADER)
    if key_id is None and priority is None:
        return ANONYMOUS
    if key_id is None or not is_sane(key_id):
        key_id = ""
    weight = 1.0
    raw = headers.get(WEIGHT_HEADER)
    if raw:
        try:
            weight = float(raw)
        except ValueError:
            weight = 1.0
        if not 0 < weight <= _MAX_WEIGHT:  # also rejects nan
            weight = 1.0
    return Caller(key_id, BATCH if priority == PRIORITIES[BATCH] else INTERACTIVE, weight)


def _prompts(raw: msgspec.Raw) -> int:
    """Prompts in a completions ``prompt`` (one unless it is a JSON list: only then is it decoded)."""
    view = memoryview(raw)
    if not view or view[0] != 0x5B:  # "["
        return 1
    try:
        return prompt_count(msgspec.json.decode(view))
    except (msgspec.DecodeError, RecursionError):
        return 1


def _usage_of(body: bytes) -> _Usage | None:
    if b'"usage"' not in body:
        return None
    try:
        return _decode_usage(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _stream_usage(tail: bytes) -> _Usage | None:
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    start = tail.rfind(b"data: ", 0, at)
    end = tail.find(b"\n", at)
    if start < 0 or end < 0:
        return None
    return _usage_of(tail[start + 6 : end])


async def _end_with_error(out: web.StreamResponse, document: dict[str, object]) -> web.StreamResponse:
    """End a response that is already an event stream with the error event (no ``[DONE]``)."""
    try:
        await out.write(encode_error(document))
        await out.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionError):
        pass  # the client left while it waited
    return out


def _close(upstream: UpstreamResponse | None) -> None:
    if upstream is not None:
        upstream.close()


def _copy_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """The worker's headers minus hop-by-hop names (in place: each answer has its own headers)."""
    for name in _HOP_BY_HOP:
        if name in headers:
            del headers[name]
    return headers


def _ended_properly(tail: bytes) -> bool:
    stripped = tail.rstrip()
    return stripped.endswith(b"data: [DONE]") or b"event: error" in tail


def _stream_error(message: str) -> bytes:
    return encode_error(error_body(message, "server_error", code="upstream_stream_error"))

