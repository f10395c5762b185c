"""Relay an upstream SSE stream to the client event by event, without buffering.

On the way it picks up token usage, appends RAG citations before ``[DONE]``,
records the bytes for the cache, and enforces the stream contract: a stream
that breaks ends with ``event: error`` and no ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from appliance.core.errors import error_body
from appliance.core.sse import DONE, SSEDecoder, SSEEvent, encode_data, encode_error, encode_event

__all__ = ["StreamOutcome", "relay_stream"]

# ": queued position=N eta_s=X" comments the balancer sends while a streaming request waits for a
# worker: passed on to the client (SDKs ignore comments; the chat UI shows "waiting: N ahead").
_QUEUED = b": queued "


@dataclass(slots=True)
class StreamOutcome:
    finished: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0
    recorded: bytearray | None = None
    first: dict[str, Any] = field(default_factory=dict)


def _citation_chunk(first: dict[str, Any], citations: list[dict[str, Any]]) -> bytes:
    return encode_data({
        "id": first.get("id", ""), "object": first.get("object", "chat.completion.chunk"),
        "created": first.get("created", 0), "model": first.get("model", ""), "choices": [],
        "citations": citations,
    })


class _EventFilter:
    """Turns one upstream event into the bytes the client gets (or nothing)."""

    def __init__(self, outcome: StreamOutcome, hide_usage: bool) -> None:
        self._outcome = outcome
        self._hide_usage = hide_usage

    def __call__(self, event: SSEEvent) -> bytes | None:
        if event.is_error:
            return encode_event(event.data, event="error")
        if event.is_done:
            return DONE
        outcome = self._outcome
        outcome.chunks += 1
        if not outcome.first or '"usage"' in event.data:
            obj = _loads(event.data)
            if obj is None:
                return encode_event(event.data)
            if not outcome.first:
                outcome.first = obj
            usage = obj.get("usage")
            if isinstance(usage, dict):
                outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
                if self._hide_usage:
                    if not obj.get("choices"):
                        return None
                    del obj["usage"]
                    return encode_data(obj)
        return encode_event(event.data)


def _queue_notes(raw: bytes) -> bytes:
    if _QUEUED not in raw:
        return b""
    return b"".join(line + b"\n\n" for line in raw.split(b"\n") if line.startswith(_QUEUED))


def _loads(data: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


async def relay_stream(
    resp: aiohttp.ClientResponse, outcome: StreamOutcome, *, hide_usage: bool,
    citations: list[dict[str, Any]] | None, on_end: Callable[[StreamOutcome], None],
) -> AsyncIterator[bytes]:
    """Yield client bytes; ``on_end`` runs exactly once however the stream ends (even a client hang-up)."""
    decoder = SSEDecoder()
    to_client = _EventFilter(outcome, hide_usage)
    recorded = outcome.recorded
    ended = False
    try:
        async for raw in resp.content.iter_any():
            if not outcome.chunks and (notes := _queue_notes(raw)):  # the balancer's, before any event
                yield notes
            for event in decoder.feed(raw):
                out = to_client(event)
                if out is None:
                    continue
                if event.is_done:
                    if citations is not None:
                        out = _citation_chunk(outcome.first, citations) + out
                    outcome.finished = True
                if event.is_error:
                    ended = True
                if recorded is not None:
                    recorded += out
                yield out
                if ended or outcome.finished:
                    return
        yield encode_error(error_body("The model stream ended unexpectedly.", "server_error",
                                      code="stream_interrupted"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        yield encode_error(error_body(f"The model stream was interrupted ({type(exc).__name__}).",
                                      "server_error", code="stream_interrupted"))
    finally:
        resp.release()
        if outcome.completion_tokens == 0 and outcome.chunks:
            outcome.completion_tokens = max(0, outcome.chunks - 1)
        on_end(outcome)
