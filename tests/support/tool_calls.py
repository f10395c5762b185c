"""The first turn of a tool-call round trip, as the worker and gateway tests both drive it."""

from __future__ import annotations

import json
from typing import Any

import openai

__all__ = ["WEATHER_TOOLS", "weather_call"]

WEATHER_TOOLS: list[Any] = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"]}}}]


def weather_call(client: openai.OpenAI, model: str, city: str, temperature_c: int) -> list[Any]:
    """Ask for the weather in ``city`` with ``tool_choice="required"``: the model must call ``get_weather`` with
    a city. The conversation with that call and the tool's answer appended, ready for the next turn."""
    messages: list[Any] = [{"role": "user", "content": f"What is the weather in {city}?"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=WEATHER_TOOLS,
                                           tool_choice="required", max_tokens=48, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    return [*messages, choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": temperature_c})}]
