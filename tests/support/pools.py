"""Balancer pools for unit tests: workers marked healthy with a model and a slot count, no HTTP."""

from __future__ import annotations

from balancer.pool import WorkerPool
from balancer.worker import Worker, WorkerState

__all__ = ["add_healthy"]


def add_healthy(pool: WorkerPool, slots: list[int], model: str) -> tuple[WorkerPool, list[Worker]]:
    """Add ``http://w0``, ``http://w1``… to ``pool``, each healthy for ``model`` with its slot count."""
    workers = []
    for index, count in enumerate(slots):
        worker = pool.add(f"http://w{index}")
        pool.mark(worker, WorkerState.HEALTHY, model=model, slots=count)
        workers.append(worker)
    return pool, workers
