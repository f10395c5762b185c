"""The worker pool: membership, exact in-flight accounting, picking, and the wait queue.

Every lease taken with :meth:`WorkerPool.try_acquire` or :meth:`WorkerPool.wait_for_worker`
is given back exactly once with :meth:`WorkerPool.release`; a released slot goes straight
to the oldest waiter that can use it (no thundering herd, no lost wake-ups).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Literal

from balancer.worker import Worker, WorkerState

__all__ = ["NoHealthyWorker", "QueueFull", "QueueTimeout", "Strategy", "WorkerPool"]

Strategy = Literal["least_connections", "round_robin"]
_NO_EXCLUDE: frozenset[Worker] = frozenset()


class NoHealthyWorker(Exception):
    """No worker that could ever take the request is healthy right now."""


class QueueFull(Exception):
    """Every worker is at capacity and the wait queue is full."""


class QueueTimeout(Exception):
    """Every worker stayed at capacity for longer than the queue timeout."""


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[Worker]
    exclude: Collection[Worker] = field(default=_NO_EXCLUDE)


class WorkerPool:
    """Workers grouped by the model they serve; all methods are synchronous except waiting."""

    def __init__(self, strategy: Strategy = "least_connections", queue_size: int = 256,
                 rng: random.Random | None = None) -> None:
        self._strategy = strategy
        self._queue_size = queue_size
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        self._workers: dict[str, Worker] = {}
        self._routable: dict[str, list[Worker]] = {}
        self._waiters: dict[str, deque[_Waiter]] = {}
        self._queued = 0
        self._rr: dict[str, int] = {}

    # -- membership -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def add(self, url: str, source: str = "static") -> Worker:
        """Add a worker (idempotent); it takes no traffic until a probe finds it healthy."""
        worker = self._workers.get(url)
        if worker is None:
            worker = self._workers[url] = Worker(url=url, source=source)
        elif worker.draining:
            worker.draining = False  # re-added while draining: keep it
            self._reindex()
        return worker

    def remove(self, url: str) -> Worker | None:
        """Drain then remove: no new traffic now; gone once its last request ends."""
        worker = self._workers.get(url)
        if worker is None:
            return None
        worker.draining = True
        if worker.inflight == 0:
            del self._workers[url]
        self._reindex()
        return worker

    def models(self) -> list[str]:
        return sorted({w.model for w in self._workers.values() if w.model is not None and not w.draining})

    def routable_models(self) -> list[str]:
        return sorted(m for m, ws in self._routable.items() if ws)

    def has_model(self, model: str) -> bool:
        """Whether any known worker (even unhealthy or draining) serves ``model``: 503, not 404."""
        return any(w.model == model for w in self._workers.values())

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def healthy_count(self) -> int:
        return sum(len(ws) for ws in self._routable.values())

    # -- health ------------------------------------------------------------------------------
    def mark(self, worker: Worker, state: WorkerState, *, model: str | None = None, slots: int | None = None) -> None:
        """Record a health verdict (probe or passive) and re-route accordingly."""
        changed = worker.state is not state
        if state is WorkerState.EJECTED and changed:
            worker.ejections += 1
            worker.abort_pending()
        worker.state = state
        if model is not None and model != worker.model:
            worker.model, changed = model, True
        if slots is not None and slots > 0 and slots != worker.slots:
            worker.slots, changed = slots, True
        if changed:
            self._reindex()

    def _reindex(self) -> None:
        routable: dict[str, list[Worker]] = {}
        for worker in self._workers.values():
            if worker.routable and worker.model is not None:
                routable.setdefault(worker.model, []).append(worker)
        self._routable = routable
        for model in list(self._waiters):
            if routable.get(model):
                self._dispatch(model)
            else:
                self._fail_waiters(model)

    # -- leases ------------------------------------------------------------------------------
    def try_acquire(self, model: str, exclude: Collection[Worker] = _NO_EXCLUDE) -> Worker | None:
        """Take a slot on the best worker with room now, or None."""
        candidates = self._routable.get(model)
        if not candidates:
            return None
        worker = self._pick(model, candidates, exclude)
        if worker is not None:
            worker.inflight += 1
        return worker

    def can_serve(self, model: str, exclude: Collection[Worker] = _NO_EXCLUDE) -> bool:
        """Whether some routable worker (full or not) could take this request."""
        return any(w not in exclude for w in self._routable.get(model, ()))

    def release(self, worker: Worker) -> None:
        if worker.inflight <= 0:
            raise RuntimeError(f"release without a lease on {worker.url}")
        worker.inflight -= 1
        if worker.draining and worker.inflight == 0 and self._workers.get(worker.url) is worker:
            del self._workers[worker.url]
            return
        model = worker.model
        if model is not None and self._queued and self._waiters.get(model):
            self._dispatch(model)

    def _pick(self, model: str, candidates: list[Worker], exclude: Collection[Worker]) -> Worker | None:
        if self._strategy == "round_robin":
            return self._pick_round_robin(model, candidates, exclude)
        best: Worker | None = None
        ties = 0
        for worker in candidates:
            inflight, slots = worker.inflight, worker.slots
            if inflight >= slots or (exclude and worker in exclude):
                continue
            if best is None:
                best, ties = worker, 1
                continue
            # inflight/slots < best.inflight/best.slots, without floats
            lhs, rhs = inflight * best.slots, best.inflight * slots
            if lhs < rhs:
                best, ties = worker, 1
            elif lhs == rhs:
                ties += 1
                if self._rng.random() * ties < 1.0:  # reservoir sampling: uniform among ties
                    best = worker
        return best

    def _pick_round_robin(self, model: str, candidates: list[Worker], exclude: Collection[Worker]) -> Worker | None:
        start = self._rr.get(model, 0)
        count = len(candidates)
        for offset in range(count):
            worker = candidates[(start + offset) % count]
            if worker.inflight < worker.slots and worker not in exclude:
                self._rr[model] = (start + offset + 1) % count
                return worker
        return None

    # -- waiting -----------------------------------------------------------------------------
    async def wait_for_worker(self, model: str, patience_s: float,
                              exclude: Collection[Worker] = _NO_EXCLUDE) -> Worker:
        """Queue until a worker of ``model`` has room; the slot is already taken on return."""
        worker = self.try_acquire(model, exclude)
        if worker is not None:
            return worker
        if not self.can_serve(model, exclude):
            raise NoHealthyWorker(model)
        if self._queued >= self._queue_size:
            raise QueueFull(model)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), exclude)
        self._waiters.setdefault(model, deque()).append(waiter)
        self._queued += 1
        try:
            async with asyncio.timeout(patience_s):
                return await waiter.future
        except TimeoutError:
            if _handed_a_slot(waiter):
                return waiter.future.result()  # the slot came just as the timer fired
            raise QueueTimeout(model) from None
        except asyncio.CancelledError:
            if _handed_a_slot(waiter):
                self.release(waiter.future.result())  # cancelled after the hand-off
            raise
        finally:
            self._forget(model, waiter)

    def _forget(self, model: str, waiter: _Waiter) -> None:
        queue = self._waiters.get(model)
        if queue is None:
            return
        if waiter in queue:
            queue.remove(waiter)
            self._queued -= 1
        if not queue:
            del self._waiters[model]

    def _dispatch(self, model: str) -> None:
        queue = self._waiters.get(model)
        candidates = self._routable.get(model)
        if not queue or not candidates:
            return
        for waiter in list(queue):
            if waiter.future.done():
                continue
            worker = self._pick(model, candidates, waiter.exclude)
            if worker is None:
                if not waiter.exclude:
                    return  # nothing free for anyone
                continue
            worker.inflight += 1
            queue.remove(waiter)
            self._queued -= 1
            waiter.future.set_result(worker)

    def _fail_waiters(self, model: str) -> None:
        queue = self._waiters.pop(model, None)
        while queue:
            waiter = queue.popleft()
            self._queued -= 1
            if not waiter.future.done():
                waiter.future.set_exception(NoHealthyWorker(model))


def _handed_a_slot(waiter: _Waiter) -> bool:
    future = waiter.future
    return future.done() and not future.cancelled() and future.exception() is None
