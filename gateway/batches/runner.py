"""The batch runner: owned by the gateway's lifespan, it takes active batches (one Redis lease each) and
sends their lines, a bounded number at a time, through :class:`gateway.batches.execute.LineSender`.

Exactly once: a line is done when its result line is fsync'd in the run's output or error file
(:class:`gateway.batches.journal.RunJournal`); a runner that takes a batch over (after a restart, or from
a dead gateway whose lease expired) reads those files back and sends only the other lines. A worker
dying under a line, a limit or a busy stack is retried (:class:`Retry`); a line the model refuses (4xx)
lands in the error file. On shutdown the runner stops taking lines and lets the ones in flight finish
(within ``batch_drain_s``; one cut off is simply not done, and is sent again by whoever resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from appliance.core.ids import BatchId, FileId
from appliance.core.request_id import request_id_var
from gateway.batches.execute import LineReply, LineSender, Retry
from gateway.batches.files import FileStore
from gateway.batches.journal import Recovered, RunJournal, result_tokens
from gateway.batches.lines import BatchLine, parse_lines, run_order
from gateway.batches.records import TERMINAL, BatchRecord, BatchStore
from gateway.keys import IDS
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings

__all__ = ["BatchRunner"]

_log = logging.getLogger("gateway.batches")
_SAVE_EVERY_S = 0.5
_EXPIRED = {"code": "batch_expired",
            "message": "This request could not be executed before the completion window expired."}


@dataclass(slots=True)
class _Run:
    """One batch being run here: its record, its files, and why it should stop taking lines."""

    record: BatchRecord
    journal: RunJournal
    digest: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # shutdown, or the lease was lost
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    write: asyncio.Lock = field(default_factory=asyncio.Lock)
    saved_at: float = 0.0

    @property
    def halted(self) -> bool:
        return self.stop.is_set() or self.cancel.is_set()


class BatchRunner:
    def __init__(self, settings: GatewaySettings, *, redis: Redis, store: BatchStore, files: FileStore,
                 sender: LineSender, metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._redis = redis
        self._store = store
        self._files = files
        self._sender = sender
        self._metrics = metrics
        self._owner = secrets.token_hex(8)
        self._slots = asyncio.Semaphore(settings.batch_concurrency)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._runs: dict[str, _Run] = {}
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()

    @property
    def runs_dir(self) -> Path:
        """Where the batches' run directories live (beside the keys' file directories)."""
        return self._files.root / "runs"

    def wake(self) -> None:
        """Look for work now (a batch was just created here)."""
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        """A cancel was just recorded: a run of it here stops taking lines now (elsewhere, at its next poll)."""
        run = self._runs.get(batch_id)
        if run is not None:
            run.cancel.set()
        self._wake.set()

    async def run(self) -> None:
        """Take leased batches until :meth:`stop`; then wait for the batches running here to stop."""
        try:
            while not self._stopping.is_set():
                try:
                    await self._take_work()
                except (RedisError, OSError) as exc:
                    _log.warning("batch runner cannot read the active batches", extra={"error": repr(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.batch_poll_s)
                self._wake.clear()
        finally:
            for run in self._runs.values():
                run.stop.set()
            if self._running:
                await asyncio.wait(set(self._running.values()), timeout=self._settings.batch_drain_s)
            for task in list(self._running.values()):
                task.cancel()
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def _take_work(self) -> None:
        for batch_id in await self._store.active():
            if batch_id in self._running:
                continue
            if len(self._running) >= self._settings.batch_max_running:
                return
            if await self._store.take_lease(batch_id, self._owner, self._lease_ms):
                task = asyncio.get_running_loop().create_task(self._run_batch(batch_id))
                self._running[batch_id] = task
                task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        for batch_id, running in list(self._running.items()):
            if running is task:
                del self._running[batch_id]

    @property
    def _lease_ms(self) -> int:
        return int(self._settings.batch_lease_s * 1000)

    async def _run_batch(self, batch_id: str) -> None:
        journal = RunJournal(self.runs_dir, BatchId.trusted(batch_id))
        keeper: asyncio.Task[None] | None = None
        try:
            if not journal.directory.is_dir() or not await asyncio.to_thread(journal.lock):
                return  # another process still writes it (or nothing to run): leave it to that one
            found = await self._store.get(batch_id)
            if found is None:
                return
            record, cancel_at = found
            digest = await self._redis.hget(IDS, record.key_id)
            run = _Run(record, journal, digest.decode() if isinstance(digest, bytes) else str(digest or ""))
            if cancel_at is not None:
                run.cancel.set()
            self._runs[batch_id] = run
            keeper = asyncio.get_running_loop().create_task(self._keep(run))
            await self._drive(run)
        except Exception:
            _log.exception("batch run failed; it is retried at the next poll", extra={"batch": batch_id})
        finally:
            self._runs.pop(batch_id, None)
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            journal.close()
            with contextlib.suppress(RedisError, OSError):
                await self._store.release_lease(batch_id, self._owner)

    async def _keep(self, run: _Run) -> None:
        """Renew the lease and watch for a cancel, until the run ends."""
        while True:
            await asyncio.sleep(min(self._settings.batch_poll_s, self._settings.batch_lease_s / 3))
            try:
                if not await self._store.renew_lease(run.record.id, self._owner, self._lease_ms):
                    _log.warning("batch lease lost; stopping here", extra={"batch": run.record.id})
                    run.stop.set()
                    return
                found = await self._store.get(run.record.id)
            except (RedisError, OSError):
                continue
            if found is not None and found[1] is not None:
                run.cancel.set()

    async def _drive(self, run: _Run) -> None:
        record = run.record
        if record.status in TERMINAL:
            await self._store.save(record)
            await asyncio.to_thread(run.journal.remove)
            return
        raw = await asyncio.to_thread(run.journal.input_path.read_bytes)
        lines, _ = parse_lines(raw, record.endpoint, allows_model=lambda _m: True, max_lines=1 << 31,
                               max_line_bytes=1 << 62)
        recovered = await asyncio.to_thread(run.journal.recover)
        _apply(record, recovered, total=len(lines))
        if not run.digest:
            await self._finish(run, "failed", errors=[{"code": "key_not_found", "line": None, "param": None,
                                                       "message": "The API key that created this batch is gone."}])
            return
        if record.status == "validating":
            record.status, record.in_progress_at = "in_progress", int(time.time())
        await self._store.save(record)
        pending = [line for line in run_order(lines) if line.custom_id not in recovered.done]
        left = await self._send_all(run, pending)
        if run.stop.is_set():
            await self._store.save(record)
            return
        found = await self._store.get(record.id)  # a cancel asked of another gateway, not polled yet
        if run.cancel.is_set() or (found is not None and found[1] is not None):
            await self._finish(run, "cancelled")
        elif left:
            await self._expire(run, left)
            await self._finish(run, "expired")
        else:
            await self._finish(run, "completed")

    async def _send_all(self, run: _Run, pending: list[BatchLine]) -> list[BatchLine]:
        """Send the lines (a bounded number at once) until done, halted or expired; the lines never started."""
        tasks: set[asyncio.Task[None]] = set()
        left: list[BatchLine] = []
        try:
            for index, line in enumerate(pending):
                await self._slots.acquire()
                if run.halted or time.time() >= run.record.expires_at:
                    self._slots.release()
                    left = pending[index:]
                    break
                task = asyncio.get_running_loop().create_task(self._line(run, line))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _t: self._slots.release())
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        return left

    async def _line(self, run: _Run, line: BatchLine) -> None:
        request_id = f"batch_req_{secrets.token_hex(12)}"
        request_id_var.set(request_id)  # this task's hops carry it (the worker's logs name it)
        reply = await self._attempts(run, line, request_id)
        if reply is None:
            return  # stopped or cancelled while waiting to try again: not done, goes nowhere now
        try:
            body: Any = msgspec.json.decode(reply.body)
        except msgspec.DecodeError:
            body = {"error": {"message": reply.body[:300].decode("utf-8", "replace"), "type": "server_error"}}
        result = {"id": request_id, "custom_id": line.custom_id,
                  "response": {"status_code": reply.status, "request_id": request_id, "body": body}, "error": None}
        await self._write(run, result, error=not 200 <= reply.status < 300)

    async def _attempts(self, run: _Run, line: BatchLine, request_id: str) -> LineReply | None:
        counted = 0
        while True:
            try:
                return await self._sender.send(run.digest, run.record.endpoint, line.body, request_id)
            except Retry as retry:
                counted += retry.counted
                if counted >= self._settings.batch_line_attempts:
                    return retry.reply
                wait = min(30.0, retry.after_s * (2 ** max(0, counted - 1)))
            except Exception:
                _log.exception("batch line failed in the gateway", extra={"batch": run.record.id})
                return LineReply(500, msgspec.json.encode({"error": {
                    "message": "Internal error.", "type": "server_error", "code": "internal_error"}}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_either(run.stop, run.cancel), wait)
            if run.halted:
                return None

    async def _write(self, run: _Run, result: dict[str, Any], *, error: bool) -> None:
        record = run.record
        async with run.write:
            await asyncio.to_thread(run.journal.append, msgspec.json.encode(result) + b"\n", error=error)
            prompt, completion = result_tokens(result)
            record.failed += error
            record.completed += not error
            record.prompt_tokens += prompt
            record.completion_tokens += completion
            self._metrics.batch_lines.labels("failed" if error else "completed").inc()
            self._metrics.count_batch_tokens(prompt, completion)
            if time.monotonic() - run.saved_at >= _SAVE_EVERY_S:
                run.saved_at = time.monotonic()
                with contextlib.suppress(RedisError, OSError):
                    await self._store.save(record)

    async def _expire(self, run: _Run, left: list[BatchLine]) -> None:
        for line in left:
            result = {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": line.custom_id, "response": None,
                      "error": _EXPIRED}
            await self._write(run, result, error=True)

    async def _finish(self, run: _Run, status: str, errors: list[dict[str, Any]] | None = None) -> None:
        """Finalize: publish the output and error files, then record the end (each step idempotent)."""
        record = run.record
        now = int(time.time())
        if record.finalizing_at is None:
            record.status, record.finalizing_at = "finalizing", now
            await self._store.save(record)
        for error in (False, True):
            path = run.journal.output_path(error=error)
            if path.exists() and path.stat().st_size:
                file_id = FileId.trusted(record.err_id if error else record.out_id)
                await asyncio.to_thread(self._files.adopt, record.key_id, path, file_id,
                                        filename=f"{record.id}_{'error' if error else 'output'}.jsonl")
                if error:
                    record.error_file_id = str(file_id)
                else:
                    record.output_file_id = str(file_id)
        record.status, record.errors = status, errors
        setattr(record, f"{status}_at", now)
        await self._store.save(record)
        await asyncio.to_thread(run.journal.remove)
        _log.info("batch ended", extra={"batch": record.id, "status": status, "completed": record.completed,
                                        "failed": record.failed})


def _apply(record: BatchRecord, recovered: Recovered, *, total: int) -> None:
    record.total = total
    record.completed, record.failed = recovered.completed, recovered.failed
    record.prompt_tokens, record.completion_tokens = recovered.prompt_tokens, recovered.completion_tokens


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
