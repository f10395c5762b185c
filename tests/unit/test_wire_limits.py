"""The one max_tokens rule and the published model limits (appliance.core.wire), and one-pass body parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.core.errors import APIError
from appliance.core.wire import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelLimits,
    RequestCost,
    check_max_tokens,
    check_prompts,
    model_limits,
    model_list,
    parse_json,
    prompt_count,
    strictest_limits,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_check_max_tokens_names_the_limit_and_the_field_asked() -> None:
    check_max_tokens(ChatCompletionRequest.model_validate({**CHAT, "max_tokens": 2048}), 2048)
    with pytest.raises(APIError) as caught:
        check_max_tokens(ChatCompletionRequest.model_validate({**CHAT, "max_tokens": 3000}), 2048)
    error = caught.value
    assert (error.status, error.code, error.param) == (400, "max_tokens_exceeded", "max_tokens")
    assert error.message == "max_tokens is 3000, above this model's limit of 2048 tokens per answer."
    with pytest.raises(APIError) as caught:
        check_max_tokens(ChatCompletionRequest.model_validate({**CHAT, "max_completion_tokens": 3000}), 2048)
    assert caught.value.param == "max_completion_tokens"
    check_max_tokens(CompletionRequest.model_validate({"model": "m", "prompt": "x"}), 1)  # no ask: no refusal


def test_model_list_publishes_limits_and_they_read_back() -> None:
    limits = ModelLimits(context_length=8192, max_tokens=2048, max_choices=4)
    older = ModelLimits(context_length=4096, max_tokens=512)  # a worker that does not publish max_choices
    document = model_list(["a", "b", "c"], limits={"a": limits, "c": older})
    first, second, third = document["data"]
    assert first["context_length"] == 8192 and first["max_tokens"] == 2048 and first["object"] == "model"
    assert first["max_choices"] == 4
    assert "max_tokens" not in second
    assert third["max_tokens"] == 512 and "max_choices" not in third  # not published as null: absent
    assert model_limits(document) == {"a": limits, "c": older}
    assert model_limits({"data": [{"id": "d", "context_length": 9, "max_tokens": 1}]})["d"].max_choices is None
    assert model_limits({"data": [{"id": "x", "max_tokens": "lots"}, "junk", {"id": 3}]}) == {}
    assert model_limits(None) == {} and model_limits({"data": 5}) == {}


def test_strictest_limits_take_the_smallest_per_model() -> None:
    small = ModelLimits(context_length=4096, max_tokens=2048, max_choices=8)
    large = ModelLimits(context_length=8192, max_tokens=1024, max_choices=4)
    older = ModelLimits(context_length=8192, max_tokens=4096)  # no max_choices: adds no limit on n
    other = ModelLimits(context_length=100, max_tokens=10)
    found = strictest_limits([("m", small), ("m", older), ("m", large), ("n", other), ("n", older)])
    assert found == {"m": ModelLimits(context_length=4096, max_tokens=1024, max_choices=4),
                     "n": ModelLimits(context_length=100, max_tokens=10)}
    assert strictest_limits([("m", older), ("m", small)])["m"].max_choices == 8
    capped = ModelLimits(context_length=8192, max_tokens=1024, max_prompts=4)
    assert strictest_limits([("m", small), ("m", capped), ("m", older)])["m"].max_prompts == 4
    assert strictest_limits([("m", older), ("m", small)])["m"].max_prompts is None
    assert model_limits(model_list(["m"], limits={"m": capped}))["m"].max_prompts == 4


_prompts = st.one_of(
    st.text(max_size=5).map(lambda text: (text, 1)),
    st.lists(st.integers(0, 50_000), min_size=1, max_size=6).map(lambda ids: (ids, 1)),
    st.lists(st.text(max_size=5), min_size=1, max_size=20).map(lambda texts: (texts, len(texts))),
    st.lists(st.lists(st.integers(0, 50_000), min_size=1, max_size=4), min_size=1, max_size=20)
    .map(lambda lists: (lists, len(lists))),
)


@given(prompt=_prompts, n=st.integers(1, 16))
def test_a_completions_request_costs_one_slot_per_prompt_and_choice(prompt: tuple[object, int], n: int) -> None:
    value, prompts = prompt
    request = parse_json(CompletionRequest, CompletionRequest(model="m", prompt=value, n=n).model_dump_json().encode())
    cost = RequestCost.of(request)
    assert (cost.prompts, cost.choices, cost.slots) == (prompts, n, prompts * n)
    assert prompt_count(request.prompt) == prompts


@given(n=st.integers(1, 16))
def test_a_chat_request_is_one_prompt_with_n_choices(n: int) -> None:
    cost = RequestCost.of(ChatCompletionRequest.model_validate({**CHAT, "n": n}))
    assert cost.slots == n and cost.prompts == 1


def test_check_prompts_refuses_past_the_published_cap() -> None:
    check_prompts(CompletionRequest(model="m", prompt=["a"] * 4), 4)
    check_prompts(CompletionRequest(model="m", prompt=list(range(100))), 1)  # one prompt of token ids
    check_prompts(ChatCompletionRequest.model_validate(CHAT), 1)  # chat holds one prompt
    with pytest.raises(APIError) as caught:
        check_prompts(CompletionRequest(model="m", prompt=[[1], [2], [3], [4], [5]]), 4)
    error = caught.value
    assert (error.status, error.code, error.param) == (400, "too_many_prompts", "prompt")
    assert error.message == "prompt holds 5 prompts, above this model's limit of 4 prompts per request."


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "The request body is not valid JSON."),
        (b"[1, 2]", "The request body must be a JSON object."),
        (b'"text"', "The request body must be a JSON object."),
        (b"", "The request body is not valid JSON."),
        (b'{"model": "m", "prompt": "\xff"}', "The request body is not valid JSON."),
        (b'{"model": "m", "prompt": "a\\ud800b"}', "The request body is not valid JSON."),  # lone surrogate
    ],
)
def test_parse_json_refuses_bad_bodies_with_a_400(raw: bytes, message: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_json(CompletionRequest, raw)
    assert caught.value.status == 400 and caught.value.message == message


def test_parse_json_names_the_wrong_field_and_reads_every_prompt_shape() -> None:
    with pytest.raises(APIError) as caught:
        parse_json(CompletionRequest, b'{"model": "m", "prompt": "x", "temperature": "hot"}')
    assert caught.value.param == "temperature" and caught.value.code == "invalid_value"
    for prompt in ("x", ["x", "y"], [1, 2], [[1, 2], [3]]):
        body = parse_json(CompletionRequest, CompletionRequest(model="m", prompt=prompt).model_dump_json().encode())
        assert body.prompt == prompt
    assert parse_json(ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user"}], "ignore_eos": true}'
                      ).ignore_eos
