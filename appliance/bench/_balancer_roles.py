"""The processes behind ``bench balancer``: fake upstreams, a naive proxy baseline, load generators.

Each runs in its own process (``python -m appliance.bench balancer --role ...``) so the
load generator never shares an interpreter with what it measures.

- fake upstreams: the fake worker of :mod:`appliance.bench.fake_worker`, ``aiohttp`` (the one the
  tests use, answering at once) or ``raw`` (its lean asyncio protocol with one fixed completion).
- naive proxy: the 40-line aiohttp proxy with none of the balancer's features, as a
  reference measured in the same run.
- load generators: ``aiohttp`` (ClientSession, keep-alive) or ``raw`` (lean HTTP/1.1
  keep-alive protocol). Both keep ``concurrency`` requests in flight for a fixed time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from typing import Any

from appliance.bench.fake_worker import RAW_MODEL, FakeState, content_length, serve, serve_raw
from appliance.core.hop import INTERNAL_TOKEN_HEADER

__all__ = ["new_loop", "percentile", "run_load", "serve_naive_proxy", "serve_upstreams"]

REQUEST_BODY = json.dumps({"model": RAW_MODEL, "messages": [{"role": "user", "content": "Say ok."}],
                           "max_tokens": 1}).encode()


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def serve_upstreams(ports: list[int], kind: str) -> None:
    """The fake workers on ``ports``: the aiohttp fake (answering at once) or the lean raw one."""
    fake = serve_raw(ports) if kind == "raw" else serve(ports, FakeState(model=RAW_MODEL))
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(fake)


def serve_naive_proxy(port: int, upstreams: list[str]) -> None:
    """Round-robin, no health, no retries, no metrics, no limits: the floor to compare with."""
    import aiohttp
    from aiohttp import web

    targets = itertools.cycle(upstreams)
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> Any:
        app[session_key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[session_key].close()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        async with request.app[session_key].post(next(targets) + request.path, data=body,
                                                 headers={"Content-Type": "application/json"}) as upstream:
            return web.Response(body=await upstream.read(), status=upstream.status, content_type="application/json")

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=new_loop())


class _RawClient(asyncio.Protocol):
    def __init__(self) -> None:
        self._buffer = b""
        self.waiter: asyncio.Future[int] | None = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        size = end + 4 + content_length(self._buffer[:end])
        if len(self._buffer) >= size and self.waiter is not None and not self.waiter.done():
            status = int(self._buffer[9:12])
            self._buffer = self._buffer[size:]
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed by the server"))


async def _raw_connection(host: str, port: int, request: bytes, record: Any, stop: float) -> None:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(_RawClient, host, port)
    try:
        while (started := time.perf_counter()) < stop:
            client.waiter = loop.create_future()
            transport.write(request)
            record(started, await client.waiter)
    finally:
        transport.close()


async def run_load(targets: list[tuple[str, int]], *, client: str, path: str, token: str, concurrency: int,
                   warmup_s: float, duration_s: float) -> dict[str, Any]:
    """Keep ``concurrency`` requests in flight; count only those started after the warm-up."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    start = time.perf_counter() + warmup_s
    stop = start + duration_s

    def record(started: float, status: int) -> None:
        if started >= start:
            latencies.append(time.perf_counter() - started)
            statuses[str(status)] = statuses.get(str(status), 0) + 1

    headers = {"Content-Type": "application/json", INTERNAL_TOKEN_HEADER: token}
    if client == "raw":
        def raw_request(host: str, port: int) -> bytes:
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}"
                    f"Content-Length: {len(REQUEST_BODY)}\r\n\r\n").encode() + REQUEST_BODY

        await asyncio.gather(*(_raw_connection(h, p, raw_request(h, p), record, stop)
                               for h, p in (targets[i % len(targets)] for i in range(concurrency))))
    else:
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def loop(url: str) -> None:
                while (started := time.perf_counter()) < stop:
                    async with session.post(url, data=REQUEST_BODY, headers=headers) as response:
                        await response.read()
                    record(started, response.status)

            await asyncio.gather(*(loop(f"http://{h}:{p}{path}")
                                   for h, p in (targets[i % len(targets)] for i in range(concurrency))))
    return {"requests": len(latencies), "rps": len(latencies) / duration_s, "statuses": statuses,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000}
