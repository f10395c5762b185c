"""A Responses request as the chat request the workers run (gateway/responses/request.py, translate.py)."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from appliance.core.errors import APIError
from appliance.core.wire import ChatCompletionRequest, parse_request
from gateway.responses.events import ResponseEvents, whole_answer
from gateway.responses.listing import items_page
from gateway.responses.request import ResponsesRequest
from gateway.responses.shape import Draft
from gateway.responses.translate import chat_messages, chat_payload

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _request(**fields: Any) -> ResponsesRequest:
    return parse_request(ResponsesRequest, {"model": "m", **fields})


def test_every_honoured_field_reaches_the_chat_request() -> None:
    request = _request(
        instructions="Be brief.", input=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False, max_output_tokens=40,
        temperature=0.2, top_p=0.9, user="u1", stream=True,
        text={"format": {"type": "json_schema", "name": "answer", "strict": True,
                         "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}})
    chat = chat_payload(request).chat
    assert chat == {
        "model": "m",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
        "max_tokens": 40, "temperature": 0.2, "top_p": 0.9, "user": "u1", "stream": True,
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["parameters"],
                                                    "description": "Weather of a city.", "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}},
    }
    parse_request(ChatCompletionRequest, chat)  # what the chat path validates
    assert chat_payload(_request(input="x", text={"format": {"type": "json_object"}})).chat["response_format"] == {
        "type": "json_object"}


def test_a_tool_round_trip_is_the_chat_conversation_the_worker_wrote() -> None:
    request = _request(instructions="Use tools.", input=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "id": "fc_1", "status": "completed", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}], tools=[WEATHER])
    assert chat_payload(request).chat["messages"] == [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


def test_what_the_appliance_cannot_do_is_ignored_and_named() -> None:
    payload = {"model": "m", "input": [
        {"role": "developer", "content": "rules"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"},
                                                         {"type": "input_image", "image_url": "data:..."}]}],
        "tools": [WEATHER, {"type": "web_search", "external_web_access": False},
                  {"type": "namespace", "name": "multi_agent_v1", "tools": [WEATHER]}, {"type": "custom", "name": "x"}],
        "tool_choice": "auto", "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "abc", "client_metadata": {"x-codex-turn-metadata": "{" + "x" * 800 + "}"},
        "store": False, "background": False, "text": {"verbosity": "low"}}
    request = parse_request(ResponsesRequest, payload)
    assert request.ignored(payload) == [
        "client_metadata", "include", "input.content.input_image", "input.reasoning", "prompt_cache_key",
        "reasoning", "text.verbosity", "tools.custom", "tools.namespace", "tools.web_search"]
    chat = chat_payload(request).chat
    assert [tool["function"]["name"] for tool in chat["tools"]] == ["get_weather"]
    assert chat["messages"] == [{"role": "developer", "content": "rules"}, {"role": "user", "content": "hi"}]


@given(st.text(max_size=80))
@example("web_search\r\nSet-Cookie: a=b")
def test_ignored_names_are_safe_in_a_header_whatever_the_client_sends(kind: str) -> None:
    payload = {"model": "m", "tools": [{"type": kind}], kind or "x": {"a": 1}, "input": [{"type": kind}]}
    try:
        request = parse_request(ResponsesRequest, payload)
    except APIError as refused:  # "function" without a name, "message" without a role: a 400, never a 500
        assert refused.status == 400
        return
    for name in request.ignored(payload):
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", name), name


@pytest.mark.parametrize(("fields", "param"), [
    ({"input": [{"type": "function_call", "call_id": "c", "name": "bad name!", "arguments": "{}"}]}, "input"),
    ({"tools": [{"type": "function", "name": "ok"}], "tool_choice": {"type": "function", "name": "other"}},
     "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"input": 7}, "input"),
])
def test_a_malformed_value_of_an_honoured_field_is_a_400_naming_it(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as refused:
        chat_payload(_request(**fields))
    assert refused.value.status == 400 and (refused.value.param or "").startswith(param), refused.value


items = st.lists(st.one_of(
    st.builds(lambda role, text: {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]},
              st.sampled_from(["user", "assistant", "developer"]), st.text(max_size=8)),
    st.builds(lambda n: {"type": "function_call", "call_id": f"c{n}", "name": "f", "arguments": "{}"},
              st.integers(0, 9)),
    st.builds(lambda n: {"type": "function_call_output", "call_id": f"c{n}", "output": "o"}, st.integers(0, 9)),
), max_size=10)


@given(items, items)
@example([{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]}],
         [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}])  # joins the last message
def test_a_later_turn_renders_the_earlier_turns_messages_unchanged(earlier: list[Any], later: list[Any]) -> None:
    """The prefix reuse of a previous_response_id chain: turn N's messages are a prefix of turn N+1's, unless the
    later items open with a function call (it belongs to the earlier assistant message, as the worker wrote it)."""
    before = chat_messages("sys", earlier)
    after = chat_messages("sys", [*earlier, *later])
    joins = bool(later) and later[0]["type"] == "function_call" and bool(before) and before[-1]["role"] == "assistant"
    assert (after[:len(before)] == before) != joins or not before


@given(st.text(max_size=20), st.lists(st.tuples(st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.text(max_size=10)),
                                      max_size=3))
def test_an_answer_stored_as_output_items_is_the_chat_message_the_worker_wrote(text: str,
                                                                               calls: list[tuple[str, str]]) -> None:
    counter = itertools.count()
    draft = Draft.of("resp_" + "0" * 48, 1, _request(), new_id=lambda prefix: f"{prefix}_{next(counter)}")
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = [{"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": args}}
                                 for n, (name, args) in enumerate(calls)]
    final = whole_answer(ResponseEvents(draft), {"choices": [{"index": 0, "message": message}]})
    rendered = chat_messages(None, final["output"])
    expected = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        expected["tool_calls"] = message["tool_calls"]
    assert rendered == [expected]


def test_input_items_are_paged_as_openai_pages_lists() -> None:
    stored = [{"id": f"msg_{n}"} for n in range(5)]
    first = items_page(stored, {"limit": "2"})
    assert [i["id"] for i in first["data"]] == ["msg_4", "msg_3"] and first["has_more"]
    second = items_page(stored, {"limit": "2", "after": first["last_id"]})
    assert [i["id"] for i in second["data"]] == ["msg_2", "msg_1"] and second["has_more"]
    last = items_page(stored, {"order": "asc", "after": "msg_3"})
    assert [i["id"] for i in last["data"]] == ["msg_4"] and not last["has_more"] and last["first_id"] == "msg_4"
    for bad in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"order": "up"}, {"after": "msg_9"}):
        with pytest.raises(APIError):
            items_page(stored, bad)
