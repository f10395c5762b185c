"""A real swap host (docs/CONTRACTS.md C2): the bundled GGUF under two catalogue aliases in a real Redis.

A conversation on A, a swap to B, a swap back to A: its next turn starts from the cells saved when A was
unloaded (prefilled tokens few, not the whole history). Then the cache outlives a graceful stop: a worker
started afresh on the same file continues the conversation from its saved prefix too.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from appliance.core.model_catalogue import CatalogueEntry, put_entry
from appliance.core.model_files import sha256_file
from appliance.core.registry import KEY_PREFIX
from tests.support.inference_worker import TOKEN, Worker, spawn_worker

pytestmark = pytest.mark.integration

A, B = "gemma-swap-a", "gemma-swap-b"
# Past the model's sliding window (512 tokens): a one-sequence state would resume only where it ended.
SYSTEM = "You are the hardware store's assistant. Answer in one short sentence. " * 45
SETTINGS = {"slots": "2", "n_ctx": "1024", "prefix_reuse": "true", "speculative": "false"}


def entry(alias: str, model_path: Path, digest: str) -> CatalogueEntry:
    return CatalogueEntry(alias=alias, path=str(model_path), sha256=digest, size_bytes=model_path.stat().st_size,
                          slots=2, n_ctx=1024, resident="on_demand", kv_bytes_per_token=18432)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("swap-host")


@pytest.fixture(scope="module")
def digest(model_path: Path) -> str:
    return sha256_file(model_path)


@pytest.fixture(scope="class")
def host(model_path: Path, redis_url: str, data_dir: Path, digest: str) -> Iterator[Worker]:
    async def catalogue() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            for alias in (A, B):
                await put_entry(client, TOKEN, entry(alias, model_path, digest))
        finally:
            await client.aclose()

    asyncio.run(catalogue())
    with spawn_worker(model_path, data_dir, swap_host="true", initial_model=A, redis_url=redis_url,
                      heartbeat_s="0.5", registry_ttl_s="3", withdraw_grace_s="0", **SETTINGS) as worker:
        yield worker


def metric(worker: Worker, name: str, model: str | None = None) -> float:
    text = worker.get("/metrics")[1].decode()
    labels = rf'\{{model="{re.escape(model)}"\}}' if model else ""
    match = re.search(rf"^appliance_worker_{name}{labels} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def turn(worker: Worker, model: str, messages: list[dict[str, str]]) -> tuple[str, int, int]:
    """(answer, prompt tokens, cached tokens) of one greedy turn; the answer joins ``messages``."""
    reply = worker.client().chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                                    max_tokens=12, temperature=0)
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    answer = reply.choices[0].message.content or ""
    messages.append({"role": "assistant", "content": answer})
    return answer, reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens or 0


def swap(worker: Worker, model: str) -> tuple[int, dict[str, object]]:
    return worker.post("/admin/model", {"model": model})


def registered_model(redis_url: str, url: str) -> str | None:
    raw = redis.Redis.from_url(redis_url, socket_timeout=2).get(KEY_PREFIX + url)
    return json.loads(raw)["model"] if raw else None


class TestSwapHost:
    """One swap host for these tests; it stops (saving its cache) when the class ends."""

    def test_a_conversation_comes_back_to_its_cells_after_swaps(self, host: Worker, redis_url: str) -> None:
        health = host.health()
        assert (health["model"], health["swap_host"], health["loading"]) == (A, True, False)
        conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a hammer for?"}]
        turn(host, A, conversation)
        conversation.append({"role": "user", "content": "And a saw?"})
        _, prompt_2, _ = turn(host, A, conversation)

        status, body = swap(host, B)
        assert status == 200, body
        assert body["model"] == B and float(body["load_s"]) > 0  # type: ignore[arg-type]
        # Same file, same sha256: A's cells are valid for B, so they came back under B too.
        assert int(body["restored_prefixes"]) >= 1 and int(body["restored_tokens"]) >= prompt_2  # type: ignore[call-overload]
        assert host.health()["model"] == B and registered_model(redis_url, host.url) == B
        with pytest.raises(openai.APIStatusError) as refused:  # A's requests now: retry elsewhere, not a 404
            host.client().chat.completions.create(model=A, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert refused.value.status_code == 503 and refused.value.response.headers["Retry-After"]
        other = [{"role": "user", "content": "Name three colours of paint, please, and nothing else at all."}]
        turn(host, B, other)

        status, body = swap(host, A)
        assert status == 200 and int(body["restored_prefixes"]) >= 1, body  # type: ignore[call-overload]
        prefilled = metric(host, "prompt_tokens_prefilled_total", A)
        conversation.append({"role": "user", "content": "And a drill?"})
        _, prompt_3, cached_3 = turn(host, A, conversation)
        # The history (system prompt, two turns and their answers) came from the saved cells: only the new
        # message and the re-rendered end of the last answer are prefilled.
        assert cached_3 >= prompt_2, (prompt_3, cached_3)
        assert metric(host, "prompt_tokens_prefilled_total", A) - prefilled == prompt_3 - cached_3 <= 40
        assert metric(host, "model_loads_total", A) == 2 and metric(host, "model_loads_total", B) == 1
        assert metric(host, "model_unloads_total", A) == 1 and metric(host, "model_unloads_total", B) == 1
        assert metric(host, "model_load_seconds_count") == 3
        assert metric(host, "prompt_cache_restored_prefixes_total", A) >= 1


    def test_a_swap_is_refused_while_a_stream_runs_and_for_an_unknown_alias(self, host: Worker) -> None:
        model = host.health()["model"]
        status, body = swap(host, "no-such-model")
        assert status == 404 and body["error"]["code"] == "model_not_found"  # type: ignore[index]
        stream = host.client().chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Count from one to fifty in words."}], max_tokens=200,
            temperature=0, stream=True)
        try:
            next(iter(stream))
            status, body = swap(host, B)
            assert status == 409 and body["error"]["code"] == "worker_busy"  # type: ignore[index]
        finally:
            stream.close()
        assert host.health()["model"] == model


    def test_a_swap_needs_the_internal_token(self, host: Worker) -> None:
        status, _ = host.call("POST", "/admin/model", json.dumps({"model": B}).encode(), token=None)
        assert status == 401


def test_the_cache_outlives_a_graceful_stop(model_path: Path, data_dir: Path, digest: str) -> None:
    """Runs after TestSwapHost's worker stopped: it saved A's (this file's) cache on its way out."""
    saved = list((data_dir / "kvcache" / digest).glob("*.kv"))
    assert saved, "the swap host saved nothing on stop"
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a hammer for?"}]
    with spawn_worker(model_path, data_dir, model_alias=A, **SETTINGS) as worker:
        assert metric(worker, "prompt_cache_restored_prefixes_total", A) >= 1
        _, prompt, cached = turn(worker, A, conversation)
    assert cached >= prompt - 2, (prompt, cached)  # the first request already finds the system prompt's cells
