"""The balancer process in front of three real worker processes on the real model (``appliance_stack``).

Load spread, ``kill -9`` of a worker during 24 concurrent streams, ejection and
readmission, all through the official ``openai`` client. Workers run one thread each
(three workers on a small machine) and answer with a few tokens to keep this quick.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from appliance.bench.harness import until, wait_until
from tests.support.stack import LoopbackAppliance, appliance_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "real-worker-test-token-padded-to-32-characters"
SLOTS = 8


# Every slot to whoever asks: the kill tests need all 3 x SLOTS streams running at once (each worker full).
# The default headroom keeps one slot for another key, so one stream of this single caller would wait, and
# the victim could hold SLOTS - 1.
BALANCER = {"probe_interval_s": "0.5", "readmit_after_good_probes": "2", "first_byte_timeout_s": "60",
            "queue_timeout_s": "120", "interactive_headroom": "0"}


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    """Three real workers (one thread each) behind the balancer, no gateway."""
    with appliance_stack(tmp_path_factory.mktemp("balancer-real"), model_path=model_path, workers=3,
                         upstream="none", rag="none", token=TOKEN, worker_settings={"slots": str(SLOTS)},
                         balancer_settings=BALANCER) as running:
        yield running


def worker_view(stack: LoopbackAppliance, url: str) -> dict[str, Any]:
    return next(w for w in stack.balancer_workers() if w["url"] == url)


def retries_total(stack: LoopbackAppliance) -> float:
    with urllib.request.urlopen(f"{stack.balancer}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("appliance_balancer_retries_total "):
                return float(line.split()[1])
    return 0.0


def client(stack: LoopbackAppliance) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.balancer}/v1", api_key="unused", max_retries=0, timeout=180,
                              default_headers={"X-Internal-Token": TOKEN})


async def test_uniform_load_is_spread_evenly(stack: LoopbackAppliance) -> None:
    before = {w["url"]: w["requests"] for w in stack.balancer_workers()}
    gate = asyncio.Semaphore(3 * SLOTS)

    async with client(stack) as api:

        async def one(index: int) -> str:
            async with gate:
                done = await api.completions.create(model="gemma-3-270m", prompt=f"Item {index}:", max_tokens=4)
                return done.choices[0].text

        answers = await asyncio.gather(*(one(i) for i in range(6 * SLOTS)))
    assert len(answers) == 6 * SLOTS
    served = [w["requests"] - before[w["url"]] for w in stack.balancer_workers()]
    assert sum(served) == 6 * SLOTS
    assert max(served) / min(served) <= 1.3, served
    assert all(w["inflight"] == 0 for w in stack.balancer_workers())


class Streams:
    """24 concurrent streaming chats through the openai client, with what each one saw."""

    def __init__(self, count: int, max_tokens: int, *, ignore_eos: bool = False) -> None:
        self.max_tokens = max_tokens
        self.extra_body = {"ignore_eos": True} if ignore_eos else None
        self.started = [False] * count
        self.outcome = [""] * count
        self.ended_at = [0.0] * count

    async def one(self, api: openai.AsyncOpenAI, index: int) -> None:
        try:
            stream = await api.chat.completions.create(
                model="gemma-3-270m", messages=[{"role": "user", "content": f"Count to {index}."}],
                max_tokens=self.max_tokens, stream=True, extra_body=self.extra_body)
            async for _ in stream:
                self.started[index] = True
            self.outcome[index] = "done"
        except openai.APIError as exc:
            self.outcome[index] = f"error: {exc}"
        self.ended_at[index] = time.monotonic()

    def run(self, api: openai.AsyncOpenAI) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self.one(api, i)) for i in range(len(self.outcome))]


async def test_kill_9_mid_stream_ends_streams_with_error_event_and_readmits(stack: LoopbackAppliance) -> None:
    victim = stack.workers[0]
    # Every stream runs its 24 tokens: one that counted to 2 and stopped could leave the victim below
    # SLOTS in flight before 2 * SLOTS streams started, and the wait below would never see both at once.
    streams = Streams(3 * SLOTS, max_tokens=24, ignore_eos=True)
    async with client(stack) as api:
        tasks = streams.run(api)
        await until(lambda: worker_view(stack, victim)["inflight"] == SLOTS and sum(streams.started) >= 2 * SLOTS,
                       120, "streams never got going")
        stack.services["worker0"].signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # Passively, on the broken connections; waited for, not timed (a loaded machine delays everything).
        await until(lambda: worker_view(stack, victim)["state"] == "ejected", 30, "the killed worker ejected")
        await asyncio.gather(*tasks)

    cut = [i for i, o in enumerate(streams.outcome) if o != "done"]
    assert 1 <= len(cut) <= SLOTS, streams.outcome
    assert all(streams.started[i] for i in cut), "a request that had not started streaming was lost"
    # Ended by the broken connection, not by a timeout (first byte 60 s): half of it is a bound with margin.
    assert all(streams.ended_at[i] - killed_at < 60 / 2 for i in cut), "cut streams must end on the kill"

    # Readmission: restart it on the same port; probes bring it back without a balancer restart.
    stack.restart("worker0")
    wait_until(lambda: worker_view(stack, victim)["state"] == "healthy", 30)
    before = worker_view(stack, victim)["requests"]
    async with client(stack) as api:
        await asyncio.gather(*(api.completions.create(model="gemma-3-270m", prompt="Hi", max_tokens=2)
                               for _ in range(3 * SLOTS)))
    assert worker_view(stack, victim)["requests"] > before


async def test_kill_9_before_first_byte_retries_on_other_workers(stack: LoopbackAppliance) -> None:
    """A frozen worker holds 8 requests that never started; killing it must not lose any of them."""
    victim = stack.workers[0]
    retries_before = retries_total(stack)
    streams = Streams(3 * SLOTS, max_tokens=8)
    stack.services["worker0"].signal(signal.SIGSTOP)
    try:
        async with client(stack) as api:
            tasks = streams.run(api)
            await until(lambda: worker_view(stack, victim)["inflight"] == SLOTS, 30, "victim got no requests")
            stack.services["worker0"].signal(signal.SIGKILL)
            await asyncio.gather(*tasks)
    finally:
        stack.services["worker0"].signal(signal.SIGKILL)
    assert streams.outcome == ["done"] * (3 * SLOTS)
    assert retries_total(stack) - retries_before >= SLOTS
