"""A Responses request as the chat request the workers run, and the items a stored turn keeps.

A turn's input is first written as *stored items* (plain JSON: ``message`` with ``input_text`` /
``output_text`` parts, ``function_call``, ``function_call_output``), the form ``input_items`` lists and
``previous_response_id`` carries. The chat messages are always rendered from stored items, by one
function (:func:`chat_messages`): a chain of turns therefore sends the workers the same messages for the
same history, the prompt of turn N is a prefix of the prompt of turn N+1, and prefix reuse hits.

An assistant message followed by function calls is one chat assistant message (``content`` and
``tool_calls``), as the worker wrote it; a ``function_call_output`` is a ``tool`` message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.core.errors import bad_request
from gateway.responses.request import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    MessageItem,
    OtherChoice,
    OtherItem,
    OtherPart,
    RefusalPart,
    ResponsesRequest,
    TextPart,
)
from gateway.responses.shape import IdFactory, new_item_id

__all__ = ["Turn", "chat_messages", "chat_payload", "stored_items"]

StoredItem = dict[str, Any]
_DEFAULT_PARAMETERS = {"type": "object", "properties": {}}


def _parts_text(content: str | Sequence[TextPart | RefusalPart | OtherPart]) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [part.text if isinstance(part, TextPart) else part.refusal
            for part in content if not isinstance(part, OtherPart)]


def stored_items(items: Sequence[MessageItem | FunctionCallItem | FunctionCallOutputItem | OtherItem],
                 new_id: IdFactory = new_item_id) -> list[StoredItem]:
    """The request's input items as stored and listed (each with an id; what the appliance cannot read left out)."""
    stored: list[StoredItem] = []
    for item in items:
        if isinstance(item, MessageItem):
            kind = "output_text" if item.role == "assistant" else "input_text"
            parts: list[dict[str, Any]] = [
                {"type": kind, "text": text, **({"annotations": []} if kind == "output_text" else {})}
                for text in _parts_text(item.content)]
            stored.append({"id": new_id("msg"), "type": "message", "role": item.role, "status": "completed",
                           "content": parts})
        elif isinstance(item, FunctionCallItem):
            stored.append({"id": new_id("fc"), "type": "function_call", "status": "completed",
                           "call_id": item.call_id, "name": item.name, "arguments": item.arguments})
        elif isinstance(item, FunctionCallOutputItem):
            stored.append({"id": new_id("fco"), "type": "function_call_output", "status": "completed",
                           "call_id": item.call_id, "output": "\n".join(_parts_text(item.output))})
    return stored


def _message_text(item: StoredItem) -> str:
    return "\n".join(str(part.get("text", part.get("refusal", ""))) for part in item.get("content") or ())


def chat_messages(instructions: str | None, items: Sequence[StoredItem]) -> list[dict[str, Any]]:
    """The chat messages of stored items (one rendering for a fresh and a replayed turn)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    calls_may_join = False  # the last message is an assistant's that the next function calls belong to
    for item in items:
        kind = item.get("type")
        if kind == "message":
            messages.append({"role": item["role"], "content": _message_text(item)})
            calls_may_join = item["role"] == "assistant"
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if calls_may_join:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                calls_may_join = True
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
            calls_may_join = False
    return messages


def _tools(request: ResponsesRequest) -> dict[str, Any]:
    tools = request.function_tools
    if not tools:
        return {}
    fields: dict[str, Any] = {"tools": [
        {"type": "function", "function": {
            "name": tool.name, "parameters": tool.parameters or _DEFAULT_PARAMETERS,
            **({"description": tool.description} if tool.description is not None else {}),
            **({"strict": tool.strict} if tool.strict is not None else {})}}
        for tool in tools]}
    choice = request.tool_choice
    if isinstance(choice, FunctionChoice):
        if choice.name not in {tool.name for tool in tools}:
            raise bad_request(f"tool_choice names the function {choice.name!r}, which is not among the tools.",
                              param="tool_choice", code="invalid_value")
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None and not isinstance(choice, OtherChoice):
        fields["tool_choice"] = choice
    if request.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = request.parallel_tool_calls
    return fields


def _response_format(request: ResponsesRequest) -> dict[str, Any]:
    fmt = request.text.format if request.text is not None else None
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"response_format": {"type": "json_object"}}
    schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema_}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    if fmt.description is not None:
        schema["description"] = fmt.description
    return {"response_format": {"type": "json_schema", "json_schema": schema}}


@dataclass(frozen=True, slots=True)
class Turn:
    """One request's turn: its own input items (stored, listed) and the whole conversation it continues."""

    items: list[StoredItem]
    history: list[StoredItem]  # the earlier turns' items (previous_response_id), then ``items``
    chat: dict[str, Any]  # the chat request body


def chat_payload(request: ResponsesRequest, earlier: Sequence[StoredItem] = (),
                 new_id: IdFactory = new_item_id) -> Turn:
    """The chat request for ``request`` continuing the conversation ``earlier`` (stored items)."""
    items = stored_items(request.input_items, new_id)
    history = [*earlier, *items]
    chat: dict[str, Any] = {"model": request.model, "messages": chat_messages(request.instructions, history)}
    if not chat["messages"]:  # a probe: no instructions, empty input
        chat["messages"] = [{"role": "user", "content": ""}]
    if request.max_output_tokens is not None:
        chat["max_tokens"] = request.max_output_tokens
    if request.temperature is not None:
        chat["temperature"] = request.temperature
    if request.top_p is not None:
        chat["top_p"] = request.top_p
    if request.user is not None:
        chat["user"] = request.user
    chat.update(_tools(request))
    chat.update(_response_format(request))
    if request.stream:
        chat["stream"] = True
    return Turn(items, history, chat)
