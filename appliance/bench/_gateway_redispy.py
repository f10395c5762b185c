"""redis-py's pipeline on the gateway's hot path, for ``appliance bench gateway``'s side-by-side runs.

A process of its own (it imports the gateway), in one of two roles:

- ``python -m appliance.bench._gateway_redispy`` with the gateway's usual environment (plain HTTP): the gateway,
  the same app and uvicorn options as ``python -m gateway``, with :class:`RedisPyPipeline` as its hot path's
  Redis client instead of ``gateway/resp.py``'s :class:`~gateway.resp.PipelinedRedis`.
- ``python -m appliance.bench._gateway_redispy hot-path --redis-url URL [--concurrency C] [--duration S]
  [--rounds N]``: the hot path's Redis traffic alone (the admission script plus a cache GET in one round trip,
  as ``Admission.admit`` sends them; keys unknown to Redis, so the script answers early) from one event loop,
  with each client in turn, rounds alternated; prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import uvicorn
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from appliance.core.entry import load_or_exit
from gateway.app import create_app
from gateway.hot_redis import Arg, PipelineClient
from gateway.keys import record_key
from gateway.lua import ADMIT
from gateway.resp import PipelinedRedis, Script
from gateway.settings import GatewaySettings


def _as_reply(value: Any) -> Any:
    if isinstance(value, NoScriptError):  # redis-py strips the error's "NOSCRIPT" prefix
        return ResponseError(f"NOSCRIPT {value}")
    return value


class RedisPyPipeline(PipelineClient):
    """redis-py's pipeline (no MULTI) per call, on ``client``'s connection pool; ``close`` leaves the client open.
    Replies as :class:`~gateway.resp.PipelinedRedis` gives them (an ``-ERR`` as a ``ResponseError`` value,
    ``NOSCRIPT`` kept, so :meth:`~gateway.resp.Script.missing` works with either)."""

    def __init__(self, client: Redis) -> None:
        self._client = client

    async def execute_many(self, *commands: Sequence[Arg]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            replies = await pipe.execute(raise_on_error=False)
        return [_as_reply(reply) for reply in replies]

    async def close(self) -> None:
        return None


async def _admissions_per_s(client: Any, concurrency: int, duration: float) -> float:
    script, done = Script(ADMIT), 0
    deadline = time.perf_counter() + duration

    async def user(n: int) -> None:
        nonlocal done
        keys = [record_key(f"bench{n}"), *(f"gw:rl:bench{n}:{kind}" for kind in ("req", "tpm", "tpd", "inflight"))]
        args: list[Arg] = ["chat", "bench-model", f"member{n}", 60, "1"]
        while time.perf_counter() < deadline:
            replies = await client.execute_many(script.command(keys, args), ("GET", f"gw:cache:bench{n}"))
            if Script.missing(replies[0]):
                await client.execute(*script.fallback(keys, args))
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(user(n) for n in range(concurrency)))
    return done / (time.perf_counter() - started)


async def hot_path(redis_url: str, concurrency: int, duration: float, rounds: int) -> dict[str, Any]:
    """Admissions/s of ``gateway/resp.py``'s client and of redis-py's pipeline, same Redis, same loop."""
    pipelined, pool = PipelinedRedis.from_url(redis_url, timeout_s=10), Redis.from_url(redis_url, max_connections=512)
    clients: dict[str, Any] = {"resp": pipelined, "redispy": RedisPyPipeline(pool)}
    rates: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for client in clients.values():  # warm-up: connections, script cache
            await _admissions_per_s(client, concurrency, 0.5)
        for index in range(rounds):
            for name in list(clients)[:: 1 if index % 2 == 0 else -1]:
                rates[name].append(await _admissions_per_s(clients[name], concurrency, duration))
    finally:
        await pipelined.close()
        await pool.aclose()
    resp, redispy = statistics.median(rates["resp"]), statistics.median(rates["redispy"])
    return {"concurrency": concurrency, "rounds": rounds, "resp_admissions_s": round(resp),
            "redispy_admissions_s": round(redispy), "resp_over_redispy_admissions": round(resp / redispy, 3)}


def serve_gateway() -> int:
    settings = load_or_exit(GatewaySettings, "gateway")
    app = create_app(settings, hot_redis=lambda _settings, client: RedisPyPipeline(client))
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False, server_header=False,
                proxy_headers=False)
    return 0


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.bench._gateway_redispy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = parser.add_subparsers(dest="role")
    measure = roles.add_parser("hot-path")
    measure.add_argument("--redis-url", required=True)
    measure.add_argument("--concurrency", type=int, default=64)
    measure.add_argument("--duration", type=float, default=2.0)
    measure.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.role != "hot-path":
        return serve_gateway()
    print(json.dumps(asyncio.run(hot_path(args.redis_url, args.concurrency, args.duration, args.rounds))))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
