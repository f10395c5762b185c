"""What a finished or streaming generation looks like on the wire, per endpoint and kind of answer.

A reply is one choice (a request with ``n`` gets ``n`` of them, each with
its ``index``): it turns its sequence's text (and token logprobs, when
asked) into OpenAI bodies: :meth:`ChatReply.choice` for a non-streamed
answer, and an :class:`Emitter` for a stream (chunks at start, per decode
step, at the end; each chunk carries the choice's index).
Tool calls change the shape: a forced call (grammar-constrained) is sent
whole once it parses; with ``tool_choice: "auto"`` free text streams until
it looks like a call (inference.toolcalls), the rest is held and parsed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.core.wire import Usage
from inference.logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from inference.structured import StructuredPlan, parse_tool_call
from inference.toolcalls import ToolCallStream, find_tool_calls, openai_tool_calls

__all__ = ["ChatReply", "CompletionReply", "Emitter", "chat_response", "completion_body", "new_id"]

Chunk = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(*, id_: str, model: str, created: int, choices: list[dict[str, Any]], usage: Usage
                  ) -> dict[str, Any]:
    """A ``chat.completion`` object: every choice (``ChatReply.choice``) and the request's usage."""
    return {"id": id_, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage.model_dump()}


def chat_choice(
    *, index: int, content: str | None, finish_reason: str, tool_calls: list[dict[str, Any]] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}


def chat_chunk(
    *, id_: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None, index: int = 0,
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def completion_body(*, id_: str, model: str, created: int, choices: list[dict[str, Any]],
                    usage: Usage | None = None) -> dict[str, Any]:
    """A ``text_completion`` object: the whole answer (with usage) or one streamed chunk."""
    body: dict[str, Any] = {"id": id_, "object": "text_completion", "created": created, "model": model,
                            "choices": choices}
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


class Emitter(Protocol):
    def start(self) -> list[Chunk]: ...

    def piece(self, text: str, logprobs: list[TokenLogprob]) -> list[Chunk]: ...

    def end(self, finish_reason: str) -> list[Chunk]: ...


@dataclass(frozen=True, slots=True)
class ChatReply:
    """One choice of a chat answer (``index``: its place among the request's ``n`` choices)."""

    id_: str
    model: str
    created: int
    plan: StructuredPlan
    logprobs: bool
    index: int = 0

    def chunk(
        self, delta: dict[str, Any], finish_reason: str | None = None, logprobs: list[TokenLogprob] | None = None
    ) -> Chunk:
        shown = chat_logprobs(logprobs) if self.logprobs and logprobs is not None else None
        return chat_chunk(
            id_=self.id_,
            model=self.model,
            created=self.created,
            delta=delta,
            finish_reason=finish_reason,
            logprobs=shown,
            index=self.index,
        )

    def answer(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, tool_calls) of a finished answer."""
        if self.plan.tools:
            calls = parse_tool_call(text)
            return (None, calls) if calls else (text, None)
        if self.plan.auto_tools:
            found = find_tool_calls(text, self.plan.auto_tools)
            if found is not None:
                return found.content, openai_tool_calls(found)
        return text, None

    def choice(self, text: str, logprobs: list[TokenLogprob], finish_reason: str) -> dict[str, Any]:
        """This choice in a whole (non-streamed) answer."""
        content, calls = self.answer(text)
        return chat_choice(
            index=self.index,
            content=content,
            finish_reason="tool_calls" if calls else finish_reason,
            tool_calls=calls,
            logprobs=chat_logprobs(logprobs) if self.logprobs else None,
        )

    def emitter(self) -> Emitter:
        if self.plan.tools:
            return _ForcedCall(self)
        if self.plan.auto_tools:
            return _AutoTools(self)
        return _PlainChat(self)


@dataclass(slots=True)
class _PlainChat:
    reply: ChatReply

    def start(self) -> list[Chunk]:
        return [self.reply.chunk({"role": "assistant", "content": ""})]

    def piece(self, text: str, logprobs: list[TokenLogprob]) -> list[Chunk]:
        return [self.reply.chunk({"content": text} if text else {}, logprobs=logprobs)]

    def end(self, finish_reason: str) -> list[Chunk]:
        return [self.reply.chunk({}, finish_reason)]


def _call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"index": index, **call} for index, call in enumerate(calls)]


@dataclass(slots=True)
class _ForcedCall:
    """The grammar guarantees a call unless cut short: send it whole, once it parses."""

    reply: ChatReply
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def start(self) -> list[Chunk]:
        return []

    def piece(self, text: str, logprobs: list[TokenLogprob]) -> list[Chunk]:
        self.text.append(text)
        self.logprobs.extend(logprobs)
        return []

    def end(self, finish_reason: str) -> list[Chunk]:
        content, calls = self.reply.answer("".join(self.text))
        delta: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            delta["tool_calls"] = _call_deltas(calls)
        return [
            self.reply.chunk(delta, logprobs=self.logprobs),
            self.reply.chunk({}, "tool_calls" if calls else finish_reason),
        ]


@dataclass(slots=True)
class _AutoTools:
    """Free text streams; from a tool-call prefix on it is held until the answer can be parsed."""

    reply: ChatReply
    watch: ToolCallStream = field(default_factory=ToolCallStream)
    sent: list[str] = field(default_factory=list)
    held_logprobs: list[TokenLogprob] = field(default_factory=list)

    def start(self) -> list[Chunk]:
        return [self.reply.chunk({"role": "assistant", "content": ""})]

    def piece(self, text: str, logprobs: list[TokenLogprob]) -> list[Chunk]:
        self.held_logprobs.extend(logprobs)
        out = self.watch.feed(text)
        if not out:
            return []
        self.sent.append(out)
        logprobs, self.held_logprobs = self.held_logprobs, []
        return [self.reply.chunk({"content": out}, logprobs=logprobs)]

    def end(self, finish_reason: str) -> list[Chunk]:
        held = self.watch.held
        found = find_tool_calls("".join(self.sent) + held, self.reply.plan.auto_tools)
        if found is None:
            rest = [self.reply.chunk({"content": held}, logprobs=self.held_logprobs)] if held else []
            return [*rest, self.reply.chunk({}, finish_reason)]
        delta = {"tool_calls": _call_deltas(openai_tool_calls(found))}
        return [self.reply.chunk(delta, logprobs=self.held_logprobs), self.reply.chunk({}, "tool_calls")]


@dataclass(slots=True)
class CompletionReply:
    """One choice of a text completion (``index``: its place among the request's prompts)."""

    id_: str
    model: str
    created: int
    logprobs: bool
    index: int = 0
    offset: int = 0  # text_offset of the next token

    def choice(self, text: str, logprobs: list[TokenLogprob], finish_reason: str) -> dict[str, Any]:
        """This choice in a whole (non-streamed) answer."""
        shown = completion_logprobs(logprobs, 0) if self.logprobs else None
        return completion_choice(self.index, text, finish_reason, shown)

    def chunk(self, text: str, finish_reason: str | None = None, logprobs: list[TokenLogprob] | None = None) -> Chunk:
        shown = None
        if self.logprobs and logprobs is not None:
            shown = completion_logprobs(logprobs, self.offset)
            self.offset += sum(len(item.text) for item in logprobs)
        choices = [completion_choice(self.index, text, finish_reason, shown)]
        return completion_body(id_=self.id_, model=self.model, created=self.created, choices=choices)

    def start(self) -> list[Chunk]:
        return []

    def piece(self, text: str, logprobs: list[TokenLogprob]) -> list[Chunk]:
        return [self.chunk(text, logprobs=logprobs)]

    def end(self, finish_reason: str) -> list[Chunk]:
        return [self.chunk("", finish_reason)]
