"""Relay an upstream SSE stream to the client event by event, without buffering or re-encoding.

Each upstream event is forwarded as the bytes it came in; only an event that carries token usage is
decoded (to count it, and to drop it when the client did not ask for it), and the first one (for the
id the citations chunk repeats). Comments (the balancer's ``: queued position=N eta_s=X`` while the
request waits for a worker) pass through; SDKs ignore them, the chat UI shows them. RAG citations go
before ``[DONE]``; the bytes are recorded for the cache. A stream that breaks ends with ``event: error``
and no ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.core.errors import error_body
from appliance.core.hop_client import HopError
from appliance.core.sse import DONE, encode_data, encode_error, json_object

if TYPE_CHECKING:
    from gateway.service_client import ServiceStream

__all__ = ["SSESplitter", "StreamOutcome", "relay_stream"]

_ERROR_EVENT = b"event: error"
_USAGE = b'"usage"'


@dataclass(slots=True)
class StreamOutcome:
    finished: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0
    recorded: bytearray | None = None
    first: dict[str, Any] = field(default_factory=dict)


class SSESplitter:
    """Cuts an SSE byte stream into whole events, each kept as its own bytes (blank line included)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:  # CRLF or CR line ends: normalised, a CR that may start a CRLF kept for later
            keep = buffer.endswith(b"\r")
            buffer = (buffer[:-1] if keep else buffer).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            buffer += b"\r" if keep else b""
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        return [event + b"\n\n" for event in events if event.strip(b"\n")]


def _data(event: bytes) -> bytes:
    """The event's data (several ``data:`` lines joined by newlines)."""
    lines = [line[5:].removeprefix(b" ") for line in event.rstrip(b"\n").split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


def _citation_chunk(first: dict[str, Any], citations: list[dict[str, Any]]) -> bytes:
    return encode_data({
        "id": first.get("id", ""), "object": first.get("object", "chat.completion.chunk"),
        "created": first.get("created", 0), "model": first.get("model", ""), "choices": [],
        "citations": citations,
    })


class _EventFilter:
    """What the client gets for one upstream event: the same bytes, other bytes, or nothing."""

    def __init__(self, outcome: StreamOutcome, hide_usage: bool) -> None:
        self._outcome = outcome
        self._hide_usage = hide_usage

    def __call__(self, event: bytes) -> bytes | None:
        outcome = self._outcome
        outcome.chunks += 1
        if outcome.first and _USAGE not in event:
            return event
        obj = json_object(_data(event))
        if obj is None:
            return event
        if not outcome.first:
            outcome.first = obj
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            return event
        outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
        if not self._hide_usage:
            return event
        if not obj.get("choices"):
            return None
        del obj["usage"]
        return encode_data(obj)


async def relay_stream(
    resp: ServiceStream, outcome: StreamOutcome, *, hide_usage: bool,
    citations: list[dict[str, Any]] | None, on_end: Callable[[StreamOutcome], None],
) -> AsyncIterator[bytes]:
    """Yield client bytes; ``on_end`` runs exactly once however the stream ends (even a client hang-up)."""
    splitter = SSESplitter()
    to_client = _EventFilter(outcome, hide_usage)
    recorded = outcome.recorded
    try:
        while raw := await resp.readany():
            out = bytearray()
            for event in splitter.feed(raw):
                if event.startswith(b":"):  # a comment: passed on, never recorded
                    out += event
                    continue
                if event.startswith(DONE[:-2]):
                    done = DONE if citations is None else _citation_chunk(outcome.first, citations) + DONE
                    outcome.finished = True
                    if recorded is not None:
                        recorded += done
                    yield bytes(out + done)
                    return
                if event.startswith(_ERROR_EVENT) or b"\n" + _ERROR_EVENT in event:
                    yield bytes(out + event)
                    return
                forwarded = to_client(event)
                if forwarded is not None:
                    out += forwarded
                    if recorded is not None:
                        recorded += forwarded
            if out:
                yield bytes(out)
        yield encode_error(error_body("The model stream ended unexpectedly.", "server_error",
                                      code="stream_interrupted"))
    except (HopError, TimeoutError) as exc:
        yield encode_error(error_body(f"The model stream was interrupted ({type(exc).__name__}).",
                                      "server_error", code="stream_interrupted"))
    finally:
        resp.release()
        if outcome.completion_tokens == 0 and outcome.chunks:
            outcome.completion_tokens = max(0, outcome.chunks - 1)
        on_end(outcome)
