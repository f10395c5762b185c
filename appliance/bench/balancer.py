"""``python -m appliance.bench balancer [--json]``: what the balancer costs, measured side by side.

(a) ``overhead_ratio``: p50 latency of a 16-token completion through the balancer divided
    by the same request sent straight to the same real worker (requests interleaved
    direct/through, one at a time, so drift and noise hit both sides alike).
(b) ``routing_efficiency``: requests/s through the balancer in front of 16 fast fake
    upstreams at concurrency 64, divided by requests/s sent straight to the same fakes by
    the same load generator, in alternating rounds. The load generator, the fakes and the
    balancer are separate processes. The same run measures a 40-line aiohttp proxy with
    none of the balancer's features (``naive_proxy_efficiency``) as a reference point.
    ``--client raw --fakes raw`` swaps in a lean load generator and lean fakes: direct
    requests then get much faster, so every proxy's ratio drops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from appliance.bench import harness
from appliance.bench._balancer_roles import new_loop, percentile, run_load, serve_naive_proxy, serve_upstreams

__all__ = ["main"]

_ROLE = [sys.executable, "-m", "appliance.bench", "balancer", "--role"]

# -- orchestration -------------------------------------------------------------------------------

@contextmanager
def _balancer(workers: list[str], token: str, tmp: Path) -> Iterator[str]:
    port = harness.free_port()
    env = harness.service_env("balancer", tmp, token, port=port, workers=workers, probe_interval_s=2)
    url = f"http://127.0.0.1:{port}"
    with harness.service(harness.python("balancer"), env, log=tmp / "balancer.log") as proc:
        harness.wait_until(lambda: (harness.get_json(f"{url}/health")[1] or {}).get("healthy_workers")
                           == len(workers), 30, "balancer", proc=proc)
        yield url


def _run_loadgen(targets: list[str], token: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [*_ROLE, "loadgen", "--targets", ",".join(targets), "--token", token, "--client", args.client,
            "--concurrency", str(args.concurrency), "--duration", str(args.duration), "--warmup", str(args.warmup)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=args.duration + 120)  # noqa: S603
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@contextmanager
def _naive_proxy(upstreams: list[str], tmp: Path) -> Iterator[str]:
    port = harness.free_port()
    argv = [*_ROLE, "naive-proxy", "--port", str(port), "--targets", ",".join(upstreams)]
    with harness.service(argv, log=tmp / "naive.log") as proc:
        harness.wait_until(lambda: _port_open(port), 30, "naive proxy", proc=proc)
        yield f"127.0.0.1:{port}"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def routing_capacity(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ports = [harness.free_port() for _ in range(args.upstreams)]
    fakes = [f"127.0.0.1:{p}" for p in ports]
    token = secrets.token_urlsafe(32)
    argv = [*_ROLE, "upstreams", "--fakes", args.fakes, "--ports", ",".join(map(str, ports))]
    rounds: list[dict[str, Any]] = []
    with ExitStack() as stack:
        proc = stack.enter_context(harness.service(argv, log=tmp / "upstreams.log"))
        harness.wait_until(lambda: all(harness.http_ok(f"http://{f}/health") for f in fakes), 30, "fake upstreams",
                           proc=proc)
        balancer = stack.enter_context(_balancer([f"http://{f}" for f in fakes], token, tmp)).removeprefix("http://")
        naive = stack.enter_context(_naive_proxy([f"http://{f}" for f in fakes], tmp)) if args.baseline else None
        sides = {"direct": fakes, "balancer": [balancer], **({"naive_proxy": [naive]} if naive else {})}
        names = list(sides)
        for index in range(args.rounds):  # rotate the order each round: no side always runs first or last
            order = names[index % len(names):] + names[: index % len(names)]
            runs = {name: _run_loadgen(sides[name], token, args) for name in order}
            failed = {name: run["statuses"] for name, run in runs.items() if set(run["statuses"]) - {"200"}}
            if failed:  # an error answer is fast: counting it as throughput would flatter a broken proxy
                raise RuntimeError(f"round {index + 1}: answers other than 200: {failed}")
            direct = runs["direct"]["rps"] or float("nan")
            rounds.append({**runs, "routing_efficiency": runs["balancer"]["rps"] / direct,
                           "naive_proxy_efficiency": runs["naive_proxy"]["rps"] / direct if naive else None})
    result: dict[str, Any] = {
        "upstreams": args.upstreams, "concurrency": args.concurrency, "duration_s": args.duration,
        "client": args.client, "fakes": args.fakes, "rounds": rounds,
        "routing_efficiency": statistics.median(float(r["routing_efficiency"]) for r in rounds),
        "naive_proxy_efficiency": statistics.median(float(r["naive_proxy_efficiency"]) for r in rounds)
        if naive else None,
    }
    return result


async def _timed_completions(direct: str, through: str, model: str, token: str, count: int) -> dict[str, list[float]]:
    import aiohttp

    body = {"model": model, "prompt": "The three primary colours are", "max_tokens": 16, "temperature": 0}
    headers = harness.internal_headers(token)
    timings: dict[str, list[float]] = {"direct": [], "through": []}
    async with aiohttp.ClientSession() as session:

        async def one(name: str, base: str, keep: bool) -> None:
            started = time.perf_counter()
            async with session.post(f"{base}/v1/completions", json=body, headers=headers) as response:
                payload = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"{name}: {response.status} {payload}")
            if keep:
                timings[name].append(time.perf_counter() - started)

        for index in range(count + 2):  # two warm-up pairs
            order = [("direct", direct), ("through", through)]
            for name, base in order if index % 2 else reversed(order):
                await one(name, base, keep=index >= 2)
    return timings


def real_worker_overhead(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from appliance.core.model_files import prepare_default_model

    model_path = Path(args.model_path) if args.model_path else prepare_default_model(Path(args.data_dir))
    port, token = harness.free_port(), secrets.token_urlsafe(32)
    env = harness.service_env("worker", tmp, token, port=port, model_path=model_path, slots=2,
                              n_threads=args.worker_threads)
    worker = f"http://127.0.0.1:{port}"
    with harness.service(harness.python("inference"), env, log=tmp / "worker.log") as proc:
        harness.wait_until(lambda: harness.get_json(f"{worker}/health")[0] == 200, 300, "inference worker", proc=proc)
        model = str(harness.get_json(f"{worker}/health")[1]["model"])
        with _balancer([worker], token, tmp) as url, asyncio.Runner(loop_factory=new_loop) as runner:
            timings = runner.run(_timed_completions(worker, url, model, token, args.requests))
    result: dict[str, Any] = {"model": model, "requests_each": args.requests}
    for name, values in timings.items():
        result[name] = {"p50_ms": percentile(values, 50) * 1000, "p95_ms": percentile(values, 95) * 1000}
    result["overhead_ratio"] = result["through"]["p50_ms"] / result["direct"]["p50_ms"]
    # Each through-request ran next to a direct one: the median of those pairs' ratios shrugs off drift.
    pairs = [t / d for d, t in zip(timings["direct"], timings["through"], strict=True)]
    result["paired_median_ratio"] = statistics.median(pairs)
    result["overhead_ratio_p95"] = result["through"]["p95_ms"] / result["direct"]["p95_ms"]
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance bench balancer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--json", action="store_true", help="print one JSON object")
    add("--upstreams", type=int, default=16)
    add("--concurrency", type=int, default=64)
    add("--duration", type=float, default=5.0, help="seconds measured per load run")
    add("--warmup", type=float, default=1.0)
    add("--rounds", type=int, default=5, help="alternating rounds (the median ratio is reported)")
    add("--client", choices=["aiohttp", "raw"], default="aiohttp", help="load generator")
    add("--fakes", choices=["aiohttp", "raw"], default="aiohttp", help="fake upstream server")
    add("--no-baseline", dest="baseline", action="store_false", help="skip the naive proxy reference")
    add("--requests", type=int, default=40, help="16-token completions per side, real worker")
    add("--worker-threads", type=int, default=1, help="llama.cpp threads of the real worker (0 = all cores)")
    add("--skip-real", action="store_true", help="only the routing-capacity part")
    add("--model-path", default="")
    add("--data-dir", default=os.environ.get("APPLIANCE_DATA_DIR", "data"))
    add("--role", choices=["bench", "upstreams", "loadgen", "naive-proxy"], default="bench", help=argparse.SUPPRESS)
    add("--ports", default="", help=argparse.SUPPRESS)
    add("--port", type=int, default=0, help=argparse.SUPPRESS)
    add("--targets", default="", help=argparse.SUPPRESS)
    add("--path", default="/v1/chat/completions", help=argparse.SUPPRESS)
    add("--token", default="", help=argparse.SUPPRESS)
    return parser


def _print_human(result: dict[str, Any]) -> None:
    capacity = result["routing"]
    for index, pair in enumerate(capacity["rounds"], 1):
        for side in ("direct", "balancer", "naive_proxy"):
            if side in pair:
                run = pair[side]
                print(f"round {index} {side:>11}: {run['rps']:7.0f} req/s  p50 {run['p50_ms']:6.2f} ms  "
                      f"p99 {run['p99_ms']:7.2f} ms  statuses {run['statuses']}")
    naive = capacity["naive_proxy_efficiency"]
    print(f"routing_efficiency = {capacity['routing_efficiency']:.3f} (median of {len(capacity['rounds'])} rounds; "
          f"{capacity['upstreams']} {capacity['fakes']} fake upstreams, {capacity['client']} load generator, "
          f"concurrency {capacity['concurrency']}; target >= 0.40)")
    if naive is not None:
        print(f"naive_proxy_efficiency = {naive:.3f} (40-line aiohttp proxy, same run, same fakes and load)")
    real = result.get("real_worker")
    if real is None:
        print("real worker: skipped")
    elif "error" in real:
        print(f"real worker: not measured ({real['error']})")
    else:
        for side in ("direct", "through"):
            print(f"16-token completion {side:>7}: p50 {real[side]['p50_ms']:7.1f} ms  "
                  f"p95 {real[side]['p95_ms']:7.1f} ms")
        print(f"overhead_ratio = {real['overhead_ratio']:.4f} (p50; p95 ratio {real['overhead_ratio_p95']:.4f}; "
              f"median of paired ratios {real['paired_median_ratio']:.4f}; target <= 1.02; model {real['model']}, "
              f"{real['requests_each']} requests each)")


def _role(args: argparse.Namespace) -> int:
    if args.role == "upstreams":
        serve_upstreams([int(p) for p in args.ports.split(",")], args.fakes)
    elif args.role == "naive-proxy":
        serve_naive_proxy(args.port, args.targets.split(","))
    else:
        targets = [(host, int(port)) for host, port in (t.rsplit(":", 1) for t in args.targets.split(","))]
        with asyncio.Runner(loop_factory=new_loop) as runner:
            print(json.dumps(runner.run(run_load(
                targets, client=args.client, path=args.path, token=args.token, concurrency=args.concurrency,
                warmup_s=args.warmup, duration_s=args.duration))))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.role != "bench":
        return _role(args)
    with tempfile.TemporaryDirectory(prefix="bench-balancer-") as tmp_name:
        tmp = Path(tmp_name)
        result: dict[str, Any] = {"routing": routing_capacity(args, tmp)}
        if not args.skip_real:
            try:
                result["real_worker"] = real_worker_overhead(args, tmp)
            except (RuntimeError, TimeoutError, OSError, ImportError, subprocess.SubprocessError) as exc:
                result["real_worker"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["routing_efficiency"] = result["routing"]["routing_efficiency"]
    result["naive_proxy_efficiency"] = result["routing"]["naive_proxy_efficiency"]
    result["overhead_ratio"] = result.get("real_worker", {}).get("overhead_ratio")
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(result)
    return 0
