"""tool_choice "auto": tool calls found in free text, in the formats models write them, and nothing else."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.core.wire import Tool
from inference.jsonvalidate import schema_error
from inference.toolcalls import ToolCallStream, find_tool_calls, openai_tool_calls

WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
)
TIME = Tool.model_validate({"type": "function", "function": {"name": "get_time"}})
TOOLS = (WEATHER, TIME)
PARIS = {"city": "Paris"}


def _calls(text: str) -> list[tuple[str, Any]] | None:
    found = find_tool_calls(text, TOOLS)
    return None if found is None else [(name, json.loads(args)) for name, args in found.calls]


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',  # cut before the closing tag
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3.x JSON
        '  {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',  # arguments as a JSON string
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        '{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}',
    ],
)
def test_each_known_format_gives_the_call(text: str) -> None:
    assert _calls(text) == [("get_weather", PARIS)]


def test_several_calls_and_leading_content() -> None:
    text = (
        'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    found = find_tool_calls(text, TOOLS)
    assert found is not None and found.content == "Let me check."
    assert [(n, json.loads(a)) for n, a in found.calls] == [("get_weather", PARIS), ("get_time", {})]
    calls = openai_tool_calls(found)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Paris is mild.",
        '<tool_call>{"name": "get_stock", "arguments": {"symbol": "X"}}</tool_call>',  # not declared
        '<tool_call>{"name": "get_weather", "arguments": {"town": "Paris"}}</tool_call>',  # city missing, extra key
        '<tool_call>{"name": "get_weather", "arguments": {"city": 7}}</tool_call>',  # wrong type
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "k"}}</tool_call>',  # not in enum
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>',  # broken JSON
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><tool_call>{"name": "x"}',
        'Sure: {"name": "get_weather", "arguments": {"city": "Paris"}}',  # JSON inside prose is not a call
        '{"city": "Paris"}',  # JSON that names no function
        "[1, 2, 3]",
    ],
)
def test_text_that_is_not_a_valid_call_stays_text(text: str) -> None:
    assert find_tool_calls(text, TOOLS) is None


def test_no_declared_tools_means_no_calls() -> None:
    assert find_tool_calls('{"name": "get_weather", "arguments": {"city": "Paris"}}', ()) is None


def test_schema_checker_subset() -> None:
    schema = {
        "type": "object",
        "required": ["a"],
        "properties": {
            "a": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
            "b": {"anyOf": [{"type": "string", "pattern": "^x"}, {"type": "null"}]},
            "c": {"$ref": "#/$defs/flag"},
        },
        "$defs": {"flag": {"type": "boolean"}},
    }
    assert schema_error({"a": [1], "b": "xy", "c": True}, schema) is None
    for bad in (
        {"a": []},
        {"a": [1, 2, 3]},
        {"a": [1.5]},
        {"a": [True]},
        {"a": [1], "b": "y"},
        {"a": [1], "c": "yes"},
        {},
    ):
        assert schema_error(bad, schema) is not None, bad


@pytest.mark.parametrize(
    ("schema", "bad", "good"),
    [
        ({"type": "integer", "minimum": 3}, 1, 3),
        ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, {"xa": "s"}, {"xa": 1}),
        ({"type": "array", "uniqueItems": True}, [1, 1], [1, 2]),
        ({"not": {"type": "string"}}, "s", 1),
        ({"type": "object", "propertyNames": {"maxLength": 2}}, {"abc": 1}, {"ab": 1}),
    ],
)
def test_schema_checker_is_the_whole_specification(schema: dict[str, object], bad: object, good: object) -> None:
    """jsonschema-rs: keywords the former hand-written subset ignored are enforced."""
    assert schema_error(bad, schema) is not None and schema_error(good, schema) is None


def test_an_invalid_schema_rejects_nothing() -> None:
    assert schema_error({"a": 1}, {"type": "no-such-type"}) is None


def _stream(pieces: list[str]) -> tuple[str, ToolCallStream]:
    watch = ToolCallStream()
    return "".join(watch.feed(piece) for piece in pieces), watch


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(alphabet='abc <>_\n{}[]"', max_size=30), cuts=st.lists(st.integers(0, 80), max_size=8))
def test_stream_never_sends_a_call_and_loses_no_text(prefix: str, cuts: list[int]) -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    text = prefix + call
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    sent, watch = _stream([text[a:b] for a, b in itertools.pairwise(bounds)])
    assert sent + watch.held == text  # nothing lost, nothing duplicated
    assert "<tool_call>" not in sent and watch.holding


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(
        st.sampled_from(["The", " weather", " is", " mild", ".", "\n", " <", "tool", " a>b"]), min_size=1, max_size=20
    )
)
def test_plain_text_streams_through(words: list[str]) -> None:
    text = "".join(words)
    sent, watch = _stream(words)
    assert sent + watch.held == text
    assert len(watch.held) < len("<tool_call>") or watch.holding


def test_an_answer_opening_with_json_is_held_whole() -> None:
    sent, watch = _stream([" ", '{"na', 'me": "get_weather"}'])
    assert sent == "" and watch.holding and watch.held == ' {"name": "get_weather"}'
    sent, watch = _stream(["Hi", " {", "}"])
    assert sent == "Hi {}" and not watch.holding
