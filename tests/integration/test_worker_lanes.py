"""The batch lane on a real worker (deterministic mode): batch work pauses for interactive work and gives its slot
up to it, and resumes; its answer is the same bit for bit as without preemption, nothing lost or repeated. The
balancer forwards the priority class to the worker.

Two slots: a streamed batch completion holds one; a first interactive request takes the other (the batch
sequence is paused, ``batch_lane_busy = 0``), a second finds no free slot and takes the batch sequence's
(evicted: it resumes from its history once a slot is free).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from appliance.core.hop import KEY_ID_HEADER, PRIORITY_HEADER
from tests.support.balancer_app import balancer
from tests.support.inference_worker import MODEL, TOKEN, Worker, spawn_worker, wait_idle

pytestmark = pytest.mark.integration

PROMPT = "Write a long list of garden plants, one per line, with a word on each:\n1."
BATCH_TOKENS = 96


@pytest.fixture(scope="module")
def worker(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with spawn_worker(model_path, tmp_path_factory.mktemp("lanes-worker"), slots="2", n_ctx="1024",
                      queue_size="4", deterministic="true", batch_lane_busy="0",
                      batch_lane_grace_s="0.05") as worker:
        yield worker


def metric(worker: Worker, name: str, **labels: str) -> float:
    """The value of one sample of ``appliance_worker_<name>_total`` (0 when not yet exported)."""
    text = worker.get("/metrics")[1].decode()
    wanted = "".join(f'(?=[^}}]*{key}="{value}")' for key, value in labels.items())
    match = re.search(rf"^appliance_worker_{name}_total{{{wanted}[^}}]*}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _headers(key: str, priority: str) -> dict[str, str]:
    return {KEY_ID_HEADER: key, PRIORITY_HEADER: priority}


async def _batch_stream(client: openai.AsyncOpenAI, started: asyncio.Event) -> tuple[str, int]:
    """The batch completion, streamed; ``started`` is set at its first text."""
    stream = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=BATCH_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        extra_headers=_headers("key_lanebatch", "batch"))
    parts: list[str] = []
    generated = 0
    async for chunk in stream:
        if chunk.usage is not None:
            generated = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.text:
                parts.append(choice.text)
                started.set()
    return "".join(parts), generated


async def _interactive(client: openai.AsyncOpenAI, index: int, started: asyncio.Event | None = None) -> str:
    """One interactive chat, streamed; ``started`` is set at its first text."""
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Name {index + 2} colours of roses."}],
        max_tokens=24, temperature=0, stream=True, extra_headers=_headers(f"key_laneuser{index}", "interactive"))
    parts: list[str] = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
                if started is not None:
                    started.set()
    return "".join(parts)


async def _preempted_run(worker: Worker) -> tuple[tuple[str, int], list[str]]:
    async with worker.async_client() as client:
        batch_started, first_started = asyncio.Event(), asyncio.Event()
        batch = asyncio.create_task(_batch_stream(client, batch_started))
        await asyncio.wait_for(batch_started.wait(), 60)
        # The first takes the free slot and the batch sequence pauses while it runs; the second, sent once the
        # first generates, finds no free slot and takes the batch sequence's.
        first = asyncio.create_task(_interactive(client, 0, first_started))
        await asyncio.wait_for(first_started.wait(), 60)
        second = asyncio.create_task(_interactive(client, 1))
        answers = await asyncio.gather(first, second)
        return await asyncio.wait_for(batch, 120), list(answers)


def test_a_preempted_batch_answer_is_the_answer_without_preemption(worker: Worker) -> None:
    alone = worker.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=BATCH_TOKENS, temperature=0, extra_body={"ignore_eos": True},
        extra_headers=_headers("key_lanealone", "batch"))
    reference = alone.choices[0].text
    assert alone.usage is not None and alone.usage.completion_tokens == BATCH_TOKENS
    wait_idle(worker)
    before = {kind: metric(worker, "preemptions", kind=kind) for kind in ("paused", "evicted")}
    resumed = metric(worker, "resumptions")

    (text, generated), answers = asyncio.run(_preempted_run(worker))

    assert all(answers), answers
    assert metric(worker, "preemptions", kind="paused") > before["paused"], "the batch sequence was never paused"
    assert metric(worker, "preemptions", kind="evicted") > before["evicted"], "the batch slot was never taken"
    assert metric(worker, "resumptions") > resumed
    assert generated == BATCH_TOKENS  # no token lost or counted twice
    assert text == reference  # nor sent twice or changed: bit for bit the answer without preemption


def test_tokens_are_counted_per_priority_class(worker: Worker) -> None:
    before = metric(worker, "priority_tokens", priority="interactive", kind="generated")
    reply = worker.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
    assert reply.usage is not None
    after = metric(worker, "priority_tokens", priority="interactive", kind="generated")
    assert after - before == reply.usage.completion_tokens  # no header: interactive


def test_a_bad_priority_header_is_a_clear_400(worker: Worker) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        worker.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_headers={PRIORITY_HEADER: "urgent"})
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_priority" and error["param"] == PRIORITY_HEADER


def test_the_balancer_forwards_the_priority_class_to_the_worker(worker: Worker) -> None:
    async def through_balancer() -> int:
        async with balancer([worker.url]) as (url, _):
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                        default_headers={"X-Internal-Token": TOKEN})
            async with client:
                for _ in range(100):  # until its first probe found the worker healthy
                    try:
                        reply = await client.chat.completions.create(
                            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                            temperature=0, extra_headers=_headers("key_lanebalancer", "batch"))
                        break
                    except openai.APIStatusError as exc:
                        assert exc.status_code == 503
                        await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the balancer never routed to the worker")
            assert reply.usage is not None
            return reply.usage.completion_tokens

    before = metric(worker, "priority_tokens", priority="batch", kind="generated")
    generated = asyncio.run(through_balancer())
    assert metric(worker, "priority_tokens", priority="batch", kind="generated") - before == generated > 0
