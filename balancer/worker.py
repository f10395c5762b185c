"""One upstream inference worker as the balancer sees it: health, capacity, counters."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from appliance.core.wire import ModelLimits
from appliance.core.worker_health import WorkerHealth

__all__ = ["Worker", "WorkerState"]


class WorkerState(StrEnum):
    UNKNOWN = "unknown"  # added, not probed yet: no traffic
    LOADING = "loading"  # answers /health with 503 while the model loads: no traffic
    HEALTHY = "healthy"
    EJECTED = "ejected"  # failed a request or probes; readmitted after consecutive good probes


@dataclass(eq=False, slots=True)
class Worker:
    """Mutable state of one worker; only the :class:`WorkerPool` changes routing fields."""

    url: str
    source: str = "static"  # static | admin | registry
    model: str | None = None
    slots: int = 1
    state: WorkerState = WorkerState.UNKNOWN
    draining: bool = False
    inflight: int = 0
    good_probes: int = 0
    bad_probes: int = 0
    ejections: int = 0
    last_probe_at: float | None = None  # wall clock, for operators
    last_probe_ok: bool | None = None
    last_error: str = ""
    slots_busy_reported: int = 0
    health: WorkerHealth | None = None  # its last good /health answer
    limits: ModelLimits | None = None  # what the worker accepts, from its /health (published on /v1/models)
    responses: Counter[tuple[str, int]] = field(default_factory=Counter)  # (model, status) → count
    errors: Counter[str] = field(default_factory=Counter)  # kind → count
    # Requests waiting for this worker's first byte, and those aborted because it was ejected.
    pending: set[asyncio.Task[Any]] = field(default_factory=set)
    aborted: set[asyncio.Task[Any]] = field(default_factory=set)
    # Model swapping (balancer.swapper): the model this swap host was told to load next (it takes no new request
    # from then until it serves that model), and a count of swaps begun, so a probe sent before one is dropped.
    swap_to: str | None = None
    swap_epoch: int = 0

    def abort_pending(self) -> None:
        """Cancel every wait for a first byte from this worker; the proxy retries them elsewhere."""
        if not self.pending:
            return
        current = asyncio.current_task()  # a request whose own failure ejects the worker goes on
        for task in self.pending:
            if task is not current and task not in self.aborted:
                self.aborted.add(task)
                task.cancel()

    @property
    def routable(self) -> bool:
        return self.state is WorkerState.HEALTHY and not self.draining and self.swap_to is None

    @property
    def swap_host(self) -> bool:
        """A worker that loads any on_demand catalogue entry when told (``POST /admin/model``)."""
        return self.health is not None and bool(self.health.swap_host)

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "source": self.source,
            "model": self.model,
            "state": "draining" if self.draining or self.swap_to is not None else str(self.state),
            "swap_host": self.swap_host,
            "swap_to": self.swap_to,
            "healthy": self.state is WorkerState.HEALTHY,
            "inflight": self.inflight,
            "slots": self.slots,
            "slots_busy_reported": self.slots_busy_reported,
            "requests": sum(self.responses.values()),
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "ejections": self.ejections,
            "last_probe_at": self.last_probe_at,
            "last_probe_ok": self.last_probe_ok,
            "last_error": self.last_error,
            "health": self.health,
        }
