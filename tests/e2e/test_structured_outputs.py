"""Structured outputs and tool calling through the gateway with the official SDK (issue 12), real model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.stack import LoopbackAppliance, appliance_stack
from tests.support.tool_calls import WEATHER_TOOLS, weather_call

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "gemma-3-270m"
TOPICS = ["a cat", "a river", "a city", "a song", "a mountain", "a teacher", "a bakery", "a ship", "a planet",
          "a garden"]
STYLES = ["Describe", "Invent", "Summarise", "Name", "Imagine"]
PROMPTS = [f"{style} {topic}." for style in STYLES for topic in TOPICS]  # 50 varied prompts


class Item(BaseModel):
    name: str = Field(max_length=12)
    rating: Literal[1, 2, 3, 4, 5]
    kind: Literal["thing", "place", "person"]


ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                       "vip": {"type": "boolean"}},
                     "required": ["name", "vip"]},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 2},
        "status": {"enum": ["new", "paid", "shipped"]},
    },
    "required": ["customer", "items", "status"],
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("structured"), model_path=model_path, workers=1,
                         worker_settings={"slots": "8"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: LoopbackAppliance) -> openai.OpenAI:
    key = stack.create_key("structured", ("chat",))
    return openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=key, max_retries=0, timeout=180)


def _all(fn: Any) -> list[Any]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fn, PROMPTS))


def test_parse_returns_a_pydantic_object_for_50_of_50_prompts(client: openai.OpenAI) -> None:
    def one(prompt: str) -> Any:
        reply = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                              response_format=Item, max_tokens=64, temperature=0.7)
        return reply.choices[0].message.parsed

    parsed = _all(one)
    assert sum(isinstance(p, Item) for p in parsed) == 50
    print(f"parse: {len(parsed)}/50 parsed; distinct names: {len({p.name for p in parsed})}")


def test_nested_json_schema_validates_50_of_50(client: openai.OpenAI) -> None:
    def one(prompt: str) -> dict[str, Any]:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"An order about {prompt}"}], max_tokens=80,
            temperature=0.7,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "order", "schema": ORDER_SCHEMA, "strict": True}})
        assert reply.choices[0].finish_reason == "stop"
        document: dict[str, Any] = json.loads(reply.choices[0].message.content or "")
        jsonschema.validate(document, ORDER_SCHEMA)
        return document

    documents = _all(one)
    assert len(documents) == 50
    print(f"json_schema: 50/50 valid; statuses seen: {sorted({d['status'] for d in documents})}")


def test_tool_call_round_trip_and_usage_chunk(client: openai.OpenAI) -> None:
    tools = WEATHER_TOOLS
    messages = weather_call(client, MODEL, "Lyon", 21)
    stream = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=16,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_logprobs_pass_through_the_gateway(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}],
                           "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**ask).choices[0]
    assert whole.logprobs is not None and whole.logprobs.content
    assert "".join(t.token for t in whole.logprobs.content) == whole.message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in whole.logprobs.content)
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in whole.logprobs.content]
    legacy = client.completions.create(model=MODEL, prompt="Red, green and", max_tokens=4, temperature=0, logprobs=2)
    assert legacy.choices[0].logprobs is not None and legacy.choices[0].logprobs.token_logprobs
