"""The relay of a worker's answer to the client once it is committed (its first body byte is out).

An event stream is copied chunk by chunk as it comes. How it ended is read from its last bytes: without
``data: [DONE]`` (or the worker's own error event) it was cut, and the client gets the SSE error event,
never ``[DONE]``. The tokens it used (its final usage chunk, else about one per event) settle the caller's
account in the fair queue.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from appliance.core.errors import error_body
from appliance.core.hop import HOP_BY_HOP, QUEUE_WAIT_HEADER
from appliance.core.hop_client import HopError, HopResponse
from appliance.core.sse import encode_error
from balancer.fairqueue import Demand
from balancer.health import note_failure
from balancer.pool import WorkerPool
from balancer.worker import Worker

__all__ = ["SSE", "Call", "Usage", "answer_headers", "end_with_error", "relay_stream", "usage_of"]

SSE = "text/event-stream"
_TAIL = 2048  # bytes of a stream's end kept to see how it ended
# Not copied from a worker's answer: hop-by-hop, and what the balancer's own server writes.
_NOT_COPIED = HOP_BY_HOP | {"date", "server"}


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: Usage | None = None


_decode_usage = msgspec.json.Decoder(_WithUsage).decode


@dataclass(slots=True)
class Call:
    """One client request, as forwarded to every attempt."""

    request: web.Request
    body: bytes
    headers: dict[str, str]
    model: str
    stream: bool
    demand: Demand
    out: web.StreamResponse | None = None  # committed early (queue notices): errors become SSE events
    usage: Usage | None = None
    waited_s: float | None = None


def answer_headers(call: Call, headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """The worker's headers for the client (in place: each answer has its own), with the queue wait."""
    for name in _NOT_COPIED:
        if name in headers:
            del headers[name]
    if call.waited_s is not None:
        headers[QUEUE_WAIT_HEADER] = f"{call.waited_s:.3f}"
    return headers


async def relay_stream(call: Call, pool: WorkerPool, worker: Worker, answer: HopResponse,
                       first: bytes) -> web.StreamResponse:
    """Copy the rest of an event stream whose first bytes are ``first``; sets ``call.usage``."""
    out = call.out
    if out is None:
        out = web.StreamResponse(status=answer.status, headers=answer_headers(call, answer.headers))
    clean = False
    events = first.count(b"data: ")
    tail = first[-_TAIL:]
    try:
        if not out.prepared:
            await out.prepare(call.request)
        await out.write(first)
        while True:
            try:
                chunk = await answer.readany()
            except HopError as exc:
                note_failure(pool, worker, exc.kind, f"mid-stream: {exc}")
                await out.write(_stream_error(f"The worker failed mid-stream ({exc.kind})."))
                break
            if not chunk:
                clean = True
                if not _ended_properly(tail):
                    note_failure(pool, worker, "truncated", "stream ended without [DONE]")
                    await out.write(_stream_error("The worker ended the stream early."))
                break
            await out.write(chunk)
            events += chunk.count(b"data: ")
            tail = (tail + chunk)[-_TAIL:] if len(chunk) < _TAIL else chunk[-_TAIL:]
        await out.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionError):
        worker.errors["client_disconnect"] += 1  # the client left: closing the connection frees the slot
    finally:
        if clean:
            answer.release()
        else:
            answer.close()
        # Tokens for the fair queue: the final usage chunk when the stream has one, else ~1 per event.
        call.usage = _stream_usage(tail) or Usage(round(call.demand.prompt_tokens), max(0, events - 2))
    return out


async def end_with_error(out: web.StreamResponse, document: dict[str, object]) -> web.StreamResponse:
    """End a response that is already an event stream with the error event (no ``[DONE]``)."""
    try:
        await out.write(encode_error(document))
        await out.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionError):
        pass  # the client left while it waited
    return out


def usage_of(body: bytes) -> Usage | None:
    """The ``usage`` of a whole JSON answer, if it has one."""
    if b'"usage"' not in body:
        return None
    try:
        return _decode_usage(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _stream_usage(tail: bytes) -> Usage | None:
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    start = tail.rfind(b"data: ", 0, at)
    end = tail.find(b"\n", at)
    if start < 0 or end < 0:
        return None
    return usage_of(tail[start + 6 : end])


def _ended_properly(tail: bytes) -> bool:
    stripped = tail.rstrip()
    return stripped.endswith(b"data: [DONE]") or b"event: error" in tail


def _stream_error(message: str) -> bytes:
    return encode_error(error_body(message, "server_error", code="upstream_stream_error"))
