"""Which worker of a model takes a request: the least loaded, or the next in turn, then prefix affinity.

``least_connections`` picks the worker with the lowest in-flight / slots among those with room for the
request's sequences (ties from a random place, so equal workers share the load); ``round_robin`` the
next with room. With prefix routing (the default), the pick then moves to the least busy worker that
was sent the longest known prefix of the conversation, unless that worker's load is more than
``max_imbalance`` above the pick's (bounded-load affinity: a cached prefix is worth some queueing, not
any). Pure choice over the candidates given: :class:`~balancer.pool.WorkerPool` owns the leases.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Literal

from balancer.prefix import PrefixTable
from balancer.worker import Worker

__all__ = ["Strategy", "WorkerPicker"]

Strategy = Literal["least_connections", "round_robin"]


class WorkerPicker:
    def __init__(self, strategy: Strategy = "least_connections", rng: random.Random | None = None, *,
                 prefixes: PrefixTable | None = None, max_imbalance: float = 0.5) -> None:
        self._strategy = strategy
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        self._prefixes = prefixes
        self._max_imbalance = max_imbalance
        self._rr: dict[str, int] = {}

    def pick(self, model: str, candidates: list[Worker], exclude: Collection[Worker],
             route: tuple[int, ...] = (), wanted: int = 1) -> Worker | None:
        """A worker with room for ``wanted`` sequences (all its slots free when it has fewer)."""
        if self._strategy == "round_robin":
            best = self._round_robin(model, candidates, exclude, wanted)
        else:
            best = self._least_loaded(candidates, exclude, wanted)
        if best is None or not route or self._prefixes is None:
            return best
        return self._by_prefix(model, route, best, exclude, wanted) or best

    def _least_loaded(self, candidates: list[Worker], exclude: Collection[Worker],
                      wanted: int = 1) -> Worker | None:
        best: Worker | None = None
        best_inflight = best_slots = 0
        count = len(candidates)
        start = int(self._rng.random() * count)  # ties go to the first from a random place: spread evenly
        for index in range(start, start + count):
            worker = candidates[index % count] if index >= count else candidates[index]
            inflight, slots = worker.inflight, worker.slots
            if slots - inflight < (wanted if wanted < slots else slots) or (exclude and worker in exclude):
                continue
            # inflight/slots < best's, without floats
            if best is None or inflight * best_slots < best_inflight * slots:
                best, best_inflight, best_slots = worker, inflight, slots
                if not inflight:
                    break  # an idle worker: nothing is less busy
        return best

    def _by_prefix(self, model: str, route: tuple[int, ...], least: Worker,
                   exclude: Collection[Worker], wanted: int = 1) -> Worker | None:
        """The least busy holder of the longest known prefix, unless it is much busier than ``least``."""
        assert self._prefixes is not None
        bound = least.inflight / least.slots + self._max_imbalance
        for holders in self._prefixes.holders(route):
            if least in holders:
                return least  # the least busy worker holds this prefix: nothing to weigh
            chosen: Worker | None = None
            for worker in holders:
                if (worker.model != model or not worker.routable
                        or worker.slots - worker.inflight < min(wanted, worker.slots)
                        or worker.inflight > bound * worker.slots or (exclude and worker in exclude)):
                    continue
                if chosen is None or worker.inflight * chosen.slots < chosen.inflight * worker.slots:
                    chosen = worker
            if chosen is not None:
                return chosen
        return None

    def _round_robin(self, model: str, candidates: list[Worker], exclude: Collection[Worker],
                     wanted: int = 1) -> Worker | None:
        start = self._rr.get(model, 0)
        count = len(candidates)
        for offset in range(count):
            worker = candidates[(start + offset) % count]
            if worker.slots - worker.inflight >= min(wanted, worker.slots) and worker not in exclude:
                self._rr[model] = (start + offset + 1) % count
                return worker
        return None
