"""`python -m appliance.bench gateway [--json]`: what the gateway costs, measured side by side in one run.

- ``overhead_ratio``: p50 of a 16-token completion through gateway+balancer (cache off) ÷ straight to the
  real worker with the real model (target ≤ 1.02). Skipped, with the reason, when the worker cannot start.
- ``hit_ratio``: p50 of a cache hit ÷ p50 of a miss through the gateway (target ≤ 0.02).
- ``gateway_efficiency``: requests/s through gateway+balancer (auth, rate limit, cache lookup on) against a
  fast fake worker ÷ requests/s straight to that fake, same load generator (its own process), same run
  (target ≥ 0.35).
- ``added_p50_ms_c1``: p50 latency of one request at a time through gateway+balancer minus straight to that
  fake worker, same load generator, rounds alternated (target ≤ 2.0 ms).
- ``resp_over_redispy``: requests/s of that gateway (hand-written pipelined RESP client on the hot path,
  ``gateway/resp.py``) ÷ the same gateway with redis-py's pipeline instead (``_gateway_redispy.py``), same
  balancer, Redis, keys and load, rounds alternated: what keeping our own Redis client buys.
  ``redis_hot_path`` measures the same two clients alone (admission script + cache GET), in one event loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from appliance.bench import harness

__all__ = ["main"]

TOKEN = "bench-internal-token-for-loopback-processes"  # noqa: S105 - a throwaway token for loopback processes


@contextmanager
def _stack(tmp: Path, worker_url: str, redis_url: str, tag: str, *, redispy: bool = False
           ) -> Iterator[tuple[str, str, str | None]]:
    """A real balancer in front of ``worker_url`` and a gateway in front of it; yields (gateway URL, key, URL of
    a second gateway using redis-py's pipeline on the hot path, sharing balancer, Redis and keys, or None)."""
    common = {"APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_DATA_DIR": str(tmp / f"data-{tag}"),
              "APPLIANCE_LOG_LEVEL": "WARNING"}
    bport, gport = harness.free_port(), harness.free_port()
    with ExitStack() as stack:
        balancer_env = {**common, "APPLIANCE_BALANCER_PORT": str(bport), "APPLIANCE_BALANCER_WORKERS": worker_url}
        stack.enter_context(harness.service(harness.python("balancer"), balancer_env,
                                            ready=f"http://127.0.0.1:{bport}/health", log=tmp / f"balancer-{tag}.log"))
        env = {**common, "APPLIANCE_GATEWAY_PORT": str(gport), "APPLIANCE_GATEWAY_REDIS_URL": redis_url,
               "APPLIANCE_GATEWAY_BALANCER_URL": f"http://127.0.0.1:{bport}"}
        stack.enter_context(harness.service(harness.python("gateway"), env, ready=f"http://127.0.0.1:{gport}/healthz",
                                            log=tmp / f"gateway-{tag}.log"))
        admin = (tmp / f"data-{tag}" / "admin_key").read_text().strip()
        key = _create_key(f"http://127.0.0.1:{gport}", admin)
        other = None
        if redispy:
            rport = harness.free_port()
            other = f"http://127.0.0.1:{rport}"
            stack.enter_context(harness.service(harness.python("appliance.bench._gateway_redispy"),
                                                {**env, "APPLIANCE_GATEWAY_PORT": str(rport)},
                                                ready=f"{other}/healthz", log=tmp / f"gateway-redispy-{tag}.log"))
        yield f"http://127.0.0.1:{gport}", key, other


def _create_key(base: str, admin: str) -> str:
    body = json.dumps({"name": "bench", "scopes": ["chat"], "limits": {"rpm": 10**9}}).encode()
    request = urllib.request.Request(base + "/admin/keys", data=body, method="POST",  # noqa: S310
                                     headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
        return str(json.loads(resp.read())["key"])


def _loadgen(url: str, headers: dict[str, str], body: dict[str, Any], concurrency: int,
             duration: float) -> dict[str, Any]:
    argv = harness.python("appliance.bench._gateway_loadgen", "--url", url, "--concurrency", str(concurrency),
               "--duration", str(duration), "--body", json.dumps(body), "--headers", json.dumps(headers))
    done = subprocess.run(argv, capture_output=True, check=True, timeout=duration + 120)  # noqa: S603
    return dict(json.loads(done.stdout))


def efficiency(tmp: Path, redis_url: str, concurrency: int, duration: float, rounds: int, *,
               duration_c1: float) -> dict[str, Any]:
    """Requests/s straight to the fake, through the gateway (pipelined RESP client on the hot path) and through
    the same gateway with redis-py's pipeline instead; ``rounds`` rounds, the order rotated each round. Then the
    p50 latency at concurrency 1, straight to the fake and through the gateway, alternated the same way."""
    fport = harness.free_port()
    fake = f"http://127.0.0.1:{fport}"
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "bench {n}"}], "temperature": 0,
            "max_tokens": 16}
    argv = harness.python("appliance.bench.fake_worker", "--port", str(fport), "--token", TOKEN, "--slots", "1024")
    with harness.service(argv, ready=fake + "/health", log=tmp / "fake.log"), \
            _stack(tmp, fake, redis_url, "fake", redispy=True) as (gw, key, gw_redispy):
        assert gw_redispy is not None
        bearer = {"Authorization": f"Bearer {key}"}
        sides = {"direct": (fake, harness.internal_headers(TOKEN)), "gateway": (gw, bearer),
                 "gateway_redispy": (gw_redispy, bearer)}
        for url, headers in sides.values():  # warm-up
            _loadgen(url + "/v1/chat/completions", headers, body, concurrency, 1.0)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        names = list(sides)
        for index in range(rounds):
            for name in names[index % len(names):] + names[: index % len(names)]:
                url, headers = sides[name]
                runs[name].append(_loadgen(url + "/v1/chat/completions", headers, body, concurrency, duration))
                _progress(f"round {index + 1}/{rounds} {name}: {runs[name][-1]}")
        one_at_a_time: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
        for index in range(rounds):
            for name in ("direct", "gateway") if index % 2 == 0 else ("gateway", "direct"):
                url, headers = sides[name]
                one_at_a_time[name].append(_loadgen(url + "/v1/chat/completions", headers, body, 1, duration_c1))
                _progress(f"concurrency 1, round {index + 1}/{rounds} {name}: {one_at_a_time[name][-1]}")
    rps = {name: statistics.median(run["rps"] for run in done) for name, done in runs.items()}
    p50 = {name: statistics.median(run["p50_ms"] or 0.0 for run in done) for name, done in runs.items()}
    errors = {name: sum(run["errors"] for run in done) for name, done in runs.items()}
    direct = rps["direct"] or float("nan")
    p50_c1 = {name: statistics.median(run["p50_ms"] or 0.0 for run in done) for name, done in one_at_a_time.items()}
    return {"direct_p50_ms_c1": p50_c1["direct"], "gateway_p50_ms_c1": p50_c1["gateway"],
            # What the gateway and balancer add to one request on its own, the fake answering at once.
            "added_p50_ms_c1": round(p50_c1["gateway"] - p50_c1["direct"], 3),
            "direct_rps": rps["direct"], "gateway_rps": rps["gateway"], "gateway_redispy_rps": rps["gateway_redispy"],
            "direct_errors": errors["direct"], "gateway_errors": errors["gateway"],
            "gateway_redispy_errors": errors["gateway_redispy"], "direct_p50_ms": p50["direct"],
            "gateway_p50_ms": p50["gateway"], "gateway_redispy_p50_ms": p50["gateway_redispy"], "rounds": rounds,
            "gateway_efficiency": round(rps["gateway"] / direct, 4),
            "gateway_redispy_efficiency": round(rps["gateway_redispy"] / direct, 4),
            # What the hand-written pipelined client buys over redis-py's pipeline, end to end.
            "resp_over_redispy": round(rps["gateway"] / rps["gateway_redispy"], 4) if rps["gateway_redispy"] else None}


def hot_path(tmp: Path, redis_url: str, concurrency: int, duration: float, rounds: int) -> dict[str, Any]:
    """``gateway/resp.py``'s client against redis-py's pipeline on the same Redis, same loop, alternating rounds:
    the client-side cost of the hot path, without the rest of the gateway (in a process of its own)."""
    argv = harness.python("appliance.bench._gateway_redispy", "hot-path", "--redis-url", redis_url,
                          "--concurrency", str(concurrency), "--duration", str(duration), "--rounds", str(rounds))
    return harness.run_json(argv, log=tmp / "hot-path.log", timeout=rounds * 2 * duration + 120)


async def _timed(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                 body: dict[str, Any]) -> tuple[float, str, int]:
    """(seconds, the gateway's X-Cache, prompt tokens the worker reused from its prefix cache)."""
    started = time.perf_counter()
    async with session.post(url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as resp:
        payload = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {payload[:200]!r}")
        elapsed = time.perf_counter() - started
    usage = json.loads(payload).get("usage") or {}
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return elapsed, resp.headers.get("X-Cache", ""), cached


async def _latencies(worker: str, gateway: str, key: str, rounds: int) -> dict[str, Any]:
    direct_h = harness.internal_headers(TOKEN)
    gw_h = {"Authorization": f"Bearer {key}"}
    off = {**gw_h, "Cache-Control": "no-cache, no-store"}
    base = {"model": "gemma-3-270m", "max_tokens": 16, "temperature": 0}
    fixed = {**base, "prompt": "The capital of France is"}
    direct: list[float] = []
    through: list[float] = []
    reused: dict[str, list[int]] = {"direct": [], "through": []}
    misses: list[float] = []
    hits: list[float] = []
    async with aiohttp.ClientSession() as session:
        await _timed(session, worker + "/v1/completions", direct_h, fixed)  # warm both paths
        await _timed(session, gateway + "/v1/completions", off, fixed)
        # The pairs run before any other prompt: with prompt-prefix reuse each side keeps its cached prompt in
        # its own slot (the gateway's requests are scoped to the key, direct ones are not), so a unique prompt
        # sent between pairs would evict one side's slot and charge it a prefill the other side skips.
        for index in range(rounds):
            _progress(f"latency round {index + 1}/{rounds}")
            pair = [("direct", direct, worker, direct_h), ("through", through, gateway, off)]
            for name, samples, base_url, headers in pair if index % 2 == 0 else pair[::-1]:  # ABBA against drift
                elapsed, _, cached = await _timed(session, base_url + "/v1/completions", headers, fixed)
                samples.append(elapsed)
                reused[name].append(cached)
        for index in range(rounds):
            _progress(f"cache round {index + 1}/{rounds}")
            unique = {**base, "prompt": f"Item {index}: the capital of France is"}
            elapsed, state, _ = await _timed(session, gateway + "/v1/completions", gw_h, unique)
            misses.append(elapsed) if state == "MISS" else None
            elapsed, state, _ = await _timed(session, gateway + "/v1/completions", gw_h, unique)
            hits.append(elapsed) if state == "HIT" else None
    p50 = statistics.median
    return {"direct_p50_ms": round(p50(direct) * 1000, 2), "gateway_p50_ms": round(p50(through) * 1000, 2),
            "overhead_ratio": round(p50(through) / p50(direct), 4),
            # Load on a shared machine swings a generation from 0.5 s to 6 s; the ratio within each
            # back-to-back pair is far steadier than the ratio of the two medians.
            "overhead_ratio_paired": round(p50([t / d for t, d in zip(through, direct, strict=True)]), 4),
            # Like for like: both sides should reuse the same cached prompt tokens on every request.
            "cached_tokens_direct": reused["direct"], "cached_tokens_through": reused["through"],
            "miss_p50_ms": round(p50(misses) * 1000, 2) if misses else None,
            "hit_p50_ms": round(p50(hits) * 1000, 3) if hits else None,
            "hit_ratio": round(p50(hits) / p50(misses), 4) if hits and misses else None,
            "rounds": rounds, "hits": len(hits), "misses": len(misses)}


def _progress(message: str) -> None:
    harness.progress("gateway", message)


def real_model(tmp: Path, redis_url: str, rounds: int, data_dir: Path) -> dict[str, Any]:
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama_cpp is not installed, so no real worker can run"}
    from appliance.core.model_files import prepare_default_model

    model = prepare_default_model(data_dir)
    wport = harness.free_port()
    worker = f"http://127.0.0.1:{wport}"
    env = {"APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_DATA_DIR": str(tmp / "data-worker"),
           "APPLIANCE_WORKER_PORT": str(wport), "APPLIANCE_WORKER_MODEL_PATH": str(model),
           "APPLIANCE_LOG_LEVEL": "WARNING", "APPLIANCE_WORKER_SLOTS": "2"}
    with harness.service(harness.python("inference"), env, ready=worker + "/health", log=tmp / "worker.log",
                         timeout=180), \
            _stack(tmp, worker, redis_url, "real") as (gw, key, _):
        return asyncio.run(_latencies(worker, gw, key, rounds))


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser("gateway", __doc__)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    parser.add_argument("--duration-c1", type=float, default=3.0, help="seconds per concurrency-1 latency run")
    parser.add_argument("--rounds", type=int, default=12, help="requests per latency sample")
    parser.add_argument("--throughput-rounds", type=int, default=2,
                        help="rounds of the throughput runs (each side once per round, order rotated)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("APPLIANCE_DATA_DIR", "data")))
    parser.add_argument("--skip-model", action="store_true", help="only the fake-upstream throughput part")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as raw, harness.redis_server(Path(raw)) as redis_url:
        tmp = Path(raw)
        result: dict[str, Any] = {"benchmark": "gateway", "concurrency": args.concurrency}
        _progress("throughput: fake worker direct, through balancer+gateway, and with redis-py on the hot path")
        result["throughput"] = efficiency(tmp, redis_url, args.concurrency, args.duration, args.throughput_rounds,
                                          duration_c1=args.duration_c1)
        _progress(f"throughput done: {result['throughput']}")
        result["redis_hot_path"] = hot_path(tmp, redis_url, args.concurrency, 2.0, 3)
        _progress(f"hot path alone: {result['redis_hot_path']}")
        result["latency"] = ({"skipped": "--skip-model"} if args.skip_model
                             else real_model(tmp, redis_url, args.rounds, args.data_dir))
    result["targets"] = {"overhead_ratio": "<= 1.02", "hit_ratio": "<= 0.02", "gateway_efficiency": ">= 0.35",
                         "added_p50_ms_c1": "<= 2.0"}
    return harness.emit(result, args.json, _render)


def _render(result: Mapping[str, Any]) -> str:
    t, lat = result["throughput"], result["latency"]
    lines = [
        f"throughput (concurrency {result['concurrency']}, fast fake worker):",
        f"  direct           {t['direct_rps']:>9.1f} req/s  p50 {t['direct_p50_ms']} ms  errors {t['direct_errors']}",
        f"  gateway+balancer {t['gateway_rps']:>9.1f} req/s  p50 {t['gateway_p50_ms']} ms  errors "
        f"{t['gateway_errors']}",
        f"  gateway (redis-py pipeline on the hot path) {t['gateway_redispy_rps']:>9.1f} req/s  p50 "
        f"{t['gateway_redispy_p50_ms']} ms  errors {t['gateway_redispy_errors']}",
        f"  gateway_efficiency = {t['gateway_efficiency']}  (target >= 0.35); with redis-py "
        f"{t['gateway_redispy_efficiency']}; resp_over_redispy = {t['resp_over_redispy']}",
        f"  concurrency 1: direct p50 {t['direct_p50_ms_c1']} ms, gateway+balancer p50 {t['gateway_p50_ms_c1']} ms; "
        f"added_p50_ms_c1 = {t['added_p50_ms_c1']}  (target <= 2.0)",
    ]
    hot = result["redis_hot_path"]
    lines.append(f"  hot-path Redis alone (admit script + cache GET, concurrency {hot['concurrency']}): resp "
                 f"{hot['resp_admissions_s']}/s, redis-py pipeline {hot['redispy_admissions_s']}/s, ratio "
                 f"{hot['resp_over_redispy_admissions']}")
    if "skipped" in lat:
        return "\n".join([*lines, f"latency with the real model: skipped ({lat['skipped']})"])
    return "\n".join([
        *lines,
        f"16-token completion, real model, {lat['rounds']} rounds:",
        f"  direct to worker p50 {lat['direct_p50_ms']} ms; through gateway+balancer p50 {lat['gateway_p50_ms']} ms",
        f"  overhead_ratio = {lat['overhead_ratio']}  (target <= 1.02); median of paired ratios "
        f"{lat['overhead_ratio_paired']}",
        f"  cache miss p50 {lat['miss_p50_ms']} ms; hit p50 {lat['hit_p50_ms']} ms",
        f"  hit_ratio = {lat['hit_ratio']}  (target <= 0.02)",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
