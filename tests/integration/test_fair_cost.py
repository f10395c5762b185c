"""A request costs the slots it occupies (prompts x n), against real workers on the real model.

One stack (``tests.support.stack``: Redis, two workers of 4 slots publishing ``max_prompts`` 4, the balancer
with one slot of interactive headroom, the gateway). One key floods with the largest request it may send
(4 prompts x ``n`` 4 = 16 sequences, ``ignore_eos``); another key's chat still answers 200 with a time to first
token under 3x its idle one, measured in the same test; the balancer's queue view shows the flooding key
charged 16 sequences for every request; one more prompt is refused at the gateway with the worker's own 400.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.bench.harness import wait_until
from tests.support.stack import LoopbackAppliance, appliance_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

SLOTS = 4  # per worker: max_choices
PROMPTS = 4  # max_prompts
COST = SLOTS * PROMPTS  # the largest request: every prompt x every choice
FLOOD = 4  # such requests in flight at once
FLOOD_TOKENS = 48  # per sequence (ignore_eos): a flood request runs 4 rounds of 4 sequences on its worker


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("fair-cost"), model_path=model_path, workers=2, rag="none",
                         worker_settings={"slots": str(SLOTS), "max_prompts": str(PROMPTS), "n_ctx": "512"},
                         balancer_settings={"interactive_headroom": "1", "queue_timeout_s": "300"}) as stack:
        yield stack


def _key(stack: LoopbackAppliance, name: str, **limits: int) -> tuple[str, str]:
    """A new chat key (no limits unless given): (secret, id)."""
    with httpx.Client(base_url=stack.gateway, timeout=60,
                      headers={"Authorization": f"Bearer {stack.admin_key}"}) as admin:
        response = admin.post("/admin/keys", json={"name": name, "scopes": ["chat"],
                                                   "limits": {"rpm": 0, **limits}})
    assert response.status_code == 201, response.text
    return str(response.json()["key"]), str(response.json()["id"])


def _sdk(stack: LoopbackAppliance, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=secret, max_retries=0, timeout=300)


def _ttft(client: openai.OpenAI, model: str, turn: int) -> float:
    """Seconds from sending a streamed chat request to its first content token."""
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Question {turn}: name a colour."}], max_tokens=4,
        stream=True, temperature=0, extra_headers={"Cache-Control": "no-store"})
    first: float | None = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    assert first is not None, "the chat answered without a token"
    return first


def _queue_rows(stack: LoopbackAppliance) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{stack.balancer}/queue", headers=stack.internal_headers(), timeout=5)
    assert response.status_code == 200
    return {row["key_id"]: row for model in response.json()["models"] for row in model["keys"]}


def test_a_flood_of_the_largest_requests_is_charged_in_full_and_a_chat_still_starts_at_once(
    stack: LoopbackAppliance
) -> None:
    flood_secret, flood_id = _key(stack, "flood")
    chat_secret, _ = _key(stack, "chat")
    chat = _sdk(stack, chat_secret)
    _ttft(chat, stack.model, 0)  # warm the path (template, connections)
    idle = statistics.median(_ttft(chat, stack.model, turn) for turn in range(1, 4))

    flood = _sdk(stack, flood_secret)
    prompts = [f"Count slowly, list {index}:" for index in range(PROMPTS)]
    results: list[Any] = []

    def send() -> None:
        try:
            answer = flood.completions.create(model=stack.model, prompt=prompts, n=SLOTS, max_tokens=FLOOD_TOKENS,
                                              extra_body={"ignore_eos": True},
                                              extra_headers={"Cache-Control": "no-store"})
            results.append(answer)
        except openai.APIError as exc:
            results.append(exc)

    threads = [threading.Thread(target=send) for _ in range(FLOOD)]
    for thread in threads:
        thread.start()
    wait_until(lambda: _queue_rows(stack).get(flood_id, {}).get("running", 0) >= 1, 60,
               what="the flood running at the balancer")
    rows = _queue_rows(stack)
    workers = sorted(w["inflight"] for w in stack.balancer_workers())
    during = [_ttft(chat, stack.model, turn) for turn in range(4, 7)]
    for thread in threads:
        thread.join(timeout=400)
    print(f"chat TTFT idle median {idle * 1000:.0f} ms; during the flood {[round(t * 1000) for t in during]} ms; "
          f"flood row {rows.get(flood_id)}; worker slots in flight {workers}")

    flooding = rows[flood_id]
    # The fair queue charges every prompt x every choice: 16 slots per running request, 16 per request leased.
    assert flooding.get("slots") == COST * flooding["running"], flooding
    assert flooding["slots_charged"] >= COST and flooding["slots_charged"] % COST == 0, flooding
    assert flooding["tokens"] == 0 or flooding["tokens"] >= COST * FLOOD_TOKENS, flooding
    assert workers[-1] == SLOTS, "a request of 16 sequences holds a whole worker"
    assert max(during) < 3 * idle, (idle, during)  # every chat, not a typical one
    assert all(not isinstance(r, Exception) for r in results), results
    assert all(len(r.choices) == COST and r.usage.completion_tokens == COST * FLOOD_TOKENS for r in results)
    assert _queue_rows(stack).get(flood_id) is None or _queue_rows(stack)[flood_id]["slots"] == 0


def test_more_prompts_than_the_model_takes_are_refused_at_the_gateway(stack: LoopbackAppliance) -> None:
    secret, _ = _key(stack, "too-many")
    wait_until(lambda: _published_max_prompts(stack) == PROMPTS, 30, what="max_prompts on the balancer's /v1/models")
    time.sleep(2.5)  # the gateway's catalog reads the limits every model_info_ttl_s (2 s here)
    forwarded = sum(w["requests"] for w in stack.balancer_workers())
    with pytest.raises(openai.BadRequestError) as caught:
        _sdk(stack, secret).completions.create(model=stack.model, prompt=["a"] * (PROMPTS + 1), max_tokens=1)
    assert sum(w["requests"] for w in stack.balancer_workers()) == forwarded, "refused at the gateway"
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "too_many_prompts" and error["param"] == "prompt"
    assert error["message"] == f"prompt holds {PROMPTS + 1} prompts, above this model's limit of {PROMPTS} prompts " \
                               "per request."
    worker = httpx.post(f"{stack.workers[0]}/v1/completions", headers=stack.internal_headers(), timeout=30,
                        json={"model": stack.model, "prompt": ["a"] * (PROMPTS + 1), "max_tokens": 1})
    assert worker.status_code == 400 and worker.json()["error"]["message"] == error["message"]  # the same words


def _published_max_prompts(stack: LoopbackAppliance) -> int | None:
    response = httpx.get(f"{stack.balancer}/v1/models", headers=stack.internal_headers(), timeout=5)
    data = response.json()["data"]
    return data[0].get("max_prompts") if data else None


def test_a_key_concurrency_limit_counts_slots(stack: LoopbackAppliance) -> None:
    """A key that may hold 8 slots cannot send one request of 16 sequences (it would never fit); 2 prompts x n 4
    fit exactly."""
    secret, _ = _key(stack, "eight-slots", max_concurrent=8)
    client = _sdk(stack, secret)
    forwarded = sum(w["requests"] for w in stack.balancer_workers())
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=stack.model, prompt=["a"] * PROMPTS, n=SLOTS, max_tokens=1)
    error = caught.value.body
    assert isinstance(error, dict) and (error["code"], error["param"]) == ("too_many_slots", "n"), error
    assert sum(w["requests"] for w in stack.balancer_workers()) == forwarded
    answer = client.completions.create(model=stack.model, prompt=["a", "b"], n=SLOTS, max_tokens=1,
                                       extra_headers={"Cache-Control": "no-store"})
    assert len(answer.choices) == 2 * SLOTS
