"""Drives the swap hosts: plans swaps from the queues and the catalogue, drains, loads, re-admits.

A request for an on_demand catalogue entry that no worker serves waits in the model's queue (the pool asks
:meth:`Swapper.loadable`). On every change (a request queued, a lease released, a load ended) and on a short
tick while some model waits, :meth:`Swapper.step` asks :func:`balancer.swaps.plan_swaps` which hosts to give
up; such a host leaves routing at once (``Worker.swap_to``: it takes no new request, every running one ends
normally) and, once nothing runs on it, is sent ``POST /admin/model`` (contract C2); its answer puts it back
in routing under the new model, and the model's queue is served. Each load runs in a task this object owns
and awaits on :meth:`close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from appliance.core.hop import INTERNAL_TOKEN_HEADER
from appliance.core.model_catalogue import CatalogueEntry
from balancer.health import Prober
from balancer.pool import WorkerPool
from balancer.swap_metrics import SwapMetrics
from balancer.swaps import Backlog, Host, SwapPolicy, plan_swaps, ready_to_load
from balancer.worker import Worker, WorkerState

__all__ = ["SwapSettings", "Swapper"]

log = logging.getLogger("balancer.swapper")

_TICK_S = 0.2  # while a model waits: re-plan this often (the bounded wait is measured against the clock)
_IDLE_S = 5.0
_BUSY_RETRY_S = 0.5  # a host that answered 409 worker_busy is asked again after this
_FAILED_HOLD_S = 30.0  # a model whose load failed is not loadable for this long (its waiters get 503)
_FIRST_LOAD_S = 10.0  # a model's load time before one was measured
_EWMA = 0.3


@dataclass(frozen=True, slots=True)
class SwapSettings:
    policy: SwapPolicy = "grouped"
    max_wait_s: float = 30.0
    queue_timeout_s: float = 120.0
    load_timeout_s: float = 600.0


class _LoadAnswer(msgspec.Struct):
    model: str = ""
    load_s: float | None = None
    restored_prefixes: int = 0
    restored_tokens: int = 0


class Swapper:
    def __init__(self, pool: WorkerPool, metrics: SwapMetrics, *, token: str, settings: SwapSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._metrics = metrics
        self._token = token
        self.settings = settings
        self._clock = clock
        self.catalogue: dict[str, CatalogueEntry] = {}
        self._wake = asyncio.Event()
        self._loads: dict[str, asyncio.Task[None]] = {}  # host url -> its load
        self._load_s: dict[str, float] = {}  # model -> EWMA of its load time, seen from here
        self._failed: dict[str, float] = {}  # model -> when its last load failed
        self._idle_since: dict[str, float] = {}  # host url -> when its last request ended
        self.recent_loads: deque[tuple[str, float]] = deque(maxlen=256)  # (model, seconds) of the last loads
        self._session: aiohttp.ClientSession | None = None
        self._prober: Prober | None = None

    def attach(self, session: aiohttp.ClientSession | None, prober: Prober | None) -> None:
        """The admin HTTP session and the prober, opened and closed by the app's lifespan."""
        self._session, self._prober = session, prober

    # -- what the pool asks (balancer.pool.OnDemand) -------------------------------------------
    def known(self, model: str) -> bool:
        return model in self.catalogue

    def on_demand(self, model: str) -> bool:
        entry = self.catalogue.get(model)
        return entry is not None and entry.resident == "on_demand"

    def loadable(self, model: str) -> bool:
        """An on_demand entry some healthy swap host could load (one holding no pinned model)."""
        if not self.on_demand(model):
            return False
        failed = self._failed.get(model)
        if failed is not None and self._clock() - failed < _FAILED_HOLD_S:
            return False
        return any(self._could_take(w, model) for w in self._pool)

    def _could_take(self, worker: Worker, model: str) -> bool:
        if not worker.swap_host or worker.draining or worker.state is not WorkerState.HEALTHY:
            return False
        return worker.model is None or worker.model == model or not self._pinned(worker.model)

    def queued(self, model: str) -> None:
        if model in self.catalogue:
            self._wake.set()

    def released(self, worker: Worker) -> None:
        if worker.inflight == 0 and (worker.swap_to is not None or worker.swap_host):
            self._idle_since[worker.url] = self._clock()
            self._wake.set()

    # -- estimates ------------------------------------------------------------------------------
    def expected_wait(self, model: str) -> float | None:
        """Seconds until ``model`` is served when no worker serves it now and a swap host may load it; None
        when it is served (or not loadable)."""
        if any(w.routable and w.model == model for w in self._pool) or not self.loadable(model):
            return None
        load = self._load_s.get(model, _FIRST_LOAD_S)
        hosts = self._hosts()
        if any(h.swap_to == model for h in hosts):
            return load
        if any(h.swap_to is None and (h.model is None or not h.running) for h in hosts):
            return load
        drain = min((h.drain_s for h in hosts if h.swap_to is None and not h.pinned), default=0.0)
        if self.settings.policy == "fcfs":
            return drain + load
        backlog = self._backlogs().get(model)
        waited = backlog.oldest_s if backlog is not None else 0.0
        return max(0.0, self.settings.max_wait_s - waited - drain) + drain + load

    # -- the loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                self.step()
            except Exception:  # a bug here must not stop swapping for good; logged, tried again next tick
                log.exception("swap planning failed")
            waiting = any(len(q) for m, q in self._pool.queues().items() if m in self.catalogue)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_TICK_S if waiting or self._loads else _IDLE_S):
                    await self._wake.wait()

    def step(self) -> None:
        """Begin the swaps the policy asks for; send the load to every drained host."""
        hosts = self._hosts()
        if not hosts:
            return
        served = {w.model for w in self._pool if w.routable and w.model is not None}
        for swap in plan_swaps(hosts, self._backlogs(), served, policy=self.settings.policy,
                               max_wait_s=self.settings.max_wait_s):
            worker = self._pool.get(swap.host)
            if worker is not None:
                self._drain(worker, swap.model)
        for host in ready_to_load(self._hosts(), self._loads):
            worker = self._pool.get(host.url)
            if worker is not None and worker.swap_to is not None and worker.inflight == 0:
                self._loads[host.url] = asyncio.create_task(self._load(worker, worker.swap_to))

    def _drain(self, worker: Worker, model: str) -> None:
        log.info("swap: draining", extra={"worker": worker.url, "from": worker.model or "", "to": model,
                                           "running": worker.inflight})
        self._metrics.swap_begun(worker.model or "", model)
        worker.swap_to = model
        worker.swap_epoch += 1
        self._pool.refresh()

    def _hosts(self) -> list[Host]:
        """The swap hosts the policy may use: healthy ones, and those it already drains or loads."""
        hosts = []
        now = self._clock()
        for worker in self._pool:
            if not worker.swap_host or worker.draining:
                continue
            if worker.swap_to is None and worker.state is not WorkerState.HEALTHY:
                continue
            model = worker.model
            # A drain lasts about one request of its model: whether one runs now or it would start one next.
            busy = model is not None and (worker.inflight or len(self._pool.queue(model)))
            drain = self._request_s(model) if busy and model is not None else 0.0
            idle = now - self._idle_since.get(worker.url, -math.inf) if not worker.inflight else 0.0
            hosts.append(Host(worker.url, model, worker.inflight, pinned=model is not None and self._pinned(model),
                              swap_to=worker.swap_to, drain_s=drain, idle_s=idle))
        return hosts

    def _request_s(self, model: str) -> float:
        """How long a request of ``model`` lasts, high side; before one was measured, the longest known of another
        catalogue model (a first swap would otherwise count its drain as free)."""
        known = self._pool.service_time(model)
        if known is not None:
            return known
        return max((t for m in self.catalogue if (t := self._pool.service_time(m)) is not None), default=0.0)

    def _backlogs(self) -> dict[str, Backlog]:
        now = time.monotonic()
        backlogs = {}
        for model, queue in self._pool.queues().items():
            entry = self.catalogue.get(model)
            if not len(queue) or entry is None or entry.resident != "on_demand":
                continue
            oldest = min((w.enqueued_at for w in queue.order()), default=now)
            backlogs[model] = Backlog(model, len(queue), now - oldest)
        return backlogs

    def _pinned(self, model: str) -> bool:
        entry = self.catalogue.get(model)
        return entry is not None and entry.pinned

    # -- loads ----------------------------------------------------------------------------------
    async def _load(self, worker: Worker, model: str) -> None:
        started = self._clock()
        try:
            try:
                status, answer = await self._post_load(worker, model)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status, answer = 0, f"{type(exc).__name__}: {exc}"
            took = self._clock() - started
            if status == 200 and isinstance(answer, _LoadAnswer):
                await self._loaded(worker, model, answer, took)
            elif status == 409:  # a request still ran on it (the balancer's count lagged): ask again shortly
                log.warning("swap: host busy; asking again", extra={"worker": worker.url, "model": model})
                await asyncio.sleep(_BUSY_RETRY_S)
            else:
                await self._load_failed(worker, model, status, answer)
        finally:
            self._loads.pop(worker.url, None)
            self._wake.set()

    async def _post_load(self, worker: Worker, model: str) -> tuple[int, _LoadAnswer | str]:
        session = self._session
        if session is None:
            raise aiohttp.ClientConnectionError("balancer not started")
        timeout = aiohttp.ClientTimeout(total=self.settings.load_timeout_s)
        async with session.post(f"{worker.url}/admin/model", json={"model": model}, timeout=timeout,
                                headers={INTERNAL_TOKEN_HEADER: self._token}) as response:
            raw = await response.read()
            if response.status != 200:
                return response.status, raw[:300].decode(errors="replace")
            try:
                return 200, msgspec.json.decode(raw, type=_LoadAnswer)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return 502, "the host's answer is not the load contract's JSON"

    async def _loaded(self, worker: Worker, model: str, answer: _LoadAnswer, took: float) -> None:
        previous = self._load_s.get(model)
        self._load_s[model] = took if previous is None else previous + _EWMA * (took - previous)
        self._failed.pop(model, None)
        self._metrics.load_done(model, took)
        self.recent_loads.append((model, took))
        self._observe_waits(model)
        log.info("swap: loaded", extra={"worker": worker.url, "model": model, "load_s": round(took, 3),
                                         "restored_tokens": answer.restored_tokens})
        entry = self.catalogue.get(model)
        worker.swap_to = None
        worker.swap_epoch += 1
        self._idle_since[worker.url] = self._clock()  # a fresh model gets the grace before it counts as idle
        self._pool.mark(worker, WorkerState.HEALTHY, model=model, slots=entry.slots if entry is not None else None)
        self._pool.refresh()  # serve the model's queue now
        if self._prober is not None:
            await self._prober.probe(worker)  # its limits and slots as it publishes them

    async def _load_failed(self, worker: Worker, model: str, status: int, answer: Any) -> None:
        log.warning("swap: load failed", extra={"worker": worker.url, "model": model, "status": status,
                                                 "error": str(answer)[:300]})
        self._metrics.load_failed(model)
        self._failed[model] = self._clock()
        worker.swap_to = None
        worker.swap_epoch += 1
        worker.model = None  # unknown until probed: it may hold nothing now
        self._pool.mark(worker, WorkerState.UNKNOWN)
        self._pool.refresh()  # the model's waiters get 503 (not loadable for a while)
        if self._prober is not None:
            await self._prober.probe(worker)

    def _observe_waits(self, model: str) -> None:
        queue = self._pool.queues().get(model)
        if queue is None:
            return
        now = time.monotonic()
        for waiter in queue.order():
            self._metrics.swap_wait.observe(now - waiter.enqueued_at)

    async def close(self) -> None:
        """Cancel and await the loads under way (the hosts finish theirs; the next balancer sees the result)."""
        tasks = list(self._loads.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
