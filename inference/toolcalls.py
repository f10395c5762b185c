"""Tool calls found in free text (``tool_choice: "auto"``).

Models write calls in the format their chat template taught them. Recognised:

* Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call;
* Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
* Llama 3.x: ``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>``;
* a bare JSON object (or a list of them, or one in a Markdown code fence) naming a declared function.

A call counts only if it names a declared function and its arguments validate
against that function's parameters schema; an answer with any call that does
not is plain text. :class:`ToolCallStream` decides, while a stream is running,
which text can go out at once and which must wait until the answer can be
parsed whole.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from appliance.core.wire import Tool
from inference.jsonvalidate import schema_error
from inference.textstream import held_suffix_length

__all__ = ["HERMES_OPEN", "FoundCalls", "ToolCallStream", "find_tool_calls", "openai_tool_calls"]

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
TRIGGERS = (HERMES_OPEN, MISTRAL_OPEN, PYTHON_TAG)
_JSON_STARTS = ("{", "[", "```")
_decoder = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class FoundCalls:
    content: str | None  # text the model wrote before its calls
    calls: tuple[tuple[str, str], ...]  # (function name, arguments as compact JSON)


def _normalise(obj: Any, tools: dict[str, Tool]) -> tuple[str, str] | None:
    """One call object as (name, arguments JSON), or None if it is not a valid call of a declared tool."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI's own shape, sometimes echoed back
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or name not in tools:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    if schema_error(arguments, tools[name].function.parameters) is not None:
        return None
    return name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def _calls_of(value: Any, tools: dict[str, Tool]) -> list[tuple[str, str]] | None:
    items = value if isinstance(value, list) else [value]
    calls = [_normalise(item, tools) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _json_at(text: str, start: int) -> tuple[Any, int] | None:
    try:
        return _decoder.raw_decode(text, start)
    except json.JSONDecodeError:
        return None


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index].isspace():
        index += 1
    return index


def _hermes(text: str, start: int, tools: dict[str, Tool]) -> list[tuple[str, str]] | None:
    calls: list[tuple[str, str]] = []
    index = start
    while text.startswith(HERMES_OPEN, index):
        decoded = _json_at(text, _skip_space(text, index + len(HERMES_OPEN)))
        if decoded is None:
            return None
        found = _calls_of(decoded[0], tools)
        if found is None:
            return None
        calls += found
        index = _skip_space(text, decoded[1])
        if text.startswith(HERMES_CLOSE, index):
            index = _skip_space(text, index + len(HERMES_CLOSE))
    return calls or None


def _bare(text: str, start: int, tools: dict[str, Tool]) -> list[tuple[str, str]] | None:
    index = _skip_space(text, start)
    if text.startswith("```", index):  # a Markdown code fence, with or without a language tag
        newline = text.find("\n", index)
        index = _skip_space(text, newline) if newline >= 0 else len(text)
    decoded = _json_at(text, index)
    return _calls_of(decoded[0], tools) if decoded is not None else None


def find_tool_calls(text: str, tools: tuple[Tool, ...]) -> FoundCalls | None:
    """The calls in a finished answer, or None when it is not a (valid) tool-call answer."""
    declared = {tool.function.name: tool for tool in tools}
    if not declared:
        return None
    for marker in TRIGGERS:
        at = text.find(marker)
        if at < 0:
            continue
        calls = _hermes(text, at, declared) if marker == HERMES_OPEN else _bare(text, at + len(marker), declared)
        content = text[:at].strip() or None
        return FoundCalls(content, tuple(calls)) if calls else None
    calls = _bare(text, 0, declared) if text.lstrip().startswith(_JSON_STARTS) else None
    return FoundCalls(None, tuple(calls)) if calls else None


def openai_tool_calls(found: FoundCalls) -> list[dict[str, Any]]:
    return [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}
        for name, arguments in found.calls
    ]


@dataclass(slots=True)
class ToolCallStream:
    """Free text goes out as it comes; from the first sign of a tool call on, text is held.

    Signs: a trigger marker anywhere, or an answer whose first non-blank
    character opens JSON or a code fence. A suffix that could grow into a
    marker is held back too, so a marker split over tokens is still seen.
    """

    held: str = ""
    holding: bool = False
    started: bool = False  # non-blank text already went out

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held) that can go out now."""
        pending = self.held + text
        if self.holding:
            self.held = pending
            return ""
        cuts = [at for at in (pending.find(marker) for marker in TRIGGERS) if at >= 0]
        if cuts:
            self.holding, self.held = True, pending[min(cuts) :]
            return pending[: min(cuts)]
        if not self.started:
            stripped = pending.lstrip()
            if not stripped or any(s.startswith(stripped) or stripped.startswith(s) for s in _JSON_STARTS):
                self.holding = bool(stripped) and stripped.startswith(_JSON_STARTS)
                self.held = pending
                return ""
        hold = held_suffix_length(pending, TRIGGERS)
        out = pending[: len(pending) - hold]
        self.held = pending[len(pending) - hold :]
        self.started = self.started or bool(out.strip())
        return out
