"""A chat answer as Responses output items and stream events (pure bookkeeping, no I/O).

:class:`ResponseEvents` is fed the chat chunks of one answer (``delta.content``, ``delta.tool_calls``,
``finish_reason``, the usage chunk) and writes the Responses event sequence: ``response.created``,
``response.in_progress``, then per output item ``response.output_item.added``, for a message
``response.content_part.added``, ``response.output_text.delta``... ``.done``, ``response.content_part.done``,
for a function call ``response.function_call_arguments.delta``... ``.done``, then
``response.output_item.done``; last ``response.completed``, ``response.incomplete`` (reason
``max_output_tokens``) or ``response.failed``. Every event carries its ``sequence_number`` (0, 1, 2...).

A whole (non-streamed) answer goes through the same machine as one chunk (:func:`whole_answer`), so a
streamed and a whole answer make the same Response object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from gateway.responses.shape import Draft, Status, response_usage

__all__ = ["ResponseEvents", "encode_json", "encode_sse", "whole_answer"]

Event = dict[str, Any]
_TERMINAL: dict[Status, str] = {"completed": "response.completed", "incomplete": "response.incomplete",
                                "failed": "response.failed"}
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def encode_json(value: Any) -> bytes:
    try:
        return msgspec.json.encode(value)
    except UnicodeEncodeError:  # a lone surrogate in model text: its JSON escape, as the chat relay writes it
        return json.dumps(value, separators=(",", ":")).encode()


def encode_sse(event: Event) -> bytes:
    """``event: <type>`` and one ``data:`` line, as OpenAI streams Responses events."""
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + encode_json(event) + b"\n\n"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass(slots=True)
class _Item:
    """An output item being written: a message (its text so far) or a function call (its arguments so far)."""

    index: int
    id: str
    kind: Literal["message", "function_call"]
    pieces: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""

    def snapshot(self, status: str) -> dict[str, Any]:
        if self.kind == "message":
            content = [_text_part("".join(self.pieces))] if status != "in_progress" else []
            return {"id": self.id, "type": "message", "status": status, "role": "assistant", "content": content}
        arguments = "".join(self.pieces) if status != "in_progress" else ""
        return {"id": self.id, "type": "function_call", "status": status, "call_id": self.call_id,
                "name": self.name, "arguments": arguments}


@dataclass(slots=True)
class ResponseEvents:
    """The Responses view of one chat answer, built chunk by chunk."""

    draft: Draft
    max_tool_calls: int | None = None
    sequence: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    final: dict[str, Any] | None = None
    _open: _Item | None = None
    _calls: dict[int, _Item | None] = field(default_factory=dict)  # chat tool-call index -> item (None: dropped)

    def _event(self, type_: str, **fields: Any) -> Event:
        event = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[Event]:
        snapshot = self.draft.response("in_progress", [])
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def chunk(self, chunk: dict[str, Any]) -> list[Event]:
        """The events one chat chunk makes (``choices[0].delta``, or ``message`` for a whole answer)."""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        events: list[Event] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or choice.get("message") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                events += self._text(content)
            calls = delta.get("tool_calls") if isinstance(delta, dict) else None
            for position, call in enumerate(calls if isinstance(calls, list) else ()):
                if isinstance(call, dict):
                    events += self._call(call, position)
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return events

    def finish(self, error: dict[str, Any] | None = None) -> list[Event]:
        """Close what is open and end with the terminal event; ``error``: the stream was cut (OpenAI error body)."""
        status: Status = "completed"
        incomplete = None
        if error is not None:
            status = "failed"
        elif self.finish_reason in _INCOMPLETE:
            status, incomplete = "incomplete", _INCOMPLETE[self.finish_reason]
        item_status = "completed" if status == "completed" else "incomplete"
        events = self._close(item_status)
        if not self.output and error is None:  # an empty answer is an empty message, streamed or not
            events += self._add_message()
            events += self._close(item_status)
        detail = error.get("error") if isinstance(error, dict) else None
        failure = None
        if error is not None:
            detail = detail if isinstance(detail, dict) else {}
            failure = {"code": str(detail.get("code") or "server_error"),
                       "message": str(detail.get("message") or "The model stream was interrupted.")}
        usage = response_usage(self.usage) if self.usage is not None or error is None else None
        self.final = self.draft.response(status, self.output, usage=usage, incomplete=incomplete, error=failure)
        events.append(self._event(_TERMINAL[status], response=self.final))
        return events

    # --- items -----------------------------------------------------------------------------------------------

    def _add_message(self) -> list[Event]:
        item = self._open = _Item(len(self.output), self.draft.new_id("msg"), "message")
        self.output.append(item.snapshot("in_progress"))
        return [self._event("response.output_item.added", output_index=item.index, item=item.snapshot("in_progress")),
                self._event("response.content_part.added", item_id=item.id, output_index=item.index,
                            content_index=0, part=_text_part(""))]

    def _text(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open.kind != "message":
            events += self._close("completed")
            events += self._add_message()
        item = self._open
        assert item is not None
        item.pieces.append(text)
        events.append(self._event("response.output_text.delta", item_id=item.id, output_index=item.index,
                                  content_index=0, delta=text, logprobs=[]))
        return events

    def _call(self, call: dict[str, Any], position: int) -> list[Event]:
        index = call.get("index", position)
        index = index if isinstance(index, int) else position
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        assert isinstance(function, dict)
        arguments = function.get("arguments")
        events: list[Event] = []
        if index not in self._calls:
            opened = sum(item is not None for item in self._calls.values())
            if self.max_tool_calls is not None and opened >= self.max_tool_calls:
                self._calls[index] = None  # past max_tool_calls: left out
                return events
            events += self._close("completed")
            opening = self._open = _Item(len(self.output), self.draft.new_id("fc"), "function_call",
                                         call_id=str(call.get("id") or self.draft.new_id("call")),
                                         name=str(function.get("name") or ""))
            self._calls[index] = opening
            self.output.append(opening.snapshot("in_progress"))
            events.append(self._event("response.output_item.added", output_index=opening.index,
                                      item=opening.snapshot("in_progress")))
        item = self._calls[index]
        if item is None or not isinstance(arguments, str) or not arguments:
            return events
        item.pieces.append(arguments)
        if item is self._open:
            events.append(self._event("response.function_call_arguments.delta", item_id=item.id,
                                      output_index=item.index, delta=arguments))
        return events

    def _close(self, status: str) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        done = self.output[item.index] = item.snapshot(status)
        if item.kind == "message":
            part = done["content"][0]
            return [
                self._event("response.output_text.done", item_id=item.id, output_index=item.index, content_index=0,
                            text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=item.id, output_index=item.index,
                            content_index=0, part=part),
                self._event("response.output_item.done", output_index=item.index, item=done),
            ]
        return [
            self._event("response.function_call_arguments.done", item_id=item.id, output_index=item.index,
                        name=item.name, arguments=done["arguments"]),
            self._event("response.output_item.done", output_index=item.index, item=done),
        ]


def whole_answer(events: ResponseEvents, document: dict[str, Any]) -> dict[str, Any]:
    """The Response object of a whole chat answer (the same machine as a stream, its events unused)."""
    events.chunk(document)
    events.finish()
    assert events.final is not None
    return events.final
