"""Structured outputs: which requests get a grammar, which schemas are refused, how tool calls parse."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.core.errors import APIError
from appliance.core.wire import ChatCompletionRequest
from inference.structured import parse_tool_call, plan_structured

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def test_plain_requests_have_no_grammar() -> None:
    plan = plan_structured(chat())
    assert plan.grammar is None and not plan.tools


def test_json_object_and_schema_get_grammars() -> None:
    assert "object" in (plan_structured(chat(response_format={"type": "json_object"})).grammar or "")
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"]}
    grammar = plan_structured(chat(response_format={"type": "json_schema",
                                                    "json_schema": {"name": "c", "schema": schema}})).grammar
    assert grammar is not None and '\\"red\\"' in grammar and "root ::=" in grammar


@pytest.mark.parametrize("keyword", ["not", "uniqueItems", "patternProperties", "if", "maximum"])
def test_unsupported_schema_keywords_are_named_in_a_400(keyword: str) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "array", keyword: True}}}
    with pytest.raises(APIError) as info:
        plan_structured(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    assert info.value.status == 400 and repr(keyword) in info.value.message


def test_tool_choice_required_and_named_constrain_the_answer_to_a_call() -> None:
    required = plan_structured(chat(tools=[WEATHER, TIME], tool_choice="required"))
    assert [t.function.name for t in required.tools] == ["get_weather", "get_time"] and required.grammar
    named = plan_structured(chat(tools=[WEATHER, TIME],
                                 tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert [t.function.name for t in named.tools] == ["get_time"]
    auto = plan_structured(chat(tools=[WEATHER]))
    assert auto.grammar is None and not auto.tools and auto.offered_tools
    assert not plan_structured(chat(tools=[WEATHER], tool_choice="none")).offered_tools


def test_bad_tool_choices_are_400() -> None:
    for fields in ({"tool_choice": "required"},
                   {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                   {"tools": [WEATHER], "tool_choice": "sometimes"}):
        with pytest.raises(APIError) as info:
            plan_structured(chat(**fields))
        assert info.value.status == 400


def test_parse_tool_call_builds_openai_tool_calls() -> None:
    [call] = parse_tool_call('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert parse_tool_call('{"name": "get_weather", "argu') == []


def test_auto_tool_choice_gets_a_lazy_grammar_for_one_valid_call() -> None:
    plan = plan_structured(chat(tools=[WEATHER, TIME]))
    assert plan.grammar is None and plan.auto_tools and plan.lazy_grammar
    assert plan.lazy_grammar.startswith('root ::= "<tool_call>"') and "get_weather" in plan.lazy_grammar
    assert plan_structured(chat(tools=[WEATHER], tool_choice="none")).lazy_grammar is None
    assert plan_structured(chat(tools=[WEATHER], response_format={"type": "json_object"})).lazy_grammar is None
