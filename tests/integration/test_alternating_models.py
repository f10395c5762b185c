"""The alternating load test (issue 29): a memory budget for one resident model (one swap host), two keys
sending model A and model B requests interleaved, once with the swap policy ``fcfs`` (llama-swap's: swap
whenever the oldest request is for the other model) and once with ``grouped`` (the default), in one run.

Both phases: 0 aborted or cut requests, every answer from the model asked for (each chunk's ``model``, and the
swap host's own request count per loaded model). Grouped swaps at least 3 x less often than fcfs, and its
p95 wait (at the balancer, for a slot and any swap: ``X-Appliance-Queue-Wait``) is at most ``max_swap_wait_s``
+ one load (the longest load of the phase, as the balancer timed it).

``max_swap_wait_s`` is the operator's trade between swaps and waits: the test sets it to four rounds of this
machine's swap cost (a load, and the requests a drain waits for, measured first; at least 10 s), so grouping
has room to show on a slow machine too, and runs each phase for at least four grouped rounds.
``APPLIANCE_ALTERNATING_S`` sets each phase's shortest length (default 60 s: two minutes in all on a quiet
machine; the issue's "a few minutes" is ``APPLIANCE_ALTERNATING_S=150``).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import openai
import pytest
from redis.asyncio import Redis

from appliance.bench.harness import until
from appliance.core.hop import QUEUE_WAIT_HEADER
from balancer.app import POOL, SWAPPER
from tests.support.balancer_app import balancer
from tests.support.inference_worker import TOKEN, Worker
from tests.support.swap_hosts import metric_value, swap_host

pytestmark = [pytest.mark.integration, pytest.mark.slow]

A, B = "gemma-alt-a", "gemma-alt-b"
SLOTS = 4
CLIENTS_PER_KEY = 3  # closed loop: each sends its next request when its last one ended
MIN_SWAP_WAIT_S = 10.0
PHASE_S = float(os.environ.get("APPLIANCE_ALTERNATING_S", "60"))


@pytest.fixture(scope="module")
def host(model_path: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with swap_host(model_path, redis_url, tmp_path_factory.mktemp("alternating"), (A, B), slots=SLOTS,
                   threads="1") as worker:
        yield worker


@dataclass
class Phase:
    policy: str
    waits: list[float] = field(default_factory=list)  # seconds each request waited at the balancer
    ttfts: list[float] = field(default_factory=list)  # seconds to the first token, per request
    failures: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=lambda: {A: 0, B: 0})
    answered: dict[str, int] = field(default_factory=lambda: {A: 0, B: 0})
    swaps: float = 0.0
    load_s: float = 0.0  # the mean load, as the balancer saw it
    longest_load_s: float = 0.0  # one load: the longest of the phase

    def p95(self) -> float:
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else 0.0


async def one_request(api: openai.AsyncOpenAI, model: str, index: int, phase: Phase) -> None:
    started = time.monotonic()
    first: float | None = None
    finish = None
    try:
        raw = await api.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"Say one word about the number {index}."}],
            max_tokens=4, stream=True)
        waited = float(raw.headers.get(QUEUE_WAIT_HEADER, "0"))  # at the balancer, for a slot (and any swap)
        async for chunk in raw.parse():
            if chunk.model != model:
                phase.failures.append(f"{model} request answered by {chunk.model}")
            if first is None:
                first = time.monotonic() - started
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    except openai.APIError as exc:
        phase.failures.append(f"{model}: {type(exc).__name__}: {exc}")
        return
    if finish is None or first is None:
        phase.failures.append(f"{model}: the stream ended without a finish reason (cut)")
        return
    phase.waits.append(waited)
    phase.ttfts.append(first)
    phase.answered[model] += 1


async def client_loop(api: openai.AsyncOpenAI, model: str, until_t: float, phase: Phase) -> None:
    while time.monotonic() < until_t:
        phase.sent[model] += 1
        await one_request(api, model, phase.sent[model], phase)


def served_by_host(host: Worker) -> dict[str, float]:
    """Chat requests the swap host answered 200, per model it held when it answered them."""
    text = host.get("/metrics")[1].decode()
    counts = {A: 0.0, B: 0.0}
    for model, value in re.findall(r'^appliance_worker_requests_total\{[^}]*model="([^"]+)"[^}]*status="200"[^}]*\} '
                                   r"(\S+)$", text, re.MULTILINE):
        if model in counts:
            counts[model] += float(value)
    return counts


@dataclass(frozen=True)
class Timing:
    max_swap_wait_s: float
    phase_s: float


async def calibrate(host: Worker) -> Timing:
    """This machine's cost of one swap round: a load (two swaps, timed on the host) and a round of requests."""
    loads = []
    for model in (B, A):
        started = time.monotonic()
        status, _ = await asyncio.to_thread(host.post, "/admin/model", {"model": model})
        assert status == 200
        loads.append(time.monotonic() - started)
    api = host.async_client()
    started = time.monotonic()
    phase = Phase("calibration")
    await asyncio.gather(*(one_request(api, A, i, phase) for i in range(CLIENTS_PER_KEY)))
    await api.close()
    assert phase.failures == [], phase.failures
    request_s = time.monotonic() - started
    wait = max(MIN_SWAP_WAIT_S, round(4 * (max(loads) + request_s)))
    timing = Timing(wait, max(PHASE_S, 4 * (wait + max(loads))))
    sys.stderr.write(f"alternating: load {max(loads):.2f} s, a round of requests {request_s:.2f} s -> {timing}\n")
    return timing


async def run_phase(host: Worker, redis_url: str, policy: str, timing: Timing) -> Phase:
    phase = Phase(policy)
    client = Redis.from_url(redis_url, socket_timeout=5)
    before = await asyncio.to_thread(served_by_host, host)
    try:
        # No queue notices: a stream's 200 then comes with the worker's first byte, carrying the wait it had.
        async with balancer([host.url], redis_client=client, registry_poll_s=0.2, interactive_headroom=0,
                            queue_notice_after_s=3600,
                            swap_policy=policy, max_swap_wait_s=timing.max_swap_wait_s,
                            swap_queue_timeout_s=600) as (url, app):
            await until(lambda: {A, B} <= set(app[SWAPPER].catalogue), 30, "the balancer read the catalogue")
            await until(lambda: any(w.routable and w.model in (A, B) for w in app[POOL]), 120, "a model loaded")
            keys = {A: "key_alternating0a", B: "key_alternating0b"}
            apis = {model: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600,
                                              default_headers={"X-Internal-Token": TOKEN,
                                                               "X-Appliance-Key-Id": key})
                    for model, key in keys.items()}
            end = time.monotonic() + timing.phase_s
            # Interleaved: A, B, A, B... started a moment apart, then each client at its own pace.
            tasks = []
            for index in range(CLIENTS_PER_KEY):
                for model in (A, B):
                    tasks.append(asyncio.create_task(client_loop(apis[model], model, end, phase)))
                    await asyncio.sleep(0.05 * index)
            await asyncio.gather(*tasks)
            for api in apis.values():
                await api.close()
            async with aiohttp.ClientSession() as session:
                for old, new in ((A, B), (B, A)):
                    phase.swaps += await metric_value(session, url, "appliance_balancer_model_swaps_total",
                                                      **{"from": old, "to": new})
                loads = await metric_value(session, url, "appliance_balancer_model_load_seconds_count", model=A)
                loads += await metric_value(session, url, "appliance_balancer_model_load_seconds_count", model=B)
                total = await metric_value(session, url, "appliance_balancer_model_load_seconds_sum", model=A)
                total += await metric_value(session, url, "appliance_balancer_model_load_seconds_sum", model=B)
                phase.load_s = total / loads if loads else 0.0
            phase.longest_load_s = max((took for _, took in app[SWAPPER].recent_loads), default=0.0)
    finally:
        await client.aclose()
    after = await asyncio.to_thread(served_by_host, host)
    served = {model: after[model] - before[model] for model in (A, B)}
    assert served == phase.answered, (served, phase.answered)  # the host held the model asked for each time
    sys.stderr.write(f"alternating {policy}: {phase.sent} requests, {phase.swaps:.0f} swaps, "
                     f"p95 wait {phase.p95():.2f} s (max {max(phase.waits, default=0):.2f}), p95 time to first token "
                     f"{sorted(phase.ttfts)[int(0.95 * len(phase.ttfts))] if phase.ttfts else 0:.2f} s, "
                     f"load mean {phase.load_s:.2f} s longest {phase.longest_load_s:.2f} s, "
                     f"{len(phase.failures)} failed "
                     f"{phase.failures[:3]}\n")
    return phase


@pytest.mark.timeout(1800)
async def test_grouped_swaps_a_third_as_often_as_fcfs_and_no_request_is_cut(host: Worker, redis_url: str) -> None:
    timing = await calibrate(host)
    fcfs = await run_phase(host, redis_url, "fcfs", timing)
    grouped = await run_phase(host, redis_url, "grouped", timing)
    for phase in (fcfs, grouped):
        assert phase.failures == [], phase.failures[:5]
        assert phase.sent[A] > CLIENTS_PER_KEY and phase.sent[B] > CLIENTS_PER_KEY, phase.sent
    assert grouped.swaps >= 1
    assert fcfs.swaps / grouped.swaps >= 3, (fcfs.swaps, grouped.swaps)
    assert grouped.p95() <= timing.max_swap_wait_s + grouped.longest_load_s, (grouped.p95(), grouped.longest_load_s)
