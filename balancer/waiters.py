"""The requests waiting for a slot: one fair queue per model, the count across them, and how long a wait takes.

Pure bookkeeping over :class:`~balancer.fairqueue.FairQueue`: :class:`~balancer.pool.WorkerPool` decides
who gets a released slot and hands it over by resolving the waiter's future; a waiter that leaves (timed
out, cancelled, pushed out of a full queue, or no worker left for its model) is forgotten here exactly
once, so the count never drifts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from balancer.fairqueue import Demand, FairQueue, Waiter
from balancer.worker import Worker

__all__ = ["NoHealthyWorker", "Notice", "QueueFull", "QueueTimeout", "WaitQueues", "handed_a_slot",
           "wait_with_notices"]

_SERVICE_EWMA = 0.1
Notice = Callable[[Waiter], Awaitable[None]]


class NoHealthyWorker(Exception):
    """No worker that could ever take the request is healthy right now."""


class QueueFull(Exception):
    """Every worker is at capacity and the wait queue is full."""


class QueueTimeout(Exception):
    """Every worker stayed at capacity for longer than the queue timeout."""


class WaitQueues:
    """Per model, a :class:`FairQueue` (made on first use, kept while the process lives); at most ``size``
    waiters in all."""

    def __init__(self, size: int, *, fair: bool) -> None:
        self.size = size
        self._fair = fair
        self._queues: dict[str, FairQueue] = {}
        self._service_s: dict[str, float] = {}  # EWMA of lease durations per model (queue ETAs)
        self._service_dev: dict[str, float] = {}  # EWMA of their absolute deviation from it
        self.waiting = 0

    def queue(self, model: str) -> FairQueue:
        queue = self._queues.get(model)
        if queue is None:
            queue = self._queues[model] = FairQueue(self._fair)
        return queue

    def get(self, model: str) -> FairQueue | None:
        return self._queues.get(model)

    def all(self) -> dict[str, FairQueue]:
        return dict(self._queues)

    def push(self, queue: FairQueue, waiter: Waiter) -> None:
        queue.push(waiter)
        self.waiting += 1

    def take(self, queue: FairQueue, waiter: Waiter) -> None:
        """``waiter`` is about to get a slot: it leaves its queue."""
        queue.remove(waiter)
        self.waiting -= 1

    def forget(self, queue: FairQueue, waiter: Waiter) -> None:
        """``waiter`` is done waiting, however it ended (a no-op when it already left)."""
        if queue.remove(waiter):
            self.waiting -= 1

    def make_room(self, model: str, queue: FairQueue, demand: Demand) -> None:
        """Full: push out the newest waiter of the longest lower-or-equal flow, or refuse ``demand``."""
        victim = queue.victim(demand.caller) if self.size else None
        if victim is None:
            raise QueueFull(model)
        queue.remove(victim)
        self.waiting -= 1
        if not victim.future.done():
            victim.future.set_exception(QueueFull(model))

    def fail(self, model: str) -> None:
        """No worker serves ``model`` any more: every waiter for it gets :class:`NoHealthyWorker`."""
        queue = self._queues.get(model)
        if queue is None:
            return
        for waiter in queue.drain():
            self.waiting -= 1
            if not waiter.future.done():
                waiter.future.set_exception(NoHealthyWorker(model))

    def served(self, model: str, took_s: float) -> None:
        """A lease of ``model`` lasted ``took_s``: feeds the ETAs."""
        previous = self._service_s.get(model)
        self._service_s[model] = took_s if previous is None else previous + _SERVICE_EWMA * (took_s - previous)
        if previous is not None:
            deviation = self._service_dev.get(model, abs(took_s - previous))
            self._service_dev[model] = deviation + _SERVICE_EWMA * (abs(took_s - previous) - deviation)

    def service_time(self, model: str) -> float | None:
        """A lease's usual length, high side: the mean plus twice the mean deviation (None before one ended)."""
        mean = self._service_s.get(model)
        return None if mean is None else mean + 2 * self._service_dev.get(model, 0.0)

    def position(self, model: str, waiter: Waiter, slots: int) -> tuple[int, float]:
        """(waiters ahead, estimated seconds until a slot) for a queued request; ``slots``: the model's."""
        queue = self._queues.get(model)
        ahead = queue.position(waiter) if queue is not None else 0
        service = self._service_s.get(model, 1.0)
        return ahead, (ahead + 1) * service / (slots or 1)


async def wait_with_notices(waiter: Waiter, notice: Notice, after_s: float, every_s: float) -> Worker:
    """The waiter's worker; ``notice`` is awaited after ``after_s`` without one and every ``every_s`` since."""
    delay = after_s
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), delay)
        except TimeoutError:
            await notice(waiter)
            delay = every_s


def handed_a_slot(waiter: Waiter) -> bool:
    future = waiter.future
    return future.done() and not future.cancelled() and future.exception() is None
