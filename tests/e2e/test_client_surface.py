"""What clients read besides the answer (issue 27 item 4), through the gateway with a real worker: the model's
limits on ``/v1/models``, OpenAI's ``x-ratelimit-*`` headers on chat and Responses answers, and probe requests
(one token, an empty input) that answer at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.stack import LoopbackAppliance, appliance_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

N_CTX, ANSWER_CAP = 1024, 256
PROBE_S = 10.0  # a one-token answer on a loaded 2-core host takes well under a second; a long one, minutes


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("surface"), model_path=model_path, workers=1, rag="none",
                         worker_settings={"slots": "2", "n_ctx": str(N_CTX),
                                          "max_tokens_cap": str(ANSWER_CAP)}) as stack:
        yield stack


def _key(stack: LoopbackAppliance, name: str, limits: dict[str, int]) -> str:
    with httpx.Client(base_url=stack.gateway, timeout=60,
                      headers={"Authorization": f"Bearer {stack.admin_key}"}) as admin:
        response = admin.post("/admin/keys", json={"name": name, "scopes": ["chat"], "limits": limits})
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


@pytest.fixture(scope="module")
def client(stack: LoopbackAppliance) -> Iterator[openai.OpenAI]:
    key = _key(stack, "surface", {"rpm": 100, "tpm": 50_000, "tpd": 1_000_000})
    with openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=key, max_retries=0, timeout=120,
                       default_headers={"Cache-Control": "no-store"}) as sdk:
        yield sdk


def test_models_list_and_retrieve_carry_context_length_and_largest_answer(stack: LoopbackAppliance,
                                                                         client: openai.OpenAI) -> None:
    listed = {m.id: m.model_extra or {} for m in client.models.list()}
    one = client.models.retrieve(stack.model).model_extra or {}
    for model in (listed[stack.model], one):
        assert (model["context_length"], model["max_tokens"]) == (N_CTX, ANSWER_CAP)


def _limits(headers: httpx.Headers) -> dict[str, str]:
    return {name: headers[name] for name in headers if name.startswith("x-ratelimit-")}


def test_chat_and_responses_answers_carry_openai_rate_limit_headers(stack: LoopbackAppliance,
                                                                    client: openai.OpenAI) -> None:
    chat = client.chat.completions.with_raw_response.create(
        model=stack.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    limits = _limits(chat.headers)
    assert limits["x-ratelimit-limit-requests"] == "100" and limits["x-ratelimit-limit-tokens"] == "50000"
    assert 0 <= int(limits["x-ratelimit-remaining-requests"]) < 100
    assert 0 < int(limits["x-ratelimit-remaining-tokens"]) <= 50_000
    assert limits["x-ratelimit-reset-requests"][-1] == "s" and limits["x-ratelimit-reset-tokens"][-1] == "s"
    assert chat.headers["ratelimit-limit"] == "100"  # the IETF draft's headers stay
    for raw in (client.responses.with_raw_response.create(model=stack.model, input="Hi", max_output_tokens=1),
                client.responses.with_raw_response.create(model=stack.model, input="Hi", max_output_tokens=1,
                                                          stream=True)):
        seen = _limits(raw.headers)
        assert seen.keys() == limits.keys(), seen
        assert int(seen["x-ratelimit-remaining-requests"]) < int(limits["x-ratelimit-remaining-requests"])
        raw.parse()  # read the body (the stream) to its end


PROBES: list[tuple[str, str, dict[str, Any]]] = [
    ("chat, max_tokens 1", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
    ("chat, max_completion_tokens 1, streamed", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 1, "stream": True}),
    ("chat, empty message", "/v1/chat/completions", {"messages": [{"role": "user", "content": ""}], "max_tokens": 1}),
    ("completions, empty prompt", "/v1/completions", {"prompt": "", "max_tokens": 1}),
    ("responses, empty input", "/v1/responses", {"input": "", "max_output_tokens": 1}),
    ("responses, empty item list", "/v1/responses", {"input": [], "max_output_tokens": 1}),
    ("responses, max_output_tokens 1, streamed", "/v1/responses",
     {"input": "Hi", "max_output_tokens": 1, "stream": True}),
]


@pytest.mark.parametrize(("path", "body"), [(p, b) for _, p, b in PROBES], ids=[name for name, _, _ in PROBES])
def test_probe_requests_answer_at_once(stack: LoopbackAppliance, client: openai.OpenAI, path: str,
                                       body: dict[str, Any]) -> None:
    started = time.perf_counter()
    reply = httpx.post(f"{stack.gateway}{path}", json={"model": stack.model, **body}, timeout=120,
                       headers={"Authorization": client.auth_headers["Authorization"], "Cache-Control": "no-store"})
    elapsed = time.perf_counter() - started
    assert reply.status_code == 200, reply.text
    assert elapsed < PROBE_S, f"{elapsed:.1f} s"
    if body.get("stream"):
        assert reply.text.rstrip().endswith(("data: [DONE]", "}")), reply.text[-300:]
        return
    usage = reply.json()["usage"]
    assert usage.get("completion_tokens", usage.get("output_tokens")) <= 1, usage
