"""The Response object and its output items, as the OpenAI Responses API writes them.

``Draft`` is what a response echoes of its request (fixed when the request is accepted); the output
items and the usage come from the chat answer (:mod:`gateway.responses.events`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.responses.request import FunctionChoice, OtherChoice, ResponsesRequest

__all__ = ["Draft", "IdFactory", "Status", "new_item_id", "response_usage"]

Status = Literal["in_progress", "completed", "incomplete", "failed"]
IdFactory = Callable[[str], str]  # prefix ("msg", "fc") -> a new item id


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def response_usage(chat_usage: Any) -> dict[str, Any]:
    """Chat usage (``prompt_tokens``, ``completion_tokens``, ``prompt_tokens_details.cached_tokens``) as the
    Responses API names it."""
    usage = chat_usage if isinstance(chat_usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}


def _tool_choice(request: ResponsesRequest) -> Any:
    choice = request.tool_choice
    if choice is None or isinstance(choice, OtherChoice):
        return "auto"
    if isinstance(choice, FunctionChoice):
        return {"type": "function", "name": choice.name}
    return choice


def _text(request: ResponsesRequest) -> dict[str, Any]:
    fmt = request.text.format if request.text is not None else None
    if fmt is None or fmt.type == "text":
        return {"format": {"type": "text"}}
    if fmt.type == "json_object":
        return {"format": {"type": "json_object"}}
    return {"format": {"type": "json_schema", "name": fmt.name or "response", "schema": fmt.schema_,
                       "strict": fmt.strict, "description": fmt.description}}


@dataclass(frozen=True, slots=True)
class Draft:
    """What a response echoes of its request."""

    id: str
    created_at: int
    model: str
    echo: dict[str, Any] = field(default_factory=dict)
    new_id: IdFactory = new_item_id

    @classmethod
    def of(cls, response_id: str, created_at: int, request: ResponsesRequest,
           new_id: IdFactory = new_item_id) -> Draft:
        tools = [tool.model_dump(mode="json", exclude_none=True) for tool in request.function_tools]
        echo = {
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": request.max_tool_calls,
            "metadata": dict(request.metadata or {}),
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": request.stored,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "text": _text(request),
            "tool_choice": _tool_choice(request),
            "tools": tools,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "truncation": request.truncation or "disabled",
            "user": request.user,
        }
        return cls(str(response_id), created_at, request.model, echo, new_id)

    def response(self, status: Status, output: list[dict[str, Any]], *, usage: dict[str, Any] | None = None,
                 incomplete: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The Response object in ``status`` with these output items."""
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "model": self.model, "output": output, "usage": usage, **self.echo,
        }
