"""Redis with a short memory of failure, so a dead Redis costs no latency per request.

Every gateway feature that uses Redis degrades instead of failing: callers go
through :meth:`RedisGuard.call` and get :class:`RedisUnavailable` while Redis
is down. ``client`` (redis-py) serves the admin paths; ``pipe`` (pipelined,
one connection) serves the per-request hot path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.hot_redis import HotRedis

__all__ = ["RedisGuard", "RedisUnavailable"]

T = TypeVar("T")
_log = logging.getLogger("gateway.redis")


class RedisUnavailable(Exception):
    """Redis cannot be reached now; the caller degrades."""


class RedisGuard:
    def __init__(self, client: Redis, pipe: HotRedis, backoff_s: float = 1.0) -> None:
        self.client = client
        self.pipe = pipe
        self._backoff_s = backoff_s
        self._down_until = 0.0
        self._was_down = False

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        if not self.up:
            raise RedisUnavailable("redis marked down")
        try:
            result = await operation()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._down_until = time.monotonic() + self._backoff_s
            if not self._was_down:
                _log.warning("redis unavailable, degrading", extra={"error": f"{type(exc).__name__}: {exc}"})
            self._was_down = True
            raise RedisUnavailable(str(exc)) from exc
        if self._was_down:
            _log.info("redis reachable again")
            self._was_down = False
        return result

    async def ping(self) -> bool:
        try:
            await self.pipe.execute("PING")
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return False
        self._down_until = 0.0
        return True
