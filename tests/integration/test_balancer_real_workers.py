"""The balancer process in front of three real worker processes on the real model.

Load spread, ``kill -9`` of a worker during 24 concurrent streams, ejection and
readmission, all through the official ``openai`` client. Workers run one thread each
(three workers on a small machine) and answer with a few tokens to keep this quick.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.processes import Service, free_port, python_module, run_service, wait_http_ok

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "real-worker-test-token-padded-to-32-characters"
SLOTS = 8


@dataclass
class Stack:
    balancer: str
    workers: list[str]
    services: list[Service]
    env: dict[str, str]
    tmp: Path
    extra: ExitStack = field(default_factory=ExitStack)

    def admin(self) -> list[dict[str, Any]]:
        request = urllib.request.Request(f"{self.balancer}/workers", headers={"X-Internal-Token": TOKEN})
        with urllib.request.urlopen(request, timeout=5) as response:
            return list(json.loads(response.read())["workers"])

    def worker_view(self, url: str) -> dict[str, Any]:
        return next(w for w in self.admin() if w["url"] == url)

    def start_worker(self, index: int) -> Service:
        port = int(self.workers[index].rsplit(":", 1)[1])
        env = {**self.env, "APPLIANCE_WORKER_PORT": str(port)}
        return self.extra.enter_context(run_service(
            python_module("inference"), env=env, log_path=self.tmp / f"worker{index}.log",
            ready_url=f"{self.workers[index]}/health", ready_timeout=120))


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("balancer-real")
    (tmp / "empty.toml").write_text("")
    common = {"APPLIANCE_CONFIG": str(tmp / "empty.toml"), "APPLIANCE_DATA_DIR": str(tmp),
              "APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_LOG_LEVEL": "WARNING"}
    worker_env = {**common, "APPLIANCE_WORKER_MODEL_PATH": str(model_path), "APPLIANCE_WORKER_SLOTS": str(SLOTS),
                  "APPLIANCE_WORKER_N_THREADS": "1", "APPLIANCE_WORKER_N_CTX": "512"}
    workers = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    with ExitStack() as stack_:
        services = []
        for index, url in enumerate(workers):  # start all three, then wait: they load in parallel
            env = {**worker_env, "APPLIANCE_WORKER_PORT": url.rsplit(":", 1)[1]}
            services.append(stack_.enter_context(run_service(
                python_module("inference"), env=env, log_path=tmp / f"worker{index}.log", ready_url=None)))
        for url, service in zip(workers, services, strict=True):
            wait_http_ok(f"{url}/health", 120, service.proc)
        port = free_port()
        balancer_env = {**common, "APPLIANCE_BALANCER_PORT": str(port),
                        "APPLIANCE_BALANCER_WORKERS": ",".join(workers),
                        "APPLIANCE_BALANCER_PROBE_INTERVAL_S": "0.5",
                        "APPLIANCE_BALANCER_READMIT_AFTER_GOOD_PROBES": "2",
                        "APPLIANCE_BALANCER_FIRST_BYTE_TIMEOUT_S": "60",
                        "APPLIANCE_BALANCER_QUEUE_TIMEOUT_S": "120",
                        # Every slot to whoever asks: the kill tests need all 3 x SLOTS streams running at once
                        # (each worker full). The default headroom keeps one slot for another key, so one
                        # stream of this single caller would wait, and the victim could hold SLOTS - 1.
                        "APPLIANCE_BALANCER_INTERACTIVE_HEADROOM": "0"}
        balancer_url = f"http://127.0.0.1:{port}"
        stack_.enter_context(run_service(python_module("balancer"), env=balancer_env, log_path=tmp / "balancer.log",
                                         ready_url=f"{balancer_url}/health"))
        result = Stack(balancer_url, workers, services, worker_env, tmp)
        with result.extra:
            wait_until(lambda: all(w["state"] == "healthy" for w in result.admin()), 30)
            yield result


def wait_until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def retries_total(stack: Stack) -> float:
    with urllib.request.urlopen(f"{stack.balancer}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("appliance_balancer_retries_total "):
                return float(line.split()[1])
    return 0.0


def client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.balancer}/v1", api_key="unused", max_retries=0, timeout=180,
                              default_headers={"X-Internal-Token": TOKEN})


async def test_uniform_load_is_spread_evenly(stack: Stack) -> None:
    before = {w["url"]: w["requests"] for w in stack.admin()}
    gate = asyncio.Semaphore(3 * SLOTS)

    async with client(stack) as api:

        async def one(index: int) -> str:
            async with gate:
                done = await api.completions.create(model="gemma-3-270m", prompt=f"Item {index}:", max_tokens=4)
                return done.choices[0].text

        answers = await asyncio.gather(*(one(i) for i in range(6 * SLOTS)))
    assert len(answers) == 6 * SLOTS
    served = [w["requests"] - before[w["url"]] for w in stack.admin()]
    assert sum(served) == 6 * SLOTS
    assert max(served) / min(served) <= 1.3, served
    assert all(w["inflight"] == 0 for w in stack.admin())


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


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_kill_9_mid_stream_ends_streams_with_error_event_and_readmits(stack: Stack) -> None:
    victim = stack.workers[0]
    # Every stream runs its 24 tokens: one that counted to 2 and stopped could leave the victim below
    # SLOTS in flight before 2 * SLOTS streams started, and the wait below would never see both at once.
    streams = Streams(3 * SLOTS, max_tokens=24, ignore_eos=True)
    async with client(stack) as api:
        tasks = streams.run(api)
        await wait_for(lambda: stack.worker_view(victim)["inflight"] == SLOTS and sum(streams.started) >= 2 * SLOTS,
                       120, "streams never got going")
        stack.services[0].signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # Passively, on the broken connections; waited for, not timed (a loaded machine delays everything).
        await wait_for(lambda: stack.worker_view(victim)["state"] == "ejected", 30, "the killed worker ejected")
        await asyncio.gather(*tasks)

    cut = [i for i, o in enumerate(streams.outcome) if o != "done"]
    assert 1 <= len(cut) <= SLOTS, streams.outcome
    assert all(streams.started[i] for i in cut), "a request that had not started streaming was lost"
    # Ended by the broken connection, not by a timeout (first byte 60 s): half of it is a bound with margin.
    assert all(streams.ended_at[i] - killed_at < 60 / 2 for i in cut), "cut streams must end on the kill"

    # Readmission: restart it on the same port; probes bring it back without a balancer restart.
    stack.services[0] = stack.start_worker(0)
    wait_until(lambda: stack.worker_view(victim)["state"] == "healthy", 30)
    before = stack.worker_view(victim)["requests"]
    async with client(stack) as api:
        await asyncio.gather(*(api.completions.create(model="gemma-3-270m", prompt="Hi", max_tokens=2)
                               for _ in range(3 * SLOTS)))
    assert stack.worker_view(victim)["requests"] > before


async def test_kill_9_before_first_byte_retries_on_other_workers(stack: Stack) -> None:
    """A frozen worker holds 8 requests that never started; killing it must not lose any of them."""
    victim = stack.workers[0]
    retries_before = retries_total(stack)
    streams = Streams(3 * SLOTS, max_tokens=8)
    stack.services[0].signal(signal.SIGSTOP)
    try:
        async with client(stack) as api:
            tasks = streams.run(api)
            await wait_for(lambda: stack.worker_view(victim)["inflight"] == SLOTS, 30, "victim got no requests")
            stack.services[0].signal(signal.SIGKILL)
            await asyncio.gather(*tasks)
    finally:
        stack.services[0].signal(signal.SIGKILL)
    assert streams.outcome == ["done"] * (3 * SLOTS)
    assert retries_total(stack) - retries_before >= SLOTS
