"""The streaming proxy: pick a worker, forward, retry before the first byte, relay after it.

A request is committed to a worker once the first body byte reaches the client; before
that, a failed attempt is retried on another worker (at most ``max_attempts`` in all,
within the retry budget; a 4xx is never retried). The worker-hop client sends each attempt
once, so every resend of a request a worker may have read is one of these retries. After the
first byte, :mod:`balancer.relay` copies the stream; a broken one ends with the SSE error event
and never with ``[DONE]``.
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

from appliance.core.errors import APIError, error_body, not_found, overloaded
from appliance.core.hop import KEY_ID_HEADER, PRIORITY_HEADER
from appliance.core.hop import REQUEST_ID_HEADER as REQUEST_ID
from appliance.core.hop_client import HopClient, HopError, HopResponse
from appliance.core.request_id import is_sane, request_id_var
from balancer.fairqueue import PRIORITIES, Demand, Waiter
from balancer.health import note_failure
from balancer.http import TOKEN_HEADER, require_token
from balancer.metrics import BalancerMetrics
from balancer.peek import caller_of, peek_body
from balancer.pool import NoHealthyWorker, QueueFull, QueueTimeout, WorkerPool
from balancer.relay import SSE, Call, answer_headers, end_with_error, relay_stream, usage_of
from balancer.retry import RetryBudget
from balancer.swapper import Swapper
from balancer.worker import Worker

__all__ = ["Proxy", "ProxyTimeouts", "QueueNotices"]

log = logging.getLogger("balancer.proxy")

RETRYABLE_STATUS = frozenset({502, 503, 504})


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
class _Failure:
    """A failed attempt that may be retried; ``response`` is the worker's own answer, if any."""

    kind: str
    detail: str
    response: web.Response | None = None


class Proxy:
    def __init__(self, pool: WorkerPool, budget: RetryBudget, metrics: BalancerMetrics, *, token: str,
                 timeouts: ProxyTimeouts, max_attempts: int, notices: QueueNotices | None = None,
                 swapper: Swapper | None = None) -> None:
        self._pool = pool
        self._swapper = swapper
        self._notices = notices or QueueNotices()
        self._budget = budget
        self._metrics = metrics
        self._token = token
        self._token_bytes = token.encode()
        self._timeouts = timeouts
        self._max_attempts = max_attempts
        self._client: HopClient | None = None
        # Ids for requests that came without one: a random per-process prefix and a counter
        # (unique, cheaper than a uuid4 per request; the gateway normally sends its own).
        self._id_prefix = f"bal-{secrets.token_hex(6)}-"
        self._id_counter = itertools.count(1)

    def attach(self, client: HopClient | None) -> None:
        """The worker-hop client, opened and closed by the app's lifespan."""
        self._client = client

    async def handle(self, request: web.Request) -> web.StreamResponse:
        require_token(request, self._token_bytes)
        body = await request.read()
        incoming = request.headers
        caller = caller_of(incoming)
        demand = Demand(caller)
        model, stream = peek_body(body, demand, self._pool)
        self._metrics.model_requests(model)
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
        headers[PRIORITY_HEADER] = PRIORITIES[caller.priority]  # the worker's decode lanes: batch yields compute
        call = Call(request, body, headers, model, stream, demand)
        try:
            return await self._serve(call)
        except APIError as exc:
            if call.out is None:
                raise
            return await end_with_error(call.out, exc.body())  # the client already has 200 and queue notices
        except (ConnectionError, aiohttp.ClientConnectionError):
            if call.out is None:
                raise
            return call.out  # the client left while it waited (a queue notice found the socket closed)

    async def _serve(self, call: Call) -> web.StreamResponse:
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

    async def _committed(self, call: Call, response: web.StreamResponse) -> web.StreamResponse:
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
        return await end_with_error(out, document)

    async def _lease(self, call: Call, tried: list[Worker], *, first: bool) -> Worker | None:
        pool, model, demand = self._pool, call.model, call.demand
        worker = pool.try_acquire(model, tried, demand)
        if worker is not None:
            return worker
        loop = asyncio.get_running_loop()
        started = loop.time()
        notice = self._notice(call) if call.stream and call.out is None else None
        patience = self._patience(model) if first else self._timeouts.queue_s
        try:
            worker = await pool.wait_for_worker(model, patience, tried, demand, notice=notice,
                                                notice_after_s=self._notices.after_s,
                                                notice_every_s=self._notices.every_s)
        except NoHealthyWorker:
            if not first:
                return None
            if not pool.has_model(model):
                raise self._reject(model, not_found(f"The model {model!r} does not exist.", param="model",
                                                    code="model_not_found")) from None
            if self._swapper is not None and self._swapper.on_demand(model):
                raise self._reject(model, overloaded(
                    f"No worker serves {model!r} and no swap host can load it now (each holds a pinned model, or "
                    "its last load failed).", retry_after=5)) from None
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

    def _patience(self, model: str) -> float:
        """How long a request may queue: the queue timeout, or for an on_demand model (its host may be swapped
        away and back while it waits) the swap queue timeout; a request whose model a swap host must load first
        and whose expected wait is longer than that is refused now, before any byte."""
        swapper = self._swapper
        if swapper is None or not swapper.on_demand(model):
            return self._timeouts.queue_s
        patience = swapper.settings.queue_timeout_s
        expected = swapper.expected_wait(model)
        if expected is not None and expected > patience:
            raise self._reject(model, overloaded(
                f"The model {model!r} is not loaded and would take about {expected:.0f} s to be served, longer than "
                f"the {patience:.0f} s a request may wait.", retry_after=expected))
        return patience

    def _notice(self, call: Call) -> Callable[[Waiter], Awaitable[None]]:
        async def notice(waiter: Waiter) -> None:
            out = call.out
            if out is None:
                out = web.StreamResponse(status=200, headers={"Content-Type": SSE, "Cache-Control": "no-cache"})
                await out.prepare(call.request)
                call.out = out
            ahead, eta = self._pool.position(call.model, waiter)
            await out.write(f": queued position={ahead} eta_s={eta:.1f}\n\n".encode())

        return notice

    def _reject(self, model: str, error: APIError) -> APIError:
        self._metrics.unrouted[(self._metrics.model_label(model), error.status)] += 1
        return error

    async def _attempt(self, call: Call, worker: Worker) -> web.StreamResponse | _Failure:
        started = asyncio.get_running_loop().time()
        got = await self._first_byte(call, worker)
        if isinstance(got, _Failure):
            return got
        answer, first, sse = got
        self._metrics.upstream_latency(worker).observe(asyncio.get_running_loop().time() - started)
        status = answer.status
        worker.responses[(call.model, status)] += 1
        if sse and first:
            return await relay_stream(call, self._pool, worker, answer, first)
        answer.release()
        response = web.Response(body=first, status=status, headers=answer_headers(call, answer.headers))
        if status == 200:
            call.usage = usage_of(first)
        if status in RETRYABLE_STATUS:
            note_failure(self._pool, worker, f"status_{status}")
            return _Failure(f"status_{status}", f"worker answered {status}", response)
        if sse:  # 200 with an empty event stream: the worker died before its first event
            return self._failed(worker, "reset", "empty event stream")
        return response

    async def _first_byte(self, call: Call, worker: Worker) -> tuple[HopResponse, bytes, bool] | _Failure:
        """Send, then wait for the first body byte (all of a non-SSE body); nothing reached the client yet."""
        client = self._client
        assert client is not None, "proxy used before the app started"
        task = asyncio.current_task()
        assert task is not None
        answer: HopResponse | None = None
        worker.pending.add(task)  # ejecting the worker aborts this wait (a hung worker's requests move on)
        try:
            pending = client.request(worker.url, call.request.method, call.request.raw_path, call.body, call.headers)
            if not call.stream:  # no first-byte deadline: the answer comes whole (read_timeout_s applies)
                answer = await pending
                return answer, await answer.read(), False
            async with asyncio.timeout(self._timeouts.first_byte_s):
                answer = await pending
                sse = answer.status == 200 and answer.headers.get("Content-Type", "").startswith(SSE)
                first = await answer.readany() if sse else await answer.read()
            return answer, first, sse
        except TimeoutError:  # only the first-byte deadline raises this; the client's own are HopError
            _close(answer)
            return self._failed(worker, "first_byte_timeout", "no first byte in time")
        except HopError as exc:
            _close(answer)
            return self._failed(worker, exc.kind, str(exc))
        except asyncio.CancelledError:
            _close(answer)  # client gone (handler cancelled) or worker ejected: free the slot now
            if task in worker.aborted and task.uncancel() == 0:
                return self._failed(worker, "ejected", "worker ejected before it answered")
            raise
        finally:
            worker.pending.discard(task)
            worker.aborted.discard(task)

    def _failed(self, worker: Worker, kind: str, detail: str) -> _Failure:
        note_failure(self._pool, worker, kind, detail)
        return _Failure(kind, detail)

    def _give_up(self, model: str, failure: _Failure) -> web.StreamResponse:
        if failure.response is not None:
            return failure.response
        if failure.kind in ("timeout", "first_byte_timeout"):
            error = APIError(504, "The worker did not answer in time.", type_="server_error", code="upstream_timeout")
        else:
            error = APIError(502, f"The worker failed: {failure.detail}", type_="server_error", code="upstream_error")
        self._metrics.unrouted[(self._metrics.model_label(model), error.status)] += 1
        raise error


def _close(answer: HopResponse | None) -> None:
    if answer is not None:
        answer.close()
