"""Prompt-prefix reuse through a real worker's HTTP API: cached_tokens, key scopes, shared prefixes, counters."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from appliance.core.hop import KEY_ID_HEADER
from tests.support.inference_worker import MODEL, Worker, spawn_worker

pytestmark = pytest.mark.integration

SYSTEM = "You are the hardware store's assistant. Answer in one short sentence. " * 20


@pytest.fixture(scope="module")
def worker(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with spawn_worker(
        model_path, tmp_path_factory.mktemp("prefix-worker"), slots="4", n_ctx="1024", prefix_reuse="true"
    ) as worker:
        yield worker


def counters(worker: Worker) -> dict[str, float]:
    text = worker.get("/metrics")[1].decode()
    found = {}
    for name in ("prompt_tokens", "prompt_tokens_prefilled", "prompt_tokens_reused"):
        match = re.search(rf"^appliance_worker_{name}_total{{[^}}]*}} (\S+)$", text, re.MULTILINE)
        assert match, name
        found[name] = float(match.group(1))
    return found


def chat(client: openai.OpenAI, messages: list[dict[str, str]], key: str | None = None, max_tokens: int = 8
         ) -> tuple[str, int, int]:
    """(answer, prompt tokens, cached tokens) of one greedy chat request."""
    headers = {KEY_ID_HEADER: key} if key else None
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, extra_headers=headers
    )
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    return (
        reply.choices[0].message.content or "",
        reply.usage.prompt_tokens,
        reply.usage.prompt_tokens_details.cached_tokens or 0,
    )


def test_the_next_turn_reuses_the_history_and_says_so(worker: Worker) -> None:
    client = worker.client()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a hammer for?"}]
    answer, prompt_1, _ = chat(client, messages, key="key_a", max_tokens=40)
    before = counters(worker)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And a saw?"}]
    _, prompt_2, cached_2 = chat(client, messages, key="key_a")
    after = counters(worker)
    # The answer's cells stayed with the slot: only the new message (~10 tokens with its template) is prefilled.
    assert cached_2 > prompt_1 and prompt_2 - cached_2 <= 10 + 16
    assert after["prompt_tokens_reused"] - before["prompt_tokens_reused"] == cached_2
    assert after["prompt_tokens_prefilled"] - before["prompt_tokens_prefilled"] == prompt_2 - cached_2
    assert after["prompt_tokens"] - before["prompt_tokens"] == prompt_2
    # /health publishes the same two counters (the admin dashboard's prefix reuse rate is their ratio).
    health = json.loads(worker.get("/health")[1])
    assert (health["prompt_tokens"], health["prompt_tokens_reused"]) == (
        int(after["prompt_tokens"]), int(after["prompt_tokens_reused"]))


def test_a_malformed_key_id_is_refused(worker: Worker) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    with pytest.raises(openai.BadRequestError) as refused:
        chat(worker.client(), messages, key="key a/../b")
    assert refused.value.code == "invalid_key_id"


def test_another_key_does_not_reuse_unless_shared(worker: Worker) -> None:
    client = worker.client()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."}]
    chat(client, messages, key="key_b")
    assert chat(client, messages, key="key_b")[2] > 0
    assert chat(client, messages, key="key_c")[2] == 0
    assert chat(client, messages)[2] == 0  # no key id: the anonymous scope


def test_the_final_stream_chunk_reports_cached_tokens(worker: Worker) -> None:
    client = worker.client()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."}]
    chat(client, messages, key="key_d")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={KEY_ID_HEADER: "key_d"},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details is not None
    assert 0 < (usage[0].prompt_tokens_details.cached_tokens or 0) < usage[0].prompt_tokens
    completion = client.completions.create(model=MODEL, prompt="The hardware store sells", max_tokens=2, temperature=0)
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None


def test_prompts_arriving_together_prefill_their_shared_prefix_once(worker: Worker) -> None:
    system = "You are the bakery's assistant. Keep every answer short and friendly. " * 20

    async def together() -> list[int]:
        client = worker.async_client()
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=MODEL,
                    max_tokens=2,
                    temperature=0,
                    extra_headers={KEY_ID_HEADER: "key_k"},
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}],
                )
                for i in range(4)
            )
        )
        await client.close()
        return [reply.usage.prompt_tokens for reply in replies if reply.usage is not None]

    before = counters(worker)
    prompts = asyncio.run(together())
    prefilled = counters(worker)["prompt_tokens_prefilled"] - before["prompt_tokens_prefilled"]
    assert len(prompts) == 4
    assert prefilled <= 1.3 * max(prompts), (prefilled, prompts)
