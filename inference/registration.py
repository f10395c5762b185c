"""The worker's entry in the Redis registry: announced once ready, refreshed, withdrawn before it stops serving.

Balancers poll the registry (``appliance.core.registry``): a key that appears adds this worker,
a key that disappears drains it, whether it was withdrawn on a graceful stop or expired
``registry_ttl_s`` after the worker died. Redis being down never stops the worker from serving:
the heartbeat logs once, backs off and announces as soon as Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from appliance.core import registry
from inference.keys import SERVICE, SETTINGS, TOKEN

__all__ = ["REDIS", "REGISTRATION", "Registration", "redis_ctx", "registration_ctx", "withdraw_before_stop"]

log = logging.getLogger(__name__)

# Every Redis call is bounded twice: by the socket timeouts and by wait_for (a stuck connect or a
# half-open socket must not hold the heartbeat or the shutdown).
REDIS_TIMEOUT_S = 2.0
MAX_BACKOFF_S = 8.0
READY_POLL_S = 0.25
RedisFailure = (RedisError, OSError, TimeoutError)


def redis_location(url: str) -> str:
    """``host:port/db`` of a Redis URL, for logs: never the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.hostname or '?'}:{parts.port or 6379}{parts.path or ''}"


class Registration:
    """Keeps this worker's heartbeat key alive while it is ready; owns the heartbeat task."""

    def __init__(
        self,
        client: Redis,
        url: str,
        model: str | None,
        ready: Callable[[], bool],
        *,
        token: str,
        heartbeat_s: float,
        ttl_s: float,
        grace_s: float,
        where: str = "redis",
    ) -> None:
        self._client = client
        self.url = url
        self._model = model
        self._token = token
        self._ready = ready
        self._heartbeat_s = heartbeat_s
        self._ttl_s = ttl_s
        self._grace_s = grace_s
        self._where = where
        self._task: asyncio.Task[None] | None = None
        self.announced = False  # the key was written at least once (so there is something to withdraw)
        self.withdrawn = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-heartbeat")

    async def switch(self, model: str | None) -> None:
        """A swap host serves another model (None: none): announce it now rather than at the next heartbeat."""
        self._model = model
        if self.withdrawn or not self._ready():
            return
        try:
            await self._call(registry.announce(self._client, self.url, self._model, self._token, self._ttl_s))
        except RedisFailure as exc:  # the heartbeat announces it as soon as Redis answers
            log.warning("could not announce the new model", extra={"redis": self._where, "error": type(exc).__name__})
            return
        self.announced = True

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._ready():  # announce only a worker that can serve (health 200)
                await asyncio.sleep(min(self._heartbeat_s, READY_POLL_S))
                continue
            try:
                await self._call(registry.announce(self._client, self.url, self._model, self._token, self._ttl_s))
            except RedisFailure as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "worker registry unreachable; serving directly, retrying",
                        extra={"redis": self._where, "error": f"{type(exc).__name__}: {exc}"[:300]},
                    )
                await asyncio.sleep(
                    min(self._heartbeat_s * 2 ** min(failures, 8), max(MAX_BACKOFF_S, self._heartbeat_s))
                )
                continue
            if failures or not self.announced:
                log.info(
                    "registered in the worker registry",
                    extra={"url": self.url, "model": self._model, "redis": self._where, "ttl_s": self._ttl_s},
                )
            failures, self.announced = 0, True
            await asyncio.sleep(self._heartbeat_s)

    @staticmethod
    async def _call(operation: Awaitable[None]) -> None:
        await asyncio.wait_for(operation, REDIS_TIMEOUT_S)

    async def _stop_heartbeat(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:  # a heartbeat bug must not stop the shutdown that follows
            log.exception("the registry heartbeat had failed")

    async def withdraw(self, *, grace: bool = True) -> None:
        """Delete the key, then (``grace``) keep serving long enough for every balancer to drain us."""
        await self._stop_heartbeat()
        if self.withdrawn or not self.announced:
            return
        self.withdrawn = True
        try:
            await self._call(registry.withdraw(self._client, self.url))
        except RedisFailure as exc:
            log.warning(
                "could not withdraw from the worker registry; the key expires by itself",
                extra={"redis": self._where, "ttl_s": self._ttl_s, "error": f"{type(exc).__name__}"},
            )
            return  # balancers cannot read the registry either: waiting would not drain anything
        log.info(
            "withdrawn from the worker registry", extra={"url": self.url, "grace_s": self._grace_s if grace else 0}
        )
        if grace:
            await asyncio.sleep(self._grace_s)

    async def close(self) -> None:
        """Stop heartbeating; withdraw if still registered (the worker no longer serves: no grace)."""
        await self.withdraw(grace=False)


REGISTRATION = web.AppKey("registration", Registration)
REDIS = web.AppKey("redis", Redis)


def _client(url: str, login: dict[str, Any]) -> Redis:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # No hidden retries: the heartbeat has its own backoff, and shutdown must not wait on a dead Redis.
    return Redis.from_url(
        url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 0),
        **login,
    )


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx, first: the worker's Redis client (the registry, a swap host's catalogue) when ``redis_url``
    is set."""
    settings = app[SETTINGS]
    if not settings.redis_url:
        yield
        return
    client = _client(settings.redis_url, settings.redis_login())
    app[REDIS] = client
    try:
        yield
    finally:
        await client.aclose()


async def registration_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: heartbeat while the app runs when ``redis_url`` is set; withdraw on the way out.

    A swap host is announced while it loads or holds no model too (its ``/health`` says which): balancers
    must find it to give it a model."""
    settings = app[SETTINGS]
    client = app.get(REDIS)
    if client is None:
        yield
        return
    service = app[SERVICE]
    registration = Registration(
        client,
        settings.resolved_advertise_url(),
        service.alias or None,
        lambda: service.health()[0] == 200 or (settings.swap_host and service.state in {"loading", "empty"}),
        token=app[TOKEN],
        heartbeat_s=settings.heartbeat_s,
        ttl_s=settings.registry_ttl_s,
        grace_s=settings.withdraw_grace_s,
        where=redis_location(settings.redis_url),
    )
    app[REGISTRATION] = registration
    registration.start()
    try:
        yield
    finally:
        await registration.close()


async def withdraw_before_stop(app: web.Application) -> None:
    """On a graceful stop, before the listening socket closes: leave the registry, let balancers drain."""
    registration = app.get(REGISTRATION)
    if registration is not None:
        await registration.withdraw()
