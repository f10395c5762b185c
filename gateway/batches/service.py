"""The Batch API's parts, built in the app's lifespan: the file store, the batch records, the runner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from appliance.core.errors import overloaded
from appliance.core.ids import BatchId
from gateway.batches.execute import LineSender
from gateway.batches.files import FileStore
from gateway.batches.journal import RunJournal
from gateway.batches.records import BatchStore
from gateway.batches.runner import BatchRunner
from gateway.responses.store import ResponseStore
from gateway.services import GatewayServices
from gateway.settings import GatewaySettings

__all__ = ["Batches", "BatchesLifecycle"]


@dataclass(frozen=True, slots=True)
class Batches:
    """What the files and batches routes use."""

    settings: GatewaySettings
    files: FileStore
    store: BatchStore
    runner: BatchRunner

    def journal(self, batch_id: BatchId) -> RunJournal:
        return RunJournal(self.runner.runs_dir, batch_id)


class BatchesLifecycle:
    """Owner of the runner task (started after the services, stopped and awaited before they close)."""

    def __init__(self, settings: GatewaySettings, services: Callable[[], GatewayServices],
                 responses: Callable[[], ResponseStore]) -> None:
        self._settings = settings
        self._services = services
        self._responses = responses
        self._batches: Batches | None = None

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        settings, svc = self._settings, self._services()
        files = FileStore(settings.files_dir or settings.data_dir / "files",
                          per_key_bytes=settings.files_max_bytes_per_key)
        store = BatchStore(svc.guard.client)
        runner = BatchRunner(settings, redis=svc.guard.client, store=store, files=files,
                             sender=LineSender(svc, self._responses), metrics=svc.metrics)
        self._batches = Batches(settings, files, store, runner)
        task = asyncio.get_running_loop().create_task(runner.run())
        try:
            yield
        finally:
            self._batches = None
            runner.stop()
            await task

    def provide(self) -> Batches:
        if self._batches is None:
            raise overloaded("The batch service is not running (the gateway is starting or stopping).")
        return self._batches
