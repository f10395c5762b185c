"""The worker pool: membership, exact in-flight accounting, leases, and handing slots to waiters.

Every lease taken with :meth:`WorkerPool.try_acquire` or :meth:`WorkerPool.wait_for_worker`
is given back exactly once with :meth:`WorkerPool.release`; a released slot goes straight
to the waiter the model's :class:`~balancer.fairqueue.FairQueue` puts first (no thundering
herd, no lost wake-ups). A lease holds the slots its request will occupy on the worker: one per
sequence (``Demand.slots``, prompts x ``n``), at most the worker's slots (the worker queues the rest of
its sequences itself), so a worker is never sent more than it has free. A waiter that needs more free
slots than any worker has lets smaller waiters behind it go first. Which worker takes a lease is
:class:`~balancer.picking.WorkerPicker`'s choice; the slots kept for interactive keys are
:class:`~balancer.headroom.Headroom`'s; the waiters' queues are :class:`~balancer.waiters.WaitQueues`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Collection, Iterator
from typing import Protocol

from balancer.fairqueue import INTERACTIVE, Demand, FairQueue, Waiter
from balancer.headroom import Headroom
from balancer.picking import Strategy, WorkerPicker
from balancer.prefix import PrefixTable
from balancer.waiters import (
    NoHealthyWorker,
    Notice,
    QueueFull,
    QueueTimeout,
    WaitQueues,
    handed_a_slot,
    wait_with_notices,
)
from balancer.worker import Worker, WorkerState

__all__ = ["NoHealthyWorker", "QueueFull", "QueueTimeout", "Strategy", "WorkerPool"]

_NO_EXCLUDE: frozenset[Worker] = frozenset()


class OnDemand(Protocol):
    """Models a swap host can load (:class:`balancer.swapper.Swapper`): their requests wait for a load
    instead of failing when no worker serves them."""

    def known(self, model: str) -> bool: ...

    def loadable(self, model: str) -> bool: ...

    def queued(self, model: str) -> None: ...

    def released(self, worker: Worker) -> None: ...


class WorkerPool:
    """Workers grouped by the model they serve; all methods are synchronous except waiting."""

    def __init__(self, strategy: Strategy = "least_connections", queue_size: int = 256,
                 rng: random.Random | None = None, *, fair: bool = True, prefixes: PrefixTable | None = None,
                 max_imbalance: float = 0.5, reserve: int = 0) -> None:
        self._on_demand: OnDemand | None = None
        self._headroom = Headroom(reserve if fair else 0)
        self._waiters = WaitQueues(queue_size, fair=fair)
        self._prefixes = prefixes
        self.prefix_routing = prefixes is not None
        self._picker = WorkerPicker(strategy, rng, prefixes=prefixes, max_imbalance=max_imbalance)
        self._workers: dict[str, Worker] = {}
        self._routable: dict[str, list[Worker]] = {}
        # Per model: free slots on its routable workers, Σ max(0, slots - inflight), kept exact by
        # _reindex (from scratch) and every lease and release, so the headroom check costs no walk.
        self._free: dict[str, int] = {}

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
            if self._prefixes is not None:
                self._prefixes.forget(worker)
        self._reindex()
        return worker

    def models(self) -> list[str]:
        return sorted({w.model for w in self._workers.values() if w.model is not None and not w.draining})

    def routable_models(self) -> list[str]:
        return sorted(m for m, ws in self._routable.items() if ws)

    def has_model(self, model: str) -> bool:
        """Whether any known worker (even unhealthy or draining) serves ``model``, or the model catalogue lists it:
        503, not 404."""
        return any(w.model == model for w in self._workers.values()) or (
            self._on_demand is not None and self._on_demand.known(model))

    def attach_on_demand(self, on_demand: OnDemand | None) -> None:
        """The swap driver (it reads this pool, so it is made after it)."""
        self._on_demand = on_demand

    def _loadable(self, model: str) -> bool:
        return self._on_demand is not None and self._on_demand.loadable(model)

    def refresh(self) -> None:
        """Re-route after a change made on a worker outside :meth:`mark` (a swap begun or ended)."""
        self._reindex()

    @property
    def queue_depth(self) -> int:
        return self._waiters.waiting

    def queue(self, model: str) -> FairQueue:
        """The model's queue and fair-share counters (created on first use; kept while the process lives)."""
        return self._waiters.queue(model)

    def queues(self) -> dict[str, FairQueue]:
        return self._waiters.all()

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
        self._free = {model: sum(max(0, w.slots - w.inflight) for w in ws) for model, ws in routable.items()}
        self._headroom.resize(routable)
        for model, queue in self._waiters.all().items():
            if not queue:
                continue
            if routable.get(model):
                self._dispatch(model)
            elif not self._loadable(model):
                self._waiters.fail(model)

    # -- leases ------------------------------------------------------------------------------
    def try_acquire(self, model: str, exclude: Collection[Worker] = _NO_EXCLUDE,
                    demand: Demand | None = None) -> Worker | None:
        """Take a slot on the best worker with room now, or None."""
        candidates = self._routable.get(model)
        if not candidates:
            return None
        wanted = demand.slots if demand is not None else 1
        if (demand is not None and self._headroom.reserve and self._needs_regular_slot(model, demand)
                and self._headroom.only_it_is_free(model, self._free[model])):
            return None
        worker = self._picker.pick(model, candidates, exclude, demand.route if demand is not None else (), wanted)
        if worker is None:
            return None
        if demand is not None and self._headroom.reserve and self._would_take_headroom(model, worker, demand):
            return None
        self._lease(model, worker, demand)
        return worker

    def can_serve(self, model: str, exclude: Collection[Worker] = _NO_EXCLUDE) -> bool:
        """Whether some routable worker (full or not) could take this request."""
        return any(w not in exclude for w in self._routable.get(model, ()))

    def _lease(self, model: str, worker: Worker, demand: Demand | None) -> None:
        need = _need(worker, demand)
        if demand is not None and self._headroom.size(model) and not self._needs_regular_slot(model, demand):
            self._headroom.take(model, demand, need, self._free[model])
        # worker is one of model's routable workers (just picked)
        self._free[model] -= max(0, worker.slots - worker.inflight) - max(0, worker.slots - worker.inflight - need)
        worker.inflight += need
        if demand is None:
            return
        demand.leased = need
        demand.model = model
        self.queue(model).charge(demand)
        demand.leased_at = time.monotonic()
        if self._prefixes is not None and demand.route:
            self._prefixes.record(demand.route, worker)

    def release(self, worker: Worker, demand: Demand | None = None, *, prompt_tokens: int | None = None,
                completion_tokens: int | None = None, refund: bool = False) -> None:
        """Give a slot back; the tokens the worker reported (if any) correct the caller's estimate,
        ``refund`` when nothing was served (the attempt failed or the client left first)."""
        held = demand.leased if demand is not None and demand.leased else 1
        if worker.inflight < held:
            raise RuntimeError(f"release without a lease on {worker.url}")
        before = worker.inflight
        worker.inflight = before - held
        model = worker.model
        if model is not None and worker.routable:
            self._free[model] += max(0, worker.slots - worker.inflight) - max(0, worker.slots - before)
        if demand is not None:
            demand.leased = 0
            self._headroom.give_back(demand)
            self._settle(demand, prompt_tokens, completion_tokens, refund)
        if self._on_demand is not None:
            self._on_demand.released(worker)
        if worker.draining and worker.inflight == 0 and self._workers.get(worker.url) is worker:
            del self._workers[worker.url]
            if self._prefixes is not None:
                self._prefixes.forget(worker)
            return
        if model is not None and self._waiters.waiting:
            queue = self._waiters.get(model)
            if queue:
                self._dispatch(model)

    def _settle(self, demand: Demand, prompt_tokens: int | None, completion_tokens: int | None,
                refund: bool) -> None:
        queue = demand.held
        if queue is None:
            return
        if not refund and self._waiters.waiting:  # the service time feeds queue ETAs: only wanted while some wait
            self._waiters.served(demand.model, time.monotonic() - demand.leased_at)
        queue.settle(demand, prompt_tokens, completion_tokens, refund=refund)

    # -- interactive headroom ------------------------------------------------------------------
    def _would_take_headroom(self, model: str, worker: Worker, demand: Demand) -> bool:
        """Whether leasing ``demand`` on ``worker`` would eat into the unused headroom while the request may
        not take it (a request of several slots may not eat into it either)."""
        if not self._needs_regular_slot(model, demand):
            return False
        return self._headroom.would_be_eaten(model, self._free[model], _need(worker, demand))

    def headroom_in_use(self, model: str) -> int:
        """Headroom slots of ``model`` held by running leases (an interactive key's only request, taken when
        nothing but the headroom was free)."""
        return self._headroom.in_use(model)

    def free_slots(self, model: str) -> int:
        """Free slots on the routable workers of ``model`` (the count the headroom check reads)."""
        return self._free.get(model, 0)

    def _needs_regular_slot(self, model: str, demand: Demand) -> bool:
        """Whether this request may not take the headroom: it is for an interactive key that has nothing
        running (someone at a chat prompt), never for a key's second request or for batch work, so such a
        key waits for a regular slot instead of behind a backlog. Checked first: it costs no walk."""
        caller = demand.caller
        return caller.priority != INTERACTIVE or self.queue(model).running(caller.key_id) > 0

    # -- waiting -----------------------------------------------------------------------------
    async def wait_for_worker(self, model: str, patience_s: float, exclude: Collection[Worker] = _NO_EXCLUDE,
                              demand: Demand | None = None, *, notice: Notice | None = None,
                              notice_after_s: float = 1.0, notice_every_s: float = 1.0) -> Worker:
        """Queue until a worker of ``model`` has room; the slot is already taken on return.

        ``notice`` (streaming requests) is awaited after ``notice_after_s`` of waiting and then
        every ``notice_every_s`` with the waiter, to tell the client where it stands."""
        demand = demand if demand is not None else Demand()
        demand.model = model
        if self._waiters.get(model) is None and not self.can_serve(model, exclude) and not self._loadable(model):
            raise NoHealthyWorker(model)  # before a queue exists for it: a made-up model name must not grow memory
        queue = self.queue(model)
        queue.arrive(demand.caller)
        worker = self.try_acquire(model, exclude, demand)
        if worker is not None:
            return worker
        if not self.can_serve(model, exclude) and not self._loadable(model):
            raise NoHealthyWorker(model)
        if self._waiters.waiting >= self._waiters.size:
            self._waiters.make_room(model, queue, demand)
        waiter = Waiter(asyncio.get_running_loop().create_future(), demand, exclude, time.monotonic())
        self._waiters.push(queue, waiter)
        if self._on_demand is not None:
            self._on_demand.queued(model)
        try:
            async with asyncio.timeout(patience_s):
                if notice is None:
                    return await waiter.future
                return await wait_with_notices(waiter, notice, notice_after_s, notice_every_s)
        except TimeoutError:
            if handed_a_slot(waiter):
                return waiter.future.result()  # the slot came just as the timer fired
            raise QueueTimeout(model) from None
        except BaseException:
            if handed_a_slot(waiter):  # cancelled (or the client left) after the hand-off
                self.release(waiter.future.result(), demand, refund=True)
            raise
        finally:
            self._waiters.forget(queue, waiter)

    def service_time(self, model: str) -> float | None:
        """How long a lease of ``model`` lasts lately, on the high side (None before one was measured)."""
        return self._waiters.service_time(model)

    def position(self, model: str, waiter: Waiter) -> tuple[int, float]:
        """(waiters ahead, estimated seconds until a slot) for a queued request."""
        return self._waiters.position(model, waiter, sum(w.slots for w in self._routable.get(model, ())))

    def _dispatch(self, model: str) -> None:
        queue = self._waiters.get(model)
        candidates = self._routable.get(model)
        if not queue or not candidates:
            return
        while queue:
            only_headroom = bool(self._headroom.reserve) and self._headroom.only_it_is_free(model, self._free[model])
            for waiter in queue.order():
                demand = waiter.demand
                if only_headroom and self._needs_regular_slot(model, demand):
                    continue
                worker = self._picker.pick(model, candidates, waiter.exclude, demand.route, demand.slots)
                if worker is None:
                    if not waiter.exclude and demand.slots <= 1:
                        return  # nothing free for anyone
                    continue  # a worker it may not use, or not room enough for its sequences: the next may fit
                if self._headroom.reserve and self._would_take_headroom(model, worker, demand):
                    continue
                self._waiters.take(queue, waiter)
                self._lease(model, worker, waiter.demand)
                waiter.future.set_result(worker)
                break
            else:
                return


def _need(worker: Worker, demand: Demand | None) -> int:
    """Slots a lease of ``demand`` holds on ``worker``: one per sequence, at most all of the worker's."""
    if demand is None:
        return 1
    return demand.slots if demand.slots < worker.slots else worker.slots
