"""Worker registry in Redis: workers announce themselves with a heartbeat key that expires.

A worker on any host runs :func:`heartbeat` (its owner cancels it on shutdown and calls
:func:`withdraw`); balancers read :func:`registered_workers`. A worker that stops
heartbeating disappears after ``ttl_s`` and is drained out of every balancer.

Key: ``appliance:workers:<base url>`` → ``{"url": ..., "model": ...}`` with a TTL.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["KEY_PREFIX", "announce", "heartbeat", "registered_workers", "withdraw"]

KEY_PREFIX = "appliance:workers:"


async def announce(client: Redis, url: str, model: str | None = None, ttl_s: float = 10.0) -> None:
    value = json.dumps({"url": url, "model": model})
    await client.set(KEY_PREFIX + url, value, px=max(1, int(ttl_s * 1000)))


async def withdraw(client: Redis, url: str) -> None:
    await client.delete(KEY_PREFIX + url)


async def heartbeat(client: Redis, url: str, model: str | None = None, ttl_s: float = 10.0,
                    interval_s: float | None = None) -> None:
    """Refresh the key every ``interval_s`` (default ttl/3) until cancelled."""
    interval = interval_s if interval_s is not None else ttl_s / 3
    while True:
        await announce(client, url, model, ttl_s)
        await asyncio.sleep(interval)


async def registered_workers(client: Redis) -> dict[str, str | None]:
    """Base URL → model of every worker whose heartbeat key is alive."""
    keys = [key async for key in client.scan_iter(match=KEY_PREFIX + "*", count=500)]
    if not keys:
        return {}
    found: dict[str, str | None] = {}
    for raw in await client.mget(keys):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            entry = json.loads(raw)
            found[str(entry["url"])] = entry.get("model")
        except (ValueError, KeyError, TypeError):
            continue
    return found
