"""Health: active probes of each worker's ``/health`` (:class:`~appliance.core.worker_health.WorkerHealth`)
plus passive ejection on request failures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
import msgspec

from appliance.core.worker_health import WorkerHealth, decode_worker_health
from balancer.pool import WorkerPool
from balancer.worker import Worker, WorkerState

__all__ = ["Prober", "note_failure"]

log = logging.getLogger("balancer.health")

# Failures that say the worker itself is gone or stuck (not that the request was bad). Not ``stale``: a
# kept-alive connection closed under a request is retried elsewhere, and the probes judge the worker.
EJECTING_KINDS = frozenset({"connect", "reset", "timeout", "first_byte_timeout"})


def note_failure(pool: WorkerPool, worker: Worker, kind: str, detail: str = "") -> None:
    """Count a failed request; eject the worker at once when the failure says it is down."""
    worker.errors[kind] += 1
    worker.last_error = f"{kind}: {detail}"[:300] if detail else kind
    if kind in EJECTING_KINDS and worker.state is WorkerState.HEALTHY:
        worker.good_probes = 0
        pool.mark(worker, WorkerState.EJECTED)
        log.warning("worker ejected", extra={"worker": worker.url, "kind": kind, "detail": detail[:300]})


class Prober:
    """Probes every worker on an interval; owns no task itself (the app's cleanup_ctx does)."""

    def __init__(self, pool: WorkerPool, session: aiohttp.ClientSession, *, interval_s: float,
                 timeout_s: float, eject_after: int, readmit_after: int,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._pool = pool
        self._session = session
        self._interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._eject_after = eject_after
        self._readmit_after = readmit_after
        self._wall_clock = wall_clock

    async def run(self) -> None:
        while True:
            started = asyncio.get_running_loop().time()
            await self.probe_all()
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, self._interval_s - elapsed))

    async def probe_all(self) -> None:
        workers = list(self._pool)
        if workers:
            await asyncio.gather(*(self.probe(worker) for worker in workers))

    async def probe(self, worker: Worker) -> None:
        """One probe; never raises (a probe failure is a verdict, not an error). A swap host's answer to a probe
        sent before a swap began, or while one runs, is dropped: the swap owns its state until it ends."""
        epoch = worker.swap_epoch
        status, body, error = await self._fetch(worker)
        if worker.swap_to is not None or worker.swap_epoch != epoch:
            return
        worker.last_probe_at = self._wall_clock()
        health: WorkerHealth | None = None
        if body is not None:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                health = decode_worker_health(body)
        if status == 200 and health is not None and health.ready:
            self._good(worker, health)
        elif status == 503 and health is not None and health.status == "empty" and health.swap_host:
            self._empty(worker, health)
        elif status == 503 and health is not None and health.status == "loading":
            worker.last_probe_ok, worker.good_probes, worker.bad_probes = False, 0, 0
            worker.last_error = "loading"
            self._pool.mark(worker, WorkerState.LOADING, model=health.model)
        else:
            self._bad(worker, error or f"/health answered {status}")

    async def _fetch(self, worker: Worker) -> tuple[int, bytes | None, str]:
        try:
            async with self._session.get(f"{worker.url}/health", timeout=self._timeout) as response:
                return response.status, await response.read(), ""
        except TimeoutError:
            return 0, None, "probe timed out"
        except aiohttp.ClientError as exc:
            return 0, None, f"{type(exc).__name__}: {exc}"

    def _good(self, worker: Worker, health: WorkerHealth) -> None:
        worker.last_probe_ok, worker.bad_probes = True, 0
        worker.good_probes += 1
        worker.slots_busy_reported = health.slots_busy or 0
        worker.health = health
        worker.limits = health.limits() or worker.limits
        state = worker.state
        if state is WorkerState.EJECTED and worker.good_probes < self._readmit_after:
            self._pool.mark(worker, state, model=health.model, slots=health.slots_total)
            return
        if state is not WorkerState.HEALTHY:
            log.info("worker healthy", extra={"worker": worker.url, "model": health.model, "was": str(state)})
        worker.last_error = ""
        self._pool.mark(worker, WorkerState.HEALTHY, model=health.model, slots=health.slots_total)

    def _empty(self, worker: Worker, health: WorkerHealth) -> None:
        """A swap host holding no model: healthy, and free to load one (it serves nothing until then)."""
        worker.last_probe_ok, worker.bad_probes, worker.last_error = True, 0, ""
        worker.good_probes += 1
        worker.health = health
        worker.slots_busy_reported = 0
        if worker.model is not None or worker.state is not WorkerState.HEALTHY:
            worker.model = None
            self._pool.mark(worker, WorkerState.HEALTHY)
            self._pool.refresh()

    def _bad(self, worker: Worker, error: str) -> None:
        worker.last_probe_ok, worker.good_probes = False, 0
        worker.bad_probes += 1
        worker.last_error = error[:300]
        state = worker.state
        if state is WorkerState.LOADING or (
            state is WorkerState.HEALTHY and worker.bad_probes >= self._eject_after
        ):
            log.warning("worker failed its probes", extra={"worker": worker.url, "error": error[:300]})
            self._pool.mark(worker, WorkerState.EJECTED)

