"""A flood of junk cannot grow ``/metrics``: every label value comes from a closed set.

10,000 requests with a unique model or a unique path each, sent at the gateway (a bogus key),
straight at the balancer and at the worker (no internal token), plus requests with a real key naming
models nobody serves (the gateway forwards those: the balancer answers 404): afterwards the
``/metrics`` page of the gateway, the balancer and the worker is as long as before. Real processes
on loopback (the shared security stack: real Redis, a real worker, balancer, RAG and gateway).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request
from collections.abc import Callable

import aiohttp
import pytest

from tests.support.stack import LoopbackAppliance

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FLOOD = 10_000
KEYED = 2_000  # with a real key or the internal token (a Redis or balancer round trip each): fewer
CONCURRENCY = 64
SLACK_LINES = 4  # "within a few lines": nothing here should add a series once the warm-up has run

Request = tuple[str, str, dict[str, str], bytes | None]  # method, url, headers, body


def metric_lines(base: str) -> int:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        return len(response.read().decode().splitlines())


def _chat(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()


def junk(stack: LoopbackAppliance, index: int) -> list[Request]:
    """One round of unauthenticated junk, every model and path unique to ``index``."""
    bogus = {"Authorization": f"Bearer sk-bogus-{index}", "Content-Type": "application/json"}
    plain = {"Content-Type": "application/json"}
    model = f"m-{index}-x"
    return [
        ("POST", f"{stack.gateway}/v1/chat/completions", bogus, _chat(model)),
        ("POST", f"{stack.gateway}/v1/completions", bogus, json.dumps({"model": model, "prompt": "hi"}).encode()),
        ("GET", f"{stack.gateway}/no/such/route-{index}", bogus, None),
        ("GET", f"{stack.gateway}/static/no-such-{index}.js", bogus, None),
        ("DELETE", f"{stack.gateway}/healthz/{index}", bogus, None),
        ("GET", f"{stack.gateway}/v1/models/{model}", bogus, None),
        ("POST", f"{stack.balancer}/v1/chat/completions", plain, _chat(model)),
        ("GET", f"{stack.balancer}/no/such/route-{index}", plain, None),
        ("POST", f"{stack.workers[0]}/v1/chat/completions", plain, _chat(model)),
        ("GET", f"{stack.workers[0]}/v1/models/{model}", plain, None),
        ("GET", f"{stack.workers[0]}/v1/no-such-{index}", plain, None),
    ]


def keyed(stack: LoopbackAppliance, key: str, index: int) -> list[Request]:
    """A real key naming a model nobody serves, at the gateway and (as the gateway forwards it) the balancer."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    internal = {**stack.internal_headers(), "Content-Type": "application/json"}
    return [("POST", f"{stack.gateway}/v1/chat/completions", headers, _chat(f"k-{index}-y")),
            ("POST", f"{stack.balancer}/v1/chat/completions", internal, _chat(f"b-{index}-z"))]


async def send_all(requests: list[Request]) -> dict[int, int]:
    """Send every request, ``CONCURRENCY`` at a time; the count of each status seen."""
    statuses: dict[int, int] = {}
    pending = iter(requests)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def lane() -> None:
            for method, url, headers, body in pending:
                async with session.request(method, url, headers=headers, data=body) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1

        await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
    return statuses


async def flood(
    stack: LoopbackAppliance, make: Callable[[int], list[Request]], start: int, count: int
) -> dict[int, int]:
    per_round = len(make(0))
    rounds = -(-count // per_round)
    return await send_all(list(itertools.chain.from_iterable(make(start + i) for i in range(rounds))))


async def test_a_flood_of_unique_models_and_paths_adds_no_series(security_stack: LoopbackAppliance) -> None:
    stack = security_stack
    key = stack.create_key("cardinality", ("chat",))
    services = {"gateway": stack.gateway, "balancer": stack.balancer, "worker": stack.workers[0]}
    # Warm-up: the first request of each kind may add its fixed series (route "other", model "other", and the
    # scrape of /metrics itself).
    await flood(stack, lambda i: junk(stack, i), 0, 40)
    await flood(stack, lambda i: keyed(stack, key, i), 0, 8)
    for url in services.values():
        metric_lines(url)
    before = {name: metric_lines(url) for name, url in services.items()}

    statuses = await flood(stack, lambda i: junk(stack, i), 1_000_000, FLOOD)
    statuses_keyed = await flood(stack, lambda i: keyed(stack, key, i), 1_000_000, KEYED)

    after = {name: metric_lines(url) for name, url in services.items()}
    print(f"/metrics lines before {before}, after {after}; statuses {statuses}, keyed {statuses_keyed}")
    assert set(statuses) <= {401, 404}, statuses  # refused, never a 5xx
    assert set(statuses_keyed) == {404}, statuses_keyed  # model_not_found, from the balancer or the gateway
    grown = {name: after[name] - before[name] for name in services}
    assert all(lines <= SLACK_LINES for lines in grown.values()), f"/metrics grew by {grown} lines"


async def test_a_served_model_keeps_its_own_label(security_stack: LoopbackAppliance) -> None:
    """The closed set still names what the workers serve: a key's answered chat counts under its model."""
    stack = security_stack
    key = stack.create_key("labelled", ("chat",))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    statuses = await send_all([("POST", f"{stack.gateway}/v1/chat/completions", headers, _chat(stack.model))])
    assert statuses == {200: 1}
    with urllib.request.urlopen(f"{stack.gateway}/metrics", timeout=10) as response:
        page = response.read().decode()
    counted = [line for line in page.splitlines() if line.startswith("appliance_gateway_requests_total{")
               and f'model="{stack.model}"' in line and 'status="200"' in line]
    assert counted, page
    assert f'appliance_gateway_tokens_total{{kind="completion",model="{stack.model}"}}' in page
