"""Worker registry in Redis: workers announce themselves with a signed heartbeat key that expires.

A worker on any host runs :func:`heartbeat` (its owner cancels it on shutdown and calls
:func:`withdraw`); balancers read :func:`registered_workers`. A worker that stops
heartbeating disappears after ``ttl_s`` and is drained out of every balancer.

Key: ``appliance:workers:<base url>`` → ``{"url", "model", "expires_ms", "sig"}`` with a TTL. ``sig`` is
HMAC-SHA256 under the internal token over the URL, the model and ``expires_ms``: whoever can write Redis
but does not hold the token (a local process, a leaked Redis password) cannot add a worker, so it can
never make a balancer send it the internal token or a tenant's prompt. A signed entry replayed after it
expired is refused too (``expires_ms`` plus :data:`CLOCK_SKEW_MS` for clocks of different hosts).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "CLOCK_SKEW_MS",
    "KEY_PREFIX",
    "RegistrySnapshot",
    "announce",
    "heartbeat",
    "registered_workers",
    "sign_entry",
    "withdraw",
]

KEY_PREFIX = "appliance:workers:"
# How far a worker's clock may lag a balancer's before its fresh entry looks expired.
CLOCK_SKEW_MS = 30_000
_DOMAIN = b"appliance-worker-registration-v1"


def _signature(token: str, url: str, model: str, expires_ms: int) -> str:
    message = b"\n".join((_DOMAIN, url.encode(), model.encode(), str(expires_ms).encode()))
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def sign_entry(token: str, url: str, model: str | None, expires_ms: int) -> str:
    """The registry value for this worker, signed with the internal token."""
    entry = {"url": url, "model": model, "expires_ms": expires_ms,
             "sig": _signature(token, url, model or "", expires_ms)}
    return json.dumps(entry)


async def announce(client: Redis, url: str, model: str | None, token: str, ttl_s: float = 10.0) -> None:
    ttl_ms = max(1, int(ttl_s * 1000))
    value = sign_entry(token, url, model, int(time.time() * 1000) + ttl_ms)
    await client.set(KEY_PREFIX + url, value, px=ttl_ms)


async def withdraw(client: Redis, url: str) -> None:
    await client.delete(KEY_PREFIX + url)


async def heartbeat(client: Redis, url: str, model: str | None, token: str, *, ttl_s: float = 10.0,
                    interval_s: float | None = None) -> None:
    """Refresh the key every ``interval_s`` (default ttl/3) until cancelled."""
    interval = interval_s if interval_s is not None else ttl_s / 3
    while True:
        await announce(client, url, model, token, ttl_s)
        await asyncio.sleep(interval)


@dataclass
class RegistrySnapshot:
    """``workers``: base URL → model of every verified entry; ``refused``: the keys that failed verification."""

    workers: dict[str, str | None] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


def _verified(raw: bytes | str, key: str, token: str, now_ms: int) -> tuple[str, str | None] | None:
    try:
        entry = json.loads(raw)
        url, model, expires_ms, sig = entry["url"], entry.get("model"), entry["expires_ms"], entry["sig"]
    except (ValueError, KeyError, TypeError):
        return None
    if not (isinstance(url, str) and isinstance(sig, str) and isinstance(expires_ms, int)
            and (model is None or isinstance(model, str))):
        return None
    if key != KEY_PREFIX + url or expires_ms + CLOCK_SKEW_MS < now_ms:
        return None
    if not hmac.compare_digest(sig.encode(), _signature(token, url, model or "", expires_ms).encode()):
        return None
    return url, model


async def registered_workers(client: Redis, token: str,
                             clock: Callable[[], float] = time.time) -> RegistrySnapshot:
    """Every worker whose heartbeat key is alive and signed with ``token``; the other keys as refused."""
    keys = [key async for key in client.scan_iter(match=KEY_PREFIX + "*", count=500)]
    snapshot = RegistrySnapshot()
    if not keys:
        return snapshot
    now_ms = int(clock() * 1000)
    for key, raw in zip(keys, await client.mget(keys), strict=True):
        if raw is None:
            continue  # expired between SCAN and MGET
        name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
        verified = _verified(raw, name, token, now_ms)
        if verified is None:
            snapshot.refused.append(name)
        else:
            snapshot.workers[verified[0]] = verified[1]
    return snapshot
