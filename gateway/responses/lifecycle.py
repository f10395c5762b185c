"""The response store's life: opened in the app's lifespan, checkpointed and pruned while it runs, closed after."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from appliance.core.errors import overloaded
from gateway.responses.store import ResponseStore
from gateway.settings import GatewaySettings

__all__ = ["CHECKPOINT_EVERY_S", "ResponsesLifecycle"]

CHECKPOINT_EVERY_S = 5.0  # how often the WAL is moved into the database file (and synced), off the request path


class ResponsesLifecycle:
    """Owner of the store and of its pruning task; :meth:`provide` is the handlers' dependency."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._store: ResponseStore | None = None

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        settings = self._settings
        directory = settings.responses_dir or settings.data_dir / "responses"
        store = ResponseStore(directory, settings.responses_retention_days)  # this loop's thread owns its connection
        maintenance = asyncio.get_running_loop().create_task(
            store.run_maintenance(CHECKPOINT_EVERY_S, settings.responses_prune_every_s))
        self._store = store
        try:
            yield
        finally:
            self._store = None
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
            store.close()

    def provide(self) -> ResponseStore:
        if self._store is None:
            raise overloaded("The response store is not open (the gateway is starting or stopping).")
        return self._store
