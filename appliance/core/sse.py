"""Server-sent events as OpenAI streams them, with the error-event contract.

A stream that completes ends with ``data: [DONE]``. A stream that fails after
it began ends with ``event: error`` and an OpenAI error body and *no*
``[DONE]``, so a client never mistakes a cut stream for a finished one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DONE",
    "SSEDecoder",
    "SSEEvent",
    "encode_data",
    "encode_error",
    "encode_event",
    "json_object",
]

DONE = b"data: [DONE]\n\n"

# Text a client controls can hold lone UTF-16 surrogates (JSON spells them "\ud800"); they have no UTF-8
# form, so an event must encode without them rather than raise mid-stream.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode()


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"

    @property
    def is_done(self) -> bool:
        return self.event == "message" and self.data == "[DONE]"

    @property
    def is_error(self) -> bool:
        return self.event == "error"

    def json(self) -> Any:
        return json.loads(self.data)


def json_object(data: str | bytes) -> dict[str, Any] | None:
    """An event's data as the JSON object it should be, or None (not JSON, or not an object)."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def encode_event(data: str, event: str | None = None) -> bytes:
    """Encode one event; multi-line data becomes several ``data:`` lines."""
    lines = [] if event is None else [f"event: {event}"]
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return _utf8("\n".join(lines) + "\n\n")


def encode_data(payload: dict[str, Any]) -> bytes:
    """Encode a JSON chunk the way OpenAI does (one compact ``data:`` line).

    A lone surrogate in a string is written as its JSON escape, so the client decodes the same text.
    """
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        encoded = json.dumps(payload, separators=(",", ":")).encode()
    return b"data: " + encoded + b"\n\n"


def encode_error(error_body: dict[str, Any]) -> bytes:
    """The terminal event of a stream that failed after it began."""
    return encode_event(json.dumps(error_body, separators=(",", ":")), event="error")


class SSEDecoder:
    """Incremental SSE parser: feed bytes as they arrive, get whole events."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        events: list[SSEEvent] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                break
            raw, self._buffer = self._buffer[:newline], self._buffer[newline + 1 :]
            line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data and self._event is None:
                return None
            event = SSEEvent(data="\n".join(self._data), event=self._event or "message")
            self._data, self._event = [], None
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        return None
