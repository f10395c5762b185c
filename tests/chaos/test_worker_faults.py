"""Worker faults under streamed load, through the gateway: kill -9, clients hanging up, SIGSTOP.

One stack for the module: Redis, 3 real workers (real model, 8 slots, one thread each),
the balancer and the gateway. Each test leaves all three workers healthy for the next.
Figures go to ``artifacts/chaos/*.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.bench.harness import wait_until
from tests.support.figures import record_figures
from tests.support.stack import LoopbackAppliance, appliance_stack, metric_value
from tests.support.streams import Outcome, stream_chat

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

KEYS: dict[str, str] = {}
BALANCER = {"probe_interval_s": "0.5", "probe_timeout_s": "1", "eject_after_failed_probes": "2",
            "readmit_after_good_probes": "2", "first_byte_timeout_s": "8", "read_timeout_s": "8",
            "queue_timeout_s": "60"}


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("chaos-workers"), model_path=model_path, workers=3, rag="none",
                         balancer_settings=BALANCER, gateway_settings={"read_timeout_s": "60"}) as stack:
        yield stack


def client(stack: LoopbackAppliance) -> httpx.AsyncClient:
    if "chaos" not in KEYS:
        KEYS["chaos"] = stack.create_key("chaos", ("chat",))
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=stack.gateway, headers={"Authorization": f"Bearer {KEYS['chaos']}"},
                             timeout=httpx.Timeout(60, connect=5), limits=limits)


def view(stack: LoopbackAppliance, index: int) -> dict[str, object]:
    return next(w for w in stack.balancer_workers() if w["url"] == stack.workers[index])


def health(url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return dict(json.loads(response.read()))


def all_healthy(stack: LoopbackAppliance) -> bool:
    return all(w["state"] == "healthy" for w in stack.balancer_workers())


def inflight_total(stack: LoopbackAppliance) -> int:
    return sum(int(w["inflight"]) for w in stack.balancer_workers())


def generated_tokens(stack: LoopbackAppliance, indexes: range | list[int]) -> float:
    return sum(metric_value(stack.workers[i], "appliance_worker_generated_tokens_total") for i in indexes)


async def test_kill_9_one_of_three_workers_during_48_streams(stack: LoopbackAppliance) -> None:
    async with client(stack) as api:
        tasks = [asyncio.create_task(stream_chat(api, i, model=stack.model, max_tokens=48)) for i in range(48)]
        await asyncio.to_thread(wait_until, lambda: int(view(stack, 0)["inflight"]) >= 4, 120,
                                "victim busy", interval=0.05)
        await asyncio.sleep(0.5)  # let some of its streams send bytes
        stack.services["worker0"].signal(signal.SIGKILL)
        killed_at = time.monotonic()
        outcomes: list[Outcome] = await asyncio.wait_for(asyncio.gather(*tasks), 240)

    unstarted = [o for o in outcomes if o.first_data_at is None or o.first_data_at > killed_at]
    lost = [o for o in unstarted if not (o.status == 200 and o.done)]
    cut = [o for o in outcomes if not o.done]
    silent_cuts = [o for o in cut if not o.clean_cut]
    slowest_cut = max((o.ended_at - killed_at for o in cut), default=0.0)
    await asyncio.to_thread(wait_until, lambda: inflight_total(stack) == 0, 15, "balancer in-flight back to 0",
                            interval=0.1)

    def survivors_busy() -> list[float]:
        return [metric_value(stack.workers[i], "appliance_worker_slots_busy") for i in (1, 2)]

    with contextlib.suppress(AssertionError):  # the gauge follows the slots; the assertion below says if not
        await asyncio.to_thread(wait_until, lambda: survivors_busy() == [0.0, 0.0], 15, "survivor slots free",
                                interval=0.1)
    busy = survivors_busy()
    record_figures("chaos_kill9_worker", requests=len(outcomes), unstarted_at_kill=len(unstarted),
                   lost_requests=len(lost), cut_streams=len(cut), cut_without_error_event=len(silent_cuts),
                   slowest_cut_end_s=round(slowest_cut, 2), inflight_after=inflight_total(stack),
                   survivor_slots_busy=busy)
    assert not lost, [(o.index, o.status, o.exception) for o in lost]
    assert not silent_cuts, [(o.index, o.status, o.events[-3:], o.exception) for o in silent_cuts]
    assert len(cut) <= 8, "only streams that were on the killed worker may be cut"
    assert busy == [0.0, 0.0]
    stack.restart("worker0")
    await asyncio.to_thread(wait_until, lambda: all_healthy(stack), 60, "worker0 readmitted", interval=0.2)


MAX_TOKENS_DROPPED = 400


async def test_20_clients_hanging_up_stop_generation(stack: LoopbackAppliance) -> None:
    async with client(stack) as api:
        outcomes = await asyncio.wait_for(asyncio.gather(*(
            stream_chat(api, i, model=stack.model, max_tokens=MAX_TOKENS_DROPPED, drop_after_chunks=3)
            for i in range(20))), 120)
    dropped_at = time.monotonic()
    assert all(o.chunks >= 3 and not o.done for o in outcomes), [(o.status, o.exception) for o in outcomes]
    # No wall-clock threshold: wait until the workers' token counter stands still for a second (or give up
    # after 30 s), then count what was generated after the hang-ups against what the requests asked for.
    samples: list[tuple[float, float]] = [(0.0, generated_tokens(stack, range(3)))]
    changed_at = 0.0
    while samples[-1][0] < 30 and samples[-1][0] - changed_at < 1.0:
        await asyncio.sleep(0.1)
        samples.append((time.monotonic() - dropped_at, generated_tokens(stack, range(3))))
        if samples[-1][1] != samples[-2][1]:
            changed_at = samples[-1][0]
    final = samples[-1][1]
    stopped_after = next(t for t, tokens in samples if tokens == final)
    busy = sum(int(health(url)["slots_busy"]) for url in stack.workers)
    gauge = sum(metric_value(url, "appliance_worker_slots_busy") for url in stack.workers)
    record_figures("chaos_client_disconnects", clients=20, generation_stopped_after_s=round(stopped_after, 2),
                   tokens_after_drop=final - samples[0][1], slots_busy_after=busy, slots_busy_gauge_after=gauge)
    unasked = 20 * (MAX_TOKENS_DROPPED - 3)  # what generation would have gone on to produce without the hang-ups
    assert final - samples[0][1] <= unasked / 10, samples[:30]
    assert busy == 0
    assert gauge == 0, "the slots_busy gauge must not stay stale once the slots are free"


async def _load(
    api: httpx.AsyncClient, stack: LoopbackAppliance, until: asyncio.Event, outcomes: list[Outcome]
) -> None:
    index = 0
    while not until.is_set():
        index += 1
        outcomes.append(await stream_chat(api, index, model=stack.model, max_tokens=6))


STOP_S = 30  # the figure: long enough for ejection, a quiet period on probes, then readmission
FIRST_BYTE_TIMEOUT_S = float(BALANCER["first_byte_timeout_s"])
PROBE_PERIOD_S = float(BALANCER["probe_interval_s"]) + float(BALANCER["probe_timeout_s"])


async def test_sigstop_worker_for_30s_is_ejected_skipped_and_readmitted(stack: LoopbackAppliance) -> None:
    """SIGSTOP one of three workers for 30 s under streamed load (6 clients back to back)."""
    victim = stack.services["worker1"]
    stop, outcomes = asyncio.Event(), []
    async with client(stack) as api:
        load = [asyncio.create_task(_load(api, stack, stop, outcomes)) for _ in range(6)]
        await asyncio.sleep(2)
        victim.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            ejected_after = await asyncio.to_thread(
                wait_until, lambda: view(stack, 1)["state"] == "ejected", 15, "ejection", interval=0.05)
            served_when_ejected = view(stack, 1)["requests"]
            await asyncio.sleep(max(0.0, STOP_S - (time.monotonic() - stopped_at)))
            served_while_stopped = int(view(stack, 1)["requests"]) - int(served_when_ejected)  # type: ignore[call-overload]
            state_before_cont = view(stack, 1)["state"]
        finally:
            victim.signal(signal.SIGCONT)
            resumed_at = time.monotonic()
        readmitted_after = await asyncio.to_thread(
            wait_until, lambda: view(stack, 1)["state"] == "healthy", 30, "readmission", interval=0.05)
        before = int(view(stack, 1)["requests"])  # type: ignore[call-overload]
        back_in_s = await asyncio.to_thread(
            wait_until, lambda: int(view(stack, 1)["requests"]) > before, 30,  # type: ignore[call-overload]
            "traffic to the readmitted worker", interval=0.1)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*load), 60)
    after_readmit = int(view(stack, 1)["requests"]) - before  # type: ignore[call-overload]
    failed = [o for o in outcomes if not o.done]
    lost = [o for o in failed if o.first_data_at is None]
    # Requests sent while the worker was stopped: each is answered, failing over within the first-byte timeout.
    during = [o for o in outcomes if stopped_at <= o.started_at < resumed_at]
    waits = sorted(o.first_byte_s for o in during if o.first_byte_s is not None)
    before_stop = sorted(o.first_byte_s for o in outcomes if o.started_at < stopped_at and o.first_byte_s is not None)
    record_figures("chaos_sigstop_worker", stopped_s=round(resumed_at - stopped_at, 1), requests=len(outcomes),
                   requests_during_stop=len(during), ejection_s=round(ejected_after, 2),
                   readmission_after_sigcont_s=round(readmitted_after, 2), served_while_stopped=served_while_stopped,
                   lost_requests=len(lost), cut_streams=len(failed) - len(lost),
                   first_byte_during_stop_max_s=round(waits[-1], 2) if waits else None,
                   first_byte_during_stop_median_s=round(waits[len(waits) // 2], 2) if waits else None,
                   first_byte_before_stop_max_s=round(before_stop[-1], 2) if before_stop else None,
                   served_after_readmission=after_readmit, first_served_after_readmission_s=round(back_in_s, 2))
    assert resumed_at - stopped_at >= STOP_S
    # First-byte timeout (passive) or two failed probes, whichever fires first; one probe period of slack.
    assert ejected_after <= FIRST_BYTE_TIMEOUT_S + PROBE_PERIOD_S
    assert state_before_cont == "ejected", "a stopped worker must stay out until it answers probes again"
    assert served_while_stopped == 0
    assert not lost, [(o.index, o.status, o.exception) for o in lost]
    assert all(o.clean_cut for o in failed)
    assert len(during) >= 20 and len(waits) == len(during), "load must go on, answered, while the worker is stopped"
    # One first-byte timeout at most (a request that went to the worker just before ejection), then the retry,
    # whose own first byte is bounded by the same timeout (or it would have been cut and counted above).
    assert waits[-1] <= 2 * FIRST_BYTE_TIMEOUT_S, waits[-5:]
    assert after_readmit > 0


async def test_all_workers_down_answers_503_with_retry_after_not_a_hang(stack: LoopbackAppliance) -> None:
    for i in range(3):
        stack.services[f"worker{i}"].signal(signal.SIGSTOP)
    try:
        ejected = await asyncio.to_thread(
            wait_until, lambda: all(w["state"] == "ejected" for w in stack.balancer_workers()), 20, "all ejected",
            interval=0.1)
        async with client(stack) as api:
            started = time.monotonic()
            outcome = await asyncio.wait_for(stream_chat(api, 0, model=stack.model, max_tokens=4), 30)
            answered_in = time.monotonic() - started
    finally:
        for i in range(3):
            stack.services[f"worker{i}"].signal(signal.SIGCONT)
    record_figures("chaos_all_workers_down", all_ejected_after_s=round(ejected, 2), status=outcome.status,
                   retry_after=outcome.retry_after, answered_in_s=round(answered_in, 2))
    await asyncio.to_thread(wait_until, lambda: all_healthy(stack), 30, "all readmitted", interval=0.2)
    assert outcome.status == 503 and outcome.retry_after, outcome
    assert answered_in < FIRST_BYTE_TIMEOUT_S, "answered at once, not after a timeout fired"
