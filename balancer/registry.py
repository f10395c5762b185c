"""Membership from the Redis registry: workers on other hosts join and leave without a restart.

Only entries signed with the internal token count (``appliance.core.registry``); one that is not is
ignored and logged once (its key, never its contents), so a process that can write Redis cannot add
itself as a worker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from appliance.core.registry import registered_workers
from balancer.health import Prober
from balancer.pool import WorkerPool
from balancer.settings import normalise_worker_url

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RegistryWatcher"]

log = logging.getLogger("balancer.registry")


class RegistryWatcher:
    """Adds workers whose heartbeat key appears; drains registry workers whose key expired."""

    def __init__(self, pool: WorkerPool, prober: Prober, client: Redis, poll_s: float, token: str) -> None:
        self._pool = pool
        self._prober = prober
        self._client = client
        self._poll_s = poll_s
        self._token = token
        self._refused: set[str] = set()  # keys already logged as refused (forgotten once they disappear)

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception as exc:  # Redis down: keep the workers we know, try again later
                log.warning("registry unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(self._poll_s)

    async def sync(self) -> None:
        snapshot = await registered_workers(self._client, self._token)
        self._log_refused(snapshot.refused)
        alive: set[str] = set()
        for raw_url in snapshot.workers:
            try:
                alive.add(normalise_worker_url(raw_url))
            except ValueError:
                log.warning("ignoring bad registry entry", extra={"url": raw_url[:200]})
        fresh = []
        for url in alive:
            existing = self._pool.get(url)
            if existing is None or existing.draining:
                fresh.append(self._pool.add(url, source="registry"))
        for worker in list(self._pool):
            if worker.source == "registry" and worker.url not in alive and not worker.draining:
                log.info("registry worker expired; draining", extra={"worker": worker.url})
                self._pool.remove(worker.url)
        if fresh:
            log.info("registry workers joined", extra={"workers": [w.url for w in fresh]})
            await asyncio.gather(*(self._prober.probe(worker) for worker in fresh))

    def _log_refused(self, refused: list[str]) -> None:
        current = set(refused)
        for key in sorted(current - self._refused)[:20]:
            log.warning("ignoring a worker registry entry not signed with the internal token (or expired)",
                        extra={"key": key[:200]})
        self._refused = current if len(current) <= 10_000 else set()
