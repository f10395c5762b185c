"""Everything a request handler needs, built once per app and injected with ``Provide``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from litestar.di import NamedDependency

from appliance.core.audit import AuditLog
from gateway.admission import Admission
from gateway.audit_trail import AdminViews
from gateway.auth.web import WebAuth
from gateway.cache import ResponseCache
from gateway.catalog import ModelCatalog
from gateway.keys import KeyStore
from gateway.metrics import GatewayMetrics
from gateway.ownership import CollectionOwners
from gateway.redis_guard import RedisGuard
from gateway.service_client import ServiceClient
from gateway.settings import GatewaySettings

__all__ = ["BackgroundTasks", "GatewayServices", "Services"]

_log = logging.getLogger("gateway.tasks")


class BackgroundTasks:
    """Owner of fire-and-forget work (settling usage after a stream): cancelled and awaited on shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("background task failed", exc_info=task.exception())

    async def drain(self, timeout_s: float = 5.0) -> None:
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


@dataclass(slots=True)
class GatewayServices:
    settings: GatewaySettings
    guard: RedisGuard
    admission: Admission
    cache: ResponseCache
    keys: KeyStore
    balancer: ServiceClient
    rag: ServiceClient
    catalog: ModelCatalog
    metrics: GatewayMetrics
    owners: CollectionOwners
    audit: AuditLog
    admin_views: AdminViews
    web_auth: WebAuth
    fence_secret: str = ""
    tasks: BackgroundTasks = field(default_factory=BackgroundTasks)


# What handlers declare to have the app's ``svc`` dependency injected (by name, explicitly).
Services = NamedDependency[GatewayServices]
