"""The OpenAI Agents SDK (``openai-agents``) against the gateway, real worker behind it: an agent with one
function tool, through the SDK's default Responses model and through its Chat Completions model.

What a user of the SDK sees: the run calls the tool with arguments its schema accepts and finishes; the
conversation, continued from ``result.to_input_list()`` (the tool call and its result, sent back as
``function_call``/``function_call_output`` items or an assistant ``tool_calls`` message and a ``tool`` message),
gets the agent's typed answer. The 270M model is held to that path with SDK settings rather than luck: the first
run asks for a call (``tool_choice="required"``: the worker constrains the answer to a valid call) and ends on it
(``tool_use_behavior="stop_on_first_tool"``; left to choose, this model calls the tool again and again until
``max_turns``); the follow-up forbids calls (``tool_choice="none"``) and asks for an ``output_type`` (a strict
JSON schema the worker constrains to; in free text this model imitates the tool-call transcript until
``max_output_tokens``, which the Responses model rightly reports as ``incomplete``). Tracing is off: it would
post to api.openai.com.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from agents import (
    Agent,
    FunctionTool,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.models.interface import Model
from openai import AsyncOpenAI
from pydantic import BaseModel

from tests.support.stack import LoopbackAppliance

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


class WeatherReport(BaseModel):
    city: str
    sunny: bool


@pytest.fixture(scope="module")
def stack(clients_stack: LoopbackAppliance) -> LoopbackAppliance:
    set_tracing_disabled(True)
    return clients_stack


@pytest.fixture(scope="module")
def key(new_chat_key: Callable[[str], str]) -> str:
    return new_chat_key("agents-sdk")


def _weather_tool(calls: list[dict[str, Any]]) -> FunctionTool:
    @function_tool
    def get_weather(city: str) -> str:
        """Return today's weather for a city."""
        calls.append({"city": city})
        return f"It is sunny and 21 degrees in {city}."

    return get_weather


def _model(kind: str, stack: LoopbackAppliance, client: AsyncOpenAI) -> Model:
    if kind == "responses":
        return OpenAIResponsesModel(model=stack.model, openai_client=client)
    return OpenAIChatCompletionsModel(model=stack.model, openai_client=client)


async def _run(agent: Agent[Any], given: str | list[Any], streamed: bool) -> Any:
    config = RunConfig(tracing_disabled=True)
    if not streamed:
        return await Runner.run(agent, given, max_turns=3, run_config=config)
    run = Runner.run_streamed(agent, given, max_turns=3, run_config=config)
    events = [event.type async for event in run.stream_events()]
    assert "raw_response_event" in events  # the answer arrived as a stream of events, not in one piece
    return run


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("kind", ["responses", "chat_completions"])
async def test_agent_calls_its_function_tool_and_finishes(stack: LoopbackAppliance, key: str, kind: str,
                                                          streamed: bool) -> None:
    async with AsyncOpenAI(base_url=f"{stack.gateway}/v1", api_key=key, max_retries=0, timeout=120) as client:
        await _tool_then_answer(_model(kind, stack, client), streamed)


async def _tool_then_answer(model: Model, streamed: bool) -> None:
    calls: list[dict[str, Any]] = []
    agent = Agent(name="weather", model=model, tools=[_weather_tool(calls)],
                  instructions="You answer questions about the weather. Use the get_weather tool.",
                  tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=64))
    first = await _run(agent, "What is the weather in Paris today?", streamed)
    assert len(calls) == 1 and set(calls[0]) == {"city"} and calls[0]["city"].strip(), calls
    assert first.final_output == f"It is sunny and 21 degrees in {calls[0]['city']}."

    answer = agent.clone(tool_use_behavior="run_llm_again", output_type=WeatherReport,
                         model_settings=ModelSettings(tool_choice="none", temperature=0, max_tokens=64))
    history = first.to_input_list()
    assert [item.get("type") for item in history[-2:]] == ["function_call", "function_call_output"]
    second = await _run(answer, history, streamed)
    assert len(calls) == 1  # no further call
    assert isinstance(second.final_output, WeatherReport), second.final_output
    assert second.final_output.city.strip().lower() == calls[0]["city"].strip().lower()
