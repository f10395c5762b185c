"""Chat messages to a prompt: the model's own Jinja template (sandboxed) or a plain fallback.

Templates come from model files and operators' config, so they are rendered
in Jinja's ``ImmutableSandboxedEnvironment`` (no attribute tricks, no
mutation of the data passed in). A template that renders ``tools`` shows them
the model's own way; one that ignores them gets the tools described in a
system message instead, so the model always knows what it may call. Base models such as the default Gemma 3 270M
have no template; they get a plain transcript format with a stop sequence
that keeps the model from writing the user's next turn.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.core.errors import bad_request
from appliance.core.wire import ChatMessage, Tool, message_text
from inference.structured import tools_preamble

__all__ = ["ChatTemplate", "RenderedPrompt"]

_FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
FALLBACK_STOPS = ("\nUser:",)


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    text: str
    add_special: bool  # let the tokenizer add BOS
    parse_special: bool  # the text holds the template's control tokens
    stops: tuple[str, ...] = ()


def _raise(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime(fmt)


def _as_dict(message: ChatMessage) -> dict[str, Any]:
    item: dict[str, Any] = {"role": message.role, "content": message_text(message)}
    if message.name:
        item["name"] = message.name
    if message.tool_calls:
        item["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id:
        item["tool_call_id"] = message.tool_call_id
    return item


def _calls_text(message: ChatMessage) -> str:
    """Earlier calls, written the way the tools preamble asks the model to write them."""
    calls = [{"name": call.function.name, "arguments": _loads(call.function.arguments)}
             for call in message.tool_calls or []]
    return " ".join(f"<tool_call>{json.dumps(call, ensure_ascii=False)}</tool_call>" for call in calls)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _with_preamble(items: list[dict[str, Any]], tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    preamble = tools_preamble(tools)
    if items and items[0]["role"] in ("system", "developer"):
        first = {**items[0], "content": f"{items[0]['content']}\n\n{preamble}"}
        return [first, *items[1:]]
    return [{"role": "system", "content": preamble}, *items]


class ChatTemplate:
    """Renders messages for one model; ``source`` None means the fallback format."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = None
        self._renders_tools: bool | None = None  # learnt on first use
        if source is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(source)

    @property
    def is_fallback(self) -> bool:
        return self._template is None

    def render(self, messages: list[ChatMessage], tools: tuple[Tool, ...] = ()) -> RenderedPrompt:
        if self._template is None:
            return self._fallback(messages, tools)
        items = [_as_dict(m) for m in messages]
        if tools and not self.renders_tools(tools):
            items = _with_preamble(items, tools)
        extra: dict[str, Any] = {"tools": [tool.model_dump() for tool in tools]} if tools else {}
        try:
            text = self._render(items, **extra)
        except TemplateError as exc:
            raise bad_request(f"The model's chat template rejected these messages: {exc}", param="messages") from None
        starts_with_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return RenderedPrompt(text=text, add_special=not starts_with_bos, parse_special=True)

    def _render(self, items: list[dict[str, Any]], **extra: Any) -> str:
        if self._template is None:
            raise TemplateError("no template")
        return self._template.render(messages=items, add_generation_prompt=True, bos_token=self.bos_token,
                                     eos_token=self.eos_token, **extra)

    def renders_tools(self, tools: tuple[Tool, ...]) -> bool:
        """Whether the template shows ``tools`` to the model (renders differently with them)."""
        if self._renders_tools is None:
            probe = [{"role": "user", "content": "hello"}]
            try:
                with_tools = self._render(probe, tools=[tool.model_dump() for tool in tools])
                self._renders_tools = with_tools != self._render(probe)
            except TemplateError:
                return True  # let the real render report the template's complaint
        return self._renders_tools

    @staticmethod
    def _fallback(messages: list[ChatMessage], tools: tuple[Tool, ...] = ()) -> RenderedPrompt:
        parts: list[str] = [f"{tools_preamble(tools)}\n\n"] if tools else []
        for message in messages:
            role = _FALLBACK_ROLES[message.role]
            text = message_text(message).strip() or _calls_text(message)
            parts.append(f"{text}\n\n" if role == "System" else f"{role}: {text}\n")
        parts.append("Assistant:")
        # User text is plain text here: parse_special=False keeps "<eos>" typed by a user inert.
        return RenderedPrompt(text="".join(parts), add_special=True, parse_special=False, stops=FALLBACK_STOPS)
