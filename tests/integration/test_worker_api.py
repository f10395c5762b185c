"""A real worker process with the real default model, driven through the official openai client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import openai
import pytest

from tests.support.inference_worker import MODEL, Worker, check_token_logprobs, spawn_worker, wait_idle
from tests.support.tool_calls import WEATHER_TOOLS, weather_call

pytestmark = pytest.mark.integration

N_CTX = 256
CAP = 128


@pytest.fixture(scope="module")
def worker(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with spawn_worker(model_path, tmp_path_factory.mktemp("worker"), slots="8", queue_size="8",
                      n_ctx=str(N_CTX), max_tokens_cap=str(CAP)) as worker:
        yield worker


def test_health_and_models_follow_the_contract(worker: Worker) -> None:
    health = worker.health()
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["slots_total"] == 8 and health["queue_limit"] == 8 and health["n_ctx"] == N_CTX
    # Every layer offloaded where this llama.cpp build can use a GPU (the product's target), none elsewhere.
    offload = 999 if llama_cpp.llama_supports_gpu_offload() else 0
    assert len(health["model_sha256"]) == 64 and health["gpu_layers"] == offload
    assert [m.id for m in worker.client().models.list().data] == [MODEL]


def test_models_publish_the_limits_the_worker_enforces(worker: Worker) -> None:
    health = worker.health()
    assert (health["context_length"], health["max_tokens"], health["max_choices"]) == (N_CTX, CAP, 8)
    listed = worker.client().models.list().data[0]
    assert listed.model_extra is not None
    assert (listed.model_extra["context_length"], listed.model_extra["max_tokens"]) == (N_CTX, CAP)
    assert listed.model_extra["max_choices"] == 8  # the slots: n above it is refused (too_many_choices below)
    one = worker.client().models.retrieve(MODEL)
    assert one.id == MODEL and one.model_extra is not None and one.model_extra["max_tokens"] == CAP
    with pytest.raises(openai.NotFoundError) as caught:
        worker.client().models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"
    # The published max_tokens is the one enforced: at it, an answer; one above, the shared refusal.
    status, body = worker.post("/v1/chat/completions", {"model": MODEL, "max_tokens": CAP, "temperature": 0,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, body
    status, body = worker.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 3000,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and body["error"] == {
        "message": f"max_tokens is 3000, above this model's limit of {CAP} tokens per answer.",
        "type": "invalid_request_error", "param": "max_tokens", "code": "max_tokens_exceeded"}


def test_a_list_of_prompts_gets_one_choice_per_prompt(worker: Worker) -> None:
    client = worker.client()
    prompts = ["The sky is", "Two plus two is", "My favourite fruit is"]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True}) for p in prompts]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1, 2]  # (texts may differ from singles': batched arithmetic)
    assert all(c.text and c.finish_reason == "length" for c in batch.choices)
    assert batch.usage is not None and batch.usage.completion_tokens == 18
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles if s.usage is not None)
    stream = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    texts, finishes, usage = ["", "", ""], [None, None, None], None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        usage = chunk.usage or usage
    assert all(texts) and finishes == ["length"] * 3
    assert usage is not None and usage.completion_tokens == 18
    ids = client.completions.create(model=MODEL, prompt=[[2, 818, 7217, 563], [2, 818]], max_tokens=2,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage is not None and ids.usage.prompt_tokens == 6
    wait_idle(worker)


def test_internal_token_is_required_except_on_health_and_metrics(worker: Worker) -> None:
    status, raw = worker.get("/v1/models", token=None)
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    assert worker.get("/v1/models", token="wrong")[0] == 401
    assert worker.get("/metrics", token=None)[0] == 200


def test_chat_non_streaming_and_streaming_agree_at_temperature_zero(worker: Worker) -> None:
    client = worker.client()
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == again.choices[0].message.content
    assert whole.usage is not None and whole.usage.prompt_tokens > 5
    assert 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_ends_with_length_and_counts_exactly(worker: Worker) -> None:
    result = worker.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7,
                                                temperature=0, extra_body={"ignore_eos": True})
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 7


def test_stop_sequence_cuts_the_text_in_both_modes(worker: Worker) -> None:
    client = worker.client()
    prompt = "List of fruits: apple, banana, cherry,"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 6
    stop = base[len(base) // 2 : len(base) // 2 + 3]
    expected = base[: base.index(stop)]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == expected
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_eight_concurrent_streams_complete_with_correct_usage_and_share_decode_steps(worker: Worker) -> None:
    async def one(client: openai.AsyncOpenAI, index: int) -> tuple[str, int, int]:
        stream = await client.completions.create(
            model=MODEL, prompt=f"Count to {index + 3}:", max_tokens=16, temperature=0.8, seed=index, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None
        return text, usage.completion_tokens, usage.prompt_tokens

    async def main() -> list[tuple[str, int, int]]:
        client = worker.async_client()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(8)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert all(completion == 16 and prompt > 0 for _, completion, prompt in results)
    metrics = worker.get("/metrics")[1].decode()
    assert _batch_steps_above(metrics, 4) > 0, "no decode step ever held more than 4 sequences"
    wait_idle(worker)


def _batch_steps_above(metrics: str, size: int) -> float:
    values = {}
    for line in metrics.splitlines():
        if line.startswith("appliance_worker_batch_size_bucket"):
            le = line.split('le="')[1].split('"')[0]
            values[le] = float(line.rsplit(" ", 1)[1])
    return values["+Inf"] - values[f"{float(size)}"]


def test_client_disconnect_frees_the_slot_within_a_second(worker: Worker) -> None:
    stream = worker.client().completions.create(model=MODEL, prompt="Tell a long story:", max_tokens=CAP,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
    iterator = iter(stream)
    next(iterator)
    started = time.monotonic()
    next(iterator)
    step = time.monotonic() - started  # one decode step; long only when other processes hog the CPU
    assert worker.health()["slots_busy"] == 1
    stream.close()
    limit = max(1.0, 5 * step)
    assert wait_idle(worker, timeout=limit) < limit


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"model": MODEL, "prompt": "word " * (N_CTX + 10)}, 400, "context_length_exceeded"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": CAP + 1}, 400, "max_tokens_exceeded"),
        ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "invalid_value"),
        ({"model": MODEL, "prompt": "hi", "n": 9}, 400, "too_many_choices"),
        ({"model": MODEL, "prompt": ["hi"] * 9, "n": 2}, 400, None),
        ({"model": "no-such-model", "prompt": "hi"}, 404, "model_not_found"),
        ({"model": MODEL}, 400, "invalid_value"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "invalid_value"),
        ({"model": MODEL, "prompt": ["hi", "word " * (N_CTX + 10)]}, 400, "context_length_exceeded"),
        ({"model": MODEL, "prompt": ["hi"] * 17}, 400, "too_many_prompts"),  # max_prompts (16)
        ({"model": MODEL, "prompt": [[1, 10**7]]}, 400, None),
    ],
)
def test_bad_completion_requests_get_openai_errors(worker: Worker, payload: Any, status: int, code: str | None
                                                   ) -> None:
    got, body = worker.post("/v1/completions", payload)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code


def test_malformed_json_and_wrong_shapes_are_400(worker: Worker) -> None:
    status, raw = worker.call("POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in json.loads(raw)["error"]["message"]
    status, body = worker.post("/v1/chat/completions", {"model": MODEL, "messages": "hello"})
    assert status == 400 and body["error"]["param"].startswith("messages")
    status, body = worker.post("/v1/chat/completions", [1, 2])
    assert status == 400
    with pytest.raises(openai.BadRequestError, match="context length"):
        worker.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * (N_CTX + 10)}], max_tokens=4)
    assert worker.get("/nope")[0] == 404


CAT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "color": {"enum": ["black", "white", "orange"]},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
        "size": {"type": "object", "properties": {"kg": {"type": "integer"}}, "required": ["kg"]},
    },
    "required": ["name", "color", "toys", "size"],
}


def test_json_schema_output_validates(worker: Worker) -> None:
    import jsonschema

    result = worker.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a cat."}], max_tokens=CAP, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT_SCHEMA}},
    )
    assert result.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(result.choices[0].message.content or ""), CAT_SCHEMA)


def test_sdk_parse_returns_a_pydantic_object(worker: Worker) -> None:
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=12)
        population_millions: int

    parsed = worker.client().chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Name a big city."}], max_tokens=CAP, temperature=0,
        response_format=City,
    )
    assert isinstance(parsed.choices[0].message.parsed, City)


def test_tool_call_round_trip(worker: Worker) -> None:
    client = worker.client()
    tools = WEATHER_TOOLS
    messages = weather_call(client, MODEL, "Paris", 18)
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages[:1], tools=tools,
                                                   tool_choice="required", max_tokens=48, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert deltas and deltas[0].tool_calls and deltas[0].tool_calls[0].function
    called = messages[1]["tool_calls"][0]["function"]["arguments"]  # the call weather_call checked
    assert deltas[0].tool_calls[0].function.arguments == called  # same call, streamed
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=8,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content is not None


def test_unsupported_schema_keyword_is_named(worker: Worker) -> None:
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        worker.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def test_logprobs_under_a_grammar_are_real(worker: Worker) -> None:
    result = worker.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a cat."}], max_tokens=CAP, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT_SCHEMA}},
        logprobs=True, top_logprobs=3)
    choice = result.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    check_token_logprobs(choice.message.content or "", choice.logprobs.content, 3)
    # The grammar forced tokens the model did not rank first; they still carry the model's own logprob.
    assert any(item.logprob < item.top_logprobs[0].logprob - 1e-3 for item in choice.logprobs.content)


def test_completion_logprobs_legacy_shape(worker: Worker) -> None:
    result = worker.client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                                temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == result.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert logprob <= 0 and top[token] == pytest.approx(logprob) and logprob == pytest.approx(max(top.values()))


def test_top_logprobs_without_logprobs_is_400(worker: Worker) -> None:
    status, body = worker.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                        "top_logprobs": 2})
    assert status == 400 and body["error"]["param"] == "top_logprobs"


def test_auto_tool_choice_leaves_a_base_model_answer_as_text(worker: Worker) -> None:
    """The default model has no tool template and, told about tools zero-shot, answers in prose: that stays text."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"]}}}]
    result = worker.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}], tools=tools, max_tokens=24,
        temperature=0)
    choice = result.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert choice.message.content


# A chat template that renders `tools` the Hermes way and shows the format by example. The base model copies the
# format; it does not judge when a call is useful (it also "calls" for unrelated questions), so only the mechanics
# of `auto` are asserted here: a call it writes comes back as tool_calls, valid against the declared schema.
TOOL_TEMPLATE = """{{ bos_token }}{% if tools %}You can call functions. To call one, answer with <tool_call>{"name": \
<function name>, "arguments": <arguments object>}</tool_call>. Functions:
{% for t in tools %}{{ t.function | tojson }}
{% endfor %}
User: What is the weather in Rome?
Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>
User: What is the weather in Oslo?
Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>
{% endif %}{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}
{% elif m.role == 'assistant' %}Assistant: {{ m.content or '' }}
{% else %}{{ m.content }}
{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"""
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_worker(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with spawn_worker(model_path, tmp_path_factory.mktemp("tool-worker"), slots="2", n_ctx="1024",
                      chat_template=TOOL_TEMPLATE) as worker:
        yield worker


def test_auto_tool_choice_returns_the_call_the_model_writes(tool_worker: Worker) -> None:
    client = tool_worker.client()
    ask: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                           "tools": [WEATHER_TOOL], "max_tokens": 48, "temperature": 0}
    choice = client.chat.completions.create(**ask).choices[0]  # tool_choice left out: "auto"
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks).strip()  # the call never leaks as text
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas if d.function] == [
        ("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_without_tools_in_the_prompt_is_plain_text(tool_worker: Worker) -> None:
    result = tool_worker.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=16,
        temperature=0, tools=[WEATHER_TOOL], tool_choice="none")
    choice = result.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason in ("stop", "length")
    assert "<tool_call>" not in (choice.message.content or "")
