"""The worker service's request planning: structured-output plans are built off the event loop, once per schema."""

from __future__ import annotations

import asyncio
import threading

import pytest

from appliance.core.wire import ChatCompletionRequest
from inference import service as service_module
from inference.metrics import WorkerMetrics
from inference.service import WorkerService
from inference.settings import WorkerSettings
from inference.structured import StructuredPlan

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _body(schema: dict[str, object]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    })


def test_schema_plans_are_built_off_the_loop_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    real = service_module.plan_structured

    def recording(body: ChatCompletionRequest) -> StructuredPlan:
        built.append(threading.current_thread().name)
        return real(body)

    monkeypatch.setattr(service_module, "plan_structured", recording)
    service = WorkerService(WorkerSettings(model_alias="m"), WorkerMetrics("m"))

    async def plans() -> list[StructuredPlan]:
        loop_thread = threading.current_thread().name
        out = [await service._plan(_body(SCHEMA)), await service._plan(_body(SCHEMA)),
               await service._plan(_body({**SCHEMA, "required": []}))]
        assert loop_thread not in built
        return out

    first, again, other = asyncio.run(plans())
    assert first is again and first.grammar is not None and other.grammar != first.grammar
    assert len(built) == 2  # the repeated schema was not converted again


def test_plain_requests_need_no_plan_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    service = WorkerService(WorkerSettings(model_alias="m"), WorkerMetrics("m"))
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    monkeypatch.setattr(asyncio, "to_thread", None)  # would fail if called
    assert asyncio.run(service._plan(body)) == StructuredPlan()
