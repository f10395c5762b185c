"""The model catalogue as the balancer reads it: every servable model, loaded or not (contract C1).

Polled from Redis with the worker registry's interval; only entries signed with the internal token count
(:func:`appliance.core.model_catalogue.read_catalogue` drops the others with a warning), so a process that can
write Redis cannot make the balancer ask a swap host to load a file of its choosing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from appliance.core.model_catalogue import read_catalogue
from balancer.swapper import Swapper

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["CatalogueWatcher"]

log = logging.getLogger("balancer.catalogue")


class CatalogueWatcher:
    def __init__(self, swapper: Swapper, client: Redis, poll_s: float, token: str) -> None:
        self._swapper = swapper
        self._client = client
        self._poll_s = poll_s
        self._token = token

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception as exc:  # Redis down: keep the catalogue we know, try again later
                log.warning("model catalogue unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(self._poll_s)

    async def sync(self) -> None:
        catalogue = await read_catalogue(self._client, self._token)
        if catalogue != self._swapper.catalogue:
            log.info("model catalogue changed", extra={"models": sorted(catalogue)})
            self._swapper.catalogue = catalogue
            self._swapper.queued("")  # re-plan: an entry added, removed or (un)pinned
