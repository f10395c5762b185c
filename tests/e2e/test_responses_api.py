"""The Responses API (issue 27) through the gateway with the official ``openai`` SDK, real model and worker.

One stack for the module (Redis, one real worker with the real GGUF, balancer, gateway). Covers
``responses.create`` (a string and an item list), ``responses.stream`` (the event order), ``responses.parse``
with a pydantic model, a tool round trip over ``previous_response_id`` (call, ``function_call_output``,
answer), retrieve, ``input_items``, delete, another key's 404, what is ignored and named, ``cached_tokens``
on a chain of turns, and a stored response surviving a gateway restart and a backup/restore.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import BaseModel, Field

from appliance.backup.restore import restore_backup
from appliance.backup.service import create_backup
from appliance.runtime.settings import RuntimeSettings
from tests.support.stack import LoopbackAppliance, appliance_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}
# Long and fixed: most of each turn's prompt, so a chain's later turns reuse it (cached_tokens).
INSTRUCTIONS = "You are a terse assistant for a ship's crew. " + " ".join(
    f"Rule {n}: answer in at most five words, never use lists, and keep numbers as digits." for n in range(1, 13))


class City(BaseModel):
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("responses"), model_path=model_path, workers=1, rag="none",
                         worker_settings={"slots": "4", "n_ctx": "2048"}) as running:
        yield running


def _sdk(stack: LoopbackAppliance, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=key, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def client(stack: LoopbackAppliance) -> openai.OpenAI:
    return _sdk(stack, stack.create_key("responses-a"))


def test_create_with_a_string_and_with_an_item_list(client: openai.OpenAI, stack: LoopbackAppliance) -> None:
    plain = client.responses.create(model=stack.model, input="Say hello.", max_output_tokens=8)
    assert plain.id.startswith("resp_") and plain.status in ("completed", "incomplete") and plain.output_text
    assert plain.usage is not None and plain.usage.input_tokens > 0 and 0 < plain.usage.output_tokens <= 8
    assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
    items = client.responses.create(model=stack.model, max_output_tokens=8, input=[
        {"role": "developer", "content": "Answer in one word."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}])
    assert items.output[0].type == "message" and items.output_text
    listed = client.responses.input_items.list(items.id, order="asc")
    assert [(i.type, getattr(i, "role", None)) for i in listed.data] == [("message", "developer"), ("message", "user")]


def test_stream_sends_the_events_in_order(client: openai.OpenAI, stack: LoopbackAppliance) -> None:
    with client.responses.stream(model=stack.model, input="Count to five.", max_output_tokens=12) as stream:
        events = list(stream)
        final = stream.get_final_response() if events[-1].type == "response.completed" else events[-1].response
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    deltas = [k for k in kinds if k == "response.output_text.delta"]
    assert deltas and kinds[4:4 + len(deltas)] == deltas
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", kinds[-1]]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text and client.responses.retrieve(final.id).output_text == text
    if kinds[-1] == "response.incomplete":
        assert final.incomplete_details is not None and final.incomplete_details.reason == "max_output_tokens"


def test_parse_with_a_pydantic_model(client: openai.OpenAI, stack: LoopbackAppliance) -> None:
    parsed = client.responses.parse(model=stack.model, input="A city in France, as JSON.", text_format=City,
                                    max_output_tokens=64, temperature=0)
    assert isinstance(parsed.output_parsed, City), parsed.output_text


def test_a_tool_round_trip_over_previous_response_id(client: openai.OpenAI, stack: LoopbackAppliance) -> None:
    first = client.responses.create(model=stack.model, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice="required", max_output_tokens=64, temperature=0)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    assert set(json.loads(calls[0].arguments)) == {"city"}
    # The answer turn: the 270M model would call the tool again if it could ("none" lets it only answer).
    second = client.responses.create(model=stack.model, previous_response_id=first.id, tools=[WEATHER],
                                     tool_choice="none", max_output_tokens=24, input=[{"type": "function_call_output",
                                                                   "call_id": calls[0].call_id,
                                                                   "output": "Sunny, 21 C."}])
    assert second.previous_response_id == first.id and second.output_text
    # The earlier turn (the question and the call) came along: the prompt is the one the whole history sent
    # explicitly makes, token for token.
    output = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C."}
    explicit = client.responses.create(model=stack.model, tools=[WEATHER], tool_choice="none", max_output_tokens=1,
                                       store=False, input=[{"role": "user", "content": "What is the weather in Paris?"},
                                                           calls[0].model_dump(exclude_none=True), output])
    assert second.usage is not None and explicit.usage is not None
    assert second.usage.input_tokens == explicit.usage.input_tokens
    assert [i.type for i in client.responses.input_items.list(second.id).data] == ["function_call_output"]


def test_retrieve_input_items_delete_and_another_keys_404(client: openai.OpenAI, stack: LoopbackAppliance) -> None:
    made = client.responses.create(model=stack.model, input="Hi.", max_output_tokens=4, metadata={"ticket": "7"})
    again = client.responses.retrieve(made.id)
    assert again.id == made.id and again.output_text == made.output_text and again.metadata == {"ticket": "7"}
    other = _sdk(stack, stack.create_key("responses-b"))
    for attempt in (lambda: other.responses.retrieve(made.id), lambda: other.responses.delete(made.id),
                    lambda: other.responses.input_items.list(made.id),
                    lambda: other.responses.create(model=stack.model, input="x", previous_response_id=made.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert client.responses.retrieve(made.id).id == made.id  # another key's delete changed nothing
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.retrieve("resp_not-an-id")
    assert bad.value.code == "invalid_response_id"
    unstored = client.responses.create(model=stack.model, input="Hi.", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_what_the_appliance_cannot_do_is_ignored_and_named(client: openai.OpenAI, stack: LoopbackAppliance) -> None:
    raw = client.responses.with_raw_response.create(
        model=stack.model, input="Hi.", max_output_tokens=2, tools=[{"type": "web_search"}],
        reasoning={"effort": "low"}, include=["reasoning.encrypted_content"], store=False)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-appliance-ignored"] == "include,reasoning,tools.web_search"


def _turn(client: openai.OpenAI, stack: LoopbackAppliance, text: str, previous: str | None) -> Any:
    return client.responses.create(model=stack.model, instructions=INSTRUCTIONS, input=text, max_output_tokens=6,
                                   previous_response_id=previous, extra_headers={"Cache-Control": "no-store"})


def test_a_chain_of_turns_reuses_the_earlier_prompt(client: openai.OpenAI, stack: LoopbackAppliance) -> None:
    previous, shares = None, []
    for text in ("Where is the ship?", "And the captain?", "What time is it?"):
        reply = _turn(client, stack, text, previous)
        usage = reply.usage
        shares.append(usage.input_tokens_details.cached_tokens / usage.input_tokens)
        previous = reply.id
    print(f"cached share per turn: {[round(s, 3) for s in shares]}")
    assert all(share >= 0.8 for share in shares[1:]), shares


def test_a_stored_response_survives_a_gateway_restart_and_a_backup_restore(
        client: openai.OpenAI, stack: LoopbackAppliance) -> None:
    made = client.responses.create(model=stack.model, input="Remember me.", max_output_tokens=4)
    stack.restart("gateway", "/healthz")
    assert client.responses.retrieve(made.id).output_text == made.output_text

    data = stack.tmp / "data"
    shutil.copytree(stack.tmp / "redis" / "run", data / "run", dirs_exist_ok=True)  # create_backup logs in as admin
    port = int(stack.redis_url.rsplit("/", 1)[0].rsplit(":", 1)[1])
    settings = RuntimeSettings(data_dir=data, redis_port=port)
    archive = create_backup(settings, stack.tmp / "backups").archive
    client.responses.delete(made.id)
    stack.services["gateway"].stop(timeout=10)
    restored = restore_backup(settings, archive)
    assert "responses" in restored.restored
    stack.restart("gateway", "/healthz")
    assert client.responses.retrieve(made.id).output_text == made.output_text


def test_a_limit_is_refused_in_the_responses_terms(client: openai.OpenAI, stack: LoopbackAppliance) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=stack.model, input="x", max_output_tokens=10**6)
    assert refused.value.param == "max_output_tokens" and "max_output_tokens is 1000000" in refused.value.message
    with pytest.raises(openai.NotFoundError):  # a well-formed id nobody stored
        client.responses.create(model=stack.model, input="x", previous_response_id="resp_" + "0" * 48)
