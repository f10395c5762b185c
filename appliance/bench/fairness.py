"""``appliance bench fairness [--json]``: the balancer's wait queue, FIFO against fair, measured in one run.

Policy (fake workers with ``--slots`` slots each and a fixed service time, so only the
scheduler differs; the balancer runs in-process with ``scheduling=fifo`` then ``fair``):

- ``light_slowdown_{fifo,fair}``: a light key sends one request at a time while a heavy key
  keeps 4x the slot count in flight; its p50 latency then, over its p50 alone.
- ``heavy_throughput_ratio``: the heavy key's completed requests/s under fair over FIFO
  (fairness must not leave slots idle).
- ``weight_ratio``: two heavy keys of weights 1 and 3: tokens served to the second over the
  first (target 3, within 10 %).
- ``interactive_flood_ratio``: an interactive key's p50 latency while a batch key floods, over
  its p50 without the flood.

Real workers (``--real``, on by default; ``--skip-real`` to leave out): one inference worker
with the real model behind the balancer; a heavy key keeps 4x its slots busy with short
generations while a light key sends one short request at a time. ``light_speedup_real`` is
the light key's p50 latency under FIFO over fair; ``light_queue_wait_p50_s`` its queue wait
under fair (the balancer's ``X-Appliance-Queue-Wait`` header).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.bench import harness
from appliance.bench._balancer_roles import new_loop
from appliance.bench.fake_worker import FakeState, fake_workers
from appliance.core.hop import INTERNAL_TOKEN_HEADER, KEY_ID_HEADER, PRIORITY_HEADER, QUEUE_WAIT_HEADER, WEIGHT_HEADER

__all__ = ["main"]

NAME = "fairness"
FAKE_MODEL = "fairness-fake"
_PROMPT_TOKENS = 20


@dataclass(frozen=True, slots=True)
class Load:
    """One key's closed-loop load: ``concurrency`` requests always in flight."""

    key: str
    concurrency: int
    priority: str = "interactive"
    weight: float = 1.0
    max_tokens: int = 16

    def headers(self, token: str) -> dict[str, str]:
        return {
            INTERNAL_TOKEN_HEADER: token,
            KEY_ID_HEADER: self.key,
            PRIORITY_HEADER: self.priority,
            WEIGHT_HEADER: f"{self.weight:g}",
        }


@dataclass(slots=True)
class Samples:
    latencies: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    completed: int = 0
    tokens: int = 0
    errors: int = 0


@asynccontextmanager
async def _balancer(workers: list[str], token: str, scheduling: str, queue_size: int, tmp: Path) -> AsyncIterator[str]:
    """The real balancer, its own process (fresh per policy: a restart starts the queue afresh)."""
    port = harness.free_port()
    env = harness.service_env(
        "balancer",
        tmp,
        token,
        port=port,
        workers=workers,
        scheduling=scheduling,
        routing="least_connections",
        queue_size=queue_size,
        queue_timeout_s=300,
        first_byte_timeout_s=300,
        probe_interval_s=1,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return bool((harness.get_json(f"{url}/health")[1] or {}).get("healthy_workers") == len(workers))

    # Entered and left on a thread: the fake workers it probes are served by this event loop.
    running = harness.service(harness.python("balancer"), env, log=tmp / f"balancer-{scheduling}.log", ready=ready)
    await asyncio.to_thread(running.__enter__)
    try:
        yield url
    finally:
        await asyncio.to_thread(running.__exit__, None, None, None)


# -- load --------------------------------------------------------------------------------------


async def _drive(
    url: str, token: str, model: str, loads: list[Load], *, warmup_s: float, duration_s: float, stagger_s: float
) -> dict[str, Samples]:
    """Run every load at once. Throughput and tokens count what ended between the warm-up and the stop;
    latency counts what started in that window, and a one-at-a-time load's last request is awaited
    (so a slow policy still yields samples) while the flood is cut at the stop.

    A load's loops start spread over ``stagger_s`` (one service time): with fixed service times, loops
    started together would finish together for ever, and a slot would free only in waves."""
    import aiohttp

    samples = {load.key: Samples() for load in loads}
    start = time.perf_counter() + warmup_s
    stop = start + duration_s
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def loop(load: Load, index: int) -> None:
            await asyncio.sleep(stagger_s * index / load.concurrency)
            body = json.dumps(
                {
                    "model": model,
                    "max_tokens": load.max_tokens,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": f"Count to three, {load.key}."}],
                }
            )
            headers = {**load.headers(token), "Content-Type": "application/json"}
            mine = samples[load.key]
            while (began := time.perf_counter()) < stop:
                async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as response:
                    payload = await response.read()
                    waited = float(response.headers.get(QUEUE_WAIT_HEADER, "0") or 0)
                ended = time.perf_counter()
                if response.status != 200:
                    mine.errors += 1
                    await asyncio.sleep(0.05)
                    continue
                usage = json.loads(payload).get("usage") or {}
                if ended <= stop and ended >= start:
                    mine.completed += 1
                    mine.tokens += int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
                if began >= start:
                    mine.latencies.append(ended - began)
                    mine.waits.append(waited)

        probes = [asyncio.create_task(loop(load, 0)) for load in loads if load.concurrency == 1]
        flood = [
            asyncio.create_task(loop(load, index))
            for load in loads
            if load.concurrency > 1
            for index in range(load.concurrency)
        ]
        await asyncio.sleep(max(0.0, stop - time.perf_counter()))
        await asyncio.gather(*probes)
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    return samples


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _summary(samples: Samples, duration_s: float) -> dict[str, Any]:
    return {
        "requests": len(samples.latencies),
        "p50_s": round(_p50(samples.latencies), 4),
        "queue_wait_p50_s": round(_p50(samples.waits), 4),
        "completed_per_s": round(samples.completed / duration_s, 3),
        "tokens": samples.tokens,
        "errors": samples.errors,
    }


# -- policy phase ------------------------------------------------------------------------------


async def _policy(args: Any, tmp: Path) -> dict[str, Any]:
    token = secrets.token_urlsafe(32)
    slots_total = args.workers * args.slots
    flood = 4 * slots_total
    duration, warmup = args.duration, args.warmup
    result: dict[str, Any] = {
        "workers": args.workers,
        "slots_per_worker": args.slots,
        "service_s": args.service,
        "heavy_in_flight": flood,
        "duration_s": duration,
    }
    # Each holds a request ``--service`` seconds and reports its tokens (20 prompt + max_tokens).
    states = [FakeState(model=FAKE_MODEL, slots=args.slots, service_s=args.service, prompt_tokens=_PROMPT_TOKENS,
                        tokens_out=0) for _ in range(args.workers)]
    async with fake_workers(*states) as fakes:

        async def run(scheduling: str, loads: list[Load]) -> dict[str, Samples]:
            async with _balancer(fakes, token, scheduling, queue_size=4 * flood, tmp=tmp) as url:
                return await _drive(
                    url, token, FAKE_MODEL, loads, warmup_s=warmup, duration_s=duration, stagger_s=args.service
                )

        harness.progress(NAME, "light key alone")
        alone = (await run("fair", [Load("light", 1)]))["light"]
        result["light_alone"] = _summary(alone, duration)
        for scheduling in ("fifo", "fair"):
            harness.progress(NAME, f"{scheduling}: heavy key at 4x the slots, light key one at a time")
            mixed = await run(scheduling, [Load("heavy", flood), Load("light", 1)])
            result[f"contention_{scheduling}"] = {key: _summary(s, duration) for key, s in mixed.items()}
            harness.progress(NAME, f"{scheduling}: two heavy keys, weights 1 and 3")
            weighted = await run(scheduling, [Load("w1", flood, weight=1), Load("w3", flood, weight=3)])
            result[f"weights_{scheduling}"] = {key: _summary(s, duration) for key, s in weighted.items()}
            harness.progress(NAME, f"{scheduling}: batch flood, interactive key one at a time")
            flooded = await run(scheduling, [Load("bulk", flood, priority="batch"), Load("person", 1)])
            result[f"flood_{scheduling}"] = {key: _summary(s, duration) for key, s in flooded.items()}
    alone_p50 = result["light_alone"]["p50_s"]
    for scheduling in ("fifo", "fair"):
        light = result[f"contention_{scheduling}"]["light"]
        result[f"light_slowdown_{scheduling}"] = round(light["p50_s"] / alone_p50, 3)
        result[f"interactive_flood_ratio_{scheduling}"] = round(
            result[f"flood_{scheduling}"]["person"]["p50_s"] / alone_p50, 3
        )
        weights = result[f"weights_{scheduling}"]
        result[f"weight_ratio_{scheduling}"] = round(weights["w3"]["tokens"] / max(1, weights["w1"]["tokens"]), 3)
    heavy_fifo = result["contention_fifo"]["heavy"]["completed_per_s"]
    result["heavy_throughput_ratio"] = round(result["contention_fair"]["heavy"]["completed_per_s"] / heavy_fifo, 3)
    result["weight_ratio_error"] = round(abs(result["weight_ratio_fair"] / 3 - 1), 3)
    return result


# -- real workers ------------------------------------------------------------------------------


async def _real_phase(worker: str, model: str, token: str, args: Any, tmp: Path) -> dict[str, Any]:
    slots = args.real_slots
    heavy = Load("heavy", 4 * slots, max_tokens=args.real_heavy_tokens)
    light = Load("light", 1, max_tokens=args.real_light_tokens)
    result: dict[str, Any] = {
        "model": model,
        "slots": slots,
        "heavy_in_flight": heavy.concurrency,
        "duration_s": args.real_duration,
    }
    for scheduling in ("fifo", "fair"):
        harness.progress(NAME, f"real worker, {scheduling}")
        async with _balancer([worker], token, scheduling, queue_size=256, tmp=tmp) as url:
            samples = await _drive(
                url,
                token,
                model,
                [heavy, light],
                warmup_s=args.real_warmup,
                duration_s=args.real_duration,
                stagger_s=1.0,
            )
        result[scheduling] = {key: _summary(s, args.real_duration) for key, s in samples.items()}
    fifo, fair = result["fifo"]["light"]["p50_s"], result["fair"]["light"]["p50_s"]
    result["light_speedup_real"] = round(fifo / fair, 3)
    result["light_queue_wait_p50_s"] = result["fair"]["light"]["queue_wait_p50_s"]
    result["heavy_throughput_ratio_real"] = round(
        result["fair"]["heavy"]["completed_per_s"] / max(1e-9, result["fifo"]["heavy"]["completed_per_s"]), 3
    )
    return result


def real_workers(args: Any, tmp: Path) -> dict[str, Any]:
    from appliance.core.model_files import prepare_default_model

    model_path = Path(args.model_path) if args.model_path else prepare_default_model(Path(args.data_dir))
    port, token = harness.free_port(), secrets.token_urlsafe(32)
    env = harness.service_env(
        "worker", tmp, token, port=port, model_path=model_path, slots=args.real_slots, n_threads=args.worker_threads
    )
    worker = f"http://127.0.0.1:{port}"
    with harness.service(
        harness.python("inference"), env, log=tmp / "worker.log", ready=f"{worker}/health", timeout=300
    ):
        model = str(harness.get_json(f"{worker}/health")[1]["model"])
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(_real_phase(worker, model, token, args, tmp))


# -- command -----------------------------------------------------------------------------------


def _parser() -> Any:
    parser = harness.parser(NAME, __doc__)
    add = parser.add_argument
    add("--workers", type=int, default=4, help="fake workers")
    add("--slots", type=int, default=8, help="slots per fake worker")
    add("--service", type=float, default=1.0, help="seconds a fake worker holds each request")
    add("--duration", type=float, default=12.0, help="seconds measured per policy scenario")
    add("--warmup", type=float, default=2.0)
    add("--skip-real", action="store_true", help="leave out the real-worker phase")
    add("--skip-policy", action="store_true", help="leave out the fake-worker phase")
    add("--real-slots", type=int, default=4)
    add("--real-duration", type=float, default=45.0)
    add("--real-warmup", type=float, default=5.0)
    add("--real-heavy-tokens", type=int, default=16)
    add("--real-light-tokens", type=int, default=8)
    add("--worker-threads", type=int, default=1, help="llama.cpp threads of the real worker (0 = all cores)")
    add("--model-path", default="")
    add("--data-dir", default=os.environ.get("APPLIANCE_DATA_DIR", "data"))
    return parser


def _render(result: Mapping[str, Any]) -> str:
    policy = result.get("policy")
    lines = (
        []
        if policy is None
        else [
            f"fake workers: {policy['workers']} x {policy['slots_per_worker']} slots, {policy['service_s']} s each; "
            f"heavy keys keep {policy['heavy_in_flight']} in flight",
            f"light alone p50 {policy['light_alone']['p50_s']:.3f} s",
            f"light_slowdown_fifo = {policy['light_slowdown_fifo']:.2f}   light_slowdown_fair = "
            f"{policy['light_slowdown_fair']:.2f} (target <= 1.5)",
            f"heavy_throughput_ratio = {policy['heavy_throughput_ratio']:.3f} (fair / fifo, target >= 0.95)",
            f"weight_ratio_fair = {policy['weight_ratio_fair']:.2f} (target 3 +- 10 %; fifo "
            f"{policy['weight_ratio_fifo']:.2f})",
            f"interactive_flood_ratio_fair = {policy['interactive_flood_ratio_fair']:.2f} (target <= 1.3; fifo "
            f"{policy['interactive_flood_ratio_fifo']:.2f})",
        ]
    )
    real = result.get("real")
    if policy is None:
        lines.append("fake workers: skipped")
    if real is None:
        lines.append("real worker: skipped")
    elif "error" in real:
        lines.append(f"real worker: not measured ({real['error']})")
    else:
        lines.append(
            f"real worker ({real['model']}, {real['slots']} slots): light p50 fifo "
            f"{real['fifo']['light']['p50_s']:.2f} s, fair {real['fair']['light']['p50_s']:.2f} s; "
            f"light_speedup_real = {real['light_speedup_real']:.2f} (target >= 3); "
            f"light_queue_wait_p50_s = {real['light_queue_wait_p50_s']:.3f} (target <= 0.5)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_policy:
            with asyncio.Runner(loop_factory=new_loop) as runner:
                result["policy"] = runner.run(_policy(args, tmp))
        if not args.skip_real:
            try:
                result["real"] = real_workers(args, tmp)
            except (RuntimeError, TimeoutError, OSError, ImportError) as exc:
                result["real"] = {"error": f"{type(exc).__name__}: {exc}"}
    policy = result.get("policy") or {}
    for name in (
        "light_slowdown_fifo",
        "light_slowdown_fair",
        "heavy_throughput_ratio",
        "weight_ratio_fair",
        "weight_ratio_error",
        "interactive_flood_ratio_fair",
        "interactive_flood_ratio_fifo",
    ):
        result[name] = policy.get(name)
    real = result.get("real") or {}
    result["light_speedup_real"] = real.get("light_speedup_real")
    result["light_queue_wait_p50_s"] = real.get("light_queue_wait_p50_s")
    return harness.emit(result, args.json, _render)
