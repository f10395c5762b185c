"""Background ingestion jobs for large uploads: 202 now, progress over ``GET /jobs/{id}``.

A job's document is acknowledged (durable) once its state is ``succeeded``.
Jobs live in memory: after a restart an unfinished job is gone and its upload
must be sent again; finished documents are in the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.core.errors import APIError

__all__ = ["Job", "JobRunner"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    id: str
    collection: str
    filename: str
    owner: str = ""  # the key the gateway said uploaded it ("" = the operator, straight to this service)
    state: str = "queued"  # queued | running | succeeded | failed
    chunks_done: int = 0
    chunks_total: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)

    def report(self, done: int, total: int) -> None:
        self.chunks_done, self.chunks_total = done, total

    def to_json(self) -> dict[str, Any]:
        progress = (
            1.0 if self.state == "succeeded" else (self.chunks_done / self.chunks_total if self.chunks_total else 0.0)
        )
        return {
            "id": self.id,
            "object": "job",
            "collection": self.collection,
            "filename": self.filename,
            "state": self.state,
            "progress": round(progress, 4),
            "chunks_done": self.chunks_done,
            "chunks_total": self.chunks_total,
            "result": self.result,
            "error": self.error,
            "created_at": int(self.created_at),
        }


class JobRunner:
    """Owns the job tasks: at most ``concurrency`` run at once; ``close`` cancels and awaits them."""

    def __init__(self, concurrency: int = 1, keep: int = 1000) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._keep = keep

    def in_flight(self, owner: str) -> int:
        """Jobs of ``owner`` not finished yet (queued or running)."""
        return sum(job.owner == owner and job.state in ("queued", "running") for job in self._jobs.values())

    def submit(self, collection: str, filename: str, work: Callable[[Job], Awaitable[dict[str, Any]]],
               owner: str = "") -> Job:
        job = Job(f"job_{uuid.uuid4().hex[:24]}", collection, filename, owner)
        self._jobs[job.id] = job
        while len(self._jobs) > self._keep:
            self._jobs.popitem(last=False)
        task = asyncio.create_task(self._run(job, work), name=job.id)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def _run(self, job: Job, work: Callable[[Job], Awaitable[dict[str, Any]]]) -> None:
        async with self._slots:
            job.state = "running"
            try:
                job.result = await work(job)
                job.state = "succeeded"
            except APIError as exc:
                job.error = {**exc.body()["error"], "status": exc.status}
                job.state = "failed"
            except Exception as exc:
                log.exception("ingest job failed", extra={"job": job.id})
                job.error = {
                    "message": f"internal error: {type(exc).__name__}",
                    "type": "server_error",
                    "param": None,
                    "code": "internal_error",
                    "status": 500,
                }
                job.state = "failed"

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
