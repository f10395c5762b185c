"""Closed-loop HTTP load generator, run in its own process by the gateway benchmark.

``python -m appliance.bench._gateway_loadgen --url U --concurrency C --duration S --body JSON --headers JSON``
prints ``{"requests", "errors", "rps", "p50_ms"}``. ``{n}`` in the body's strings becomes a request counter,
so every request is distinct (a cache lookup that misses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp

__all__ = ["main"]


async def _run(url: str, headers: dict[str, str], body: str, concurrency: int, duration: float) -> dict[str, Any]:
    counter = 0
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def user() -> None:
            nonlocal counter, errors
            while time.perf_counter() < deadline:
                counter += 1
                data = body.replace("{n}", str(counter)).encode()
                started = time.perf_counter()
                try:
                    async with session.post(url, data=data, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "errors": errors, "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--body", required=True)
    parser.add_argument("--headers", default="{}")
    args = parser.parse_args(argv)
    headers = {"Content-Type": "application/json", **json.loads(args.headers)}
    print(json.dumps(asyncio.run(_run(args.url, headers, args.body, args.concurrency, args.duration))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
