"""Interactive headroom: a few slots per model kept free for an interactive key that has nothing running.

With fair scheduling, a chat request from someone at a prompt starts at once even behind another key's
backlog: up to ``reserve`` slots of a model (at most a quarter of its slots, so a small pool keeps every
slot busy) are not leased to anyone else. A slot such a request takes that way counts as headroom in use
until its lease ends: no further slot is held back for the next one (only ``reserve`` slots ever idle
for it). Pure bookkeeping: :class:`~balancer.pool.WorkerPool` says who may take it and what is free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from balancer.fairqueue import Demand
from balancer.worker import Worker

__all__ = ["Headroom"]


class Headroom:
    __slots__ = ("_size", "_used", "reserve")

    def __init__(self, reserve: int) -> None:
        self.reserve = reserve
        self._size: dict[str, int] = {}  # per model: min(reserve, its slots // 4)
        self._used: dict[str, int] = {}  # per model: headroom slots held by running leases

    def resize(self, routable: Mapping[str, Sequence[Worker]]) -> None:
        """The routable workers changed: each model's headroom follows its slots."""
        self._size = {model: min(self.reserve, sum(w.slots for w in ws) // 4) for model, ws in routable.items()}

    def size(self, model: str) -> int:
        return self._size.get(model, 0)

    def in_use(self, model: str) -> int:
        return self._used.get(model, 0)

    def unused(self, model: str) -> int:
        return self._size.get(model, 0) - self._used.get(model, 0)

    def only_it_is_free(self, model: str, free: int) -> bool:
        """Whether no more than the unused headroom is free among ``free`` slots."""
        return free <= self.unused(model)

    def would_be_eaten(self, model: str, free: int, need: int) -> bool:
        """Whether leasing ``need`` of ``free`` slots would leave less free than the unused headroom."""
        return free - need < self.unused(model)

    def take(self, model: str, demand: Demand, need: int, free: int) -> None:
        """A lease of ``need`` slots that may use the headroom: the part of it beyond the regular free slots
        is headroom in use until :meth:`give_back`."""
        unused = self.unused(model)
        taken = min(unused, need - min(need, max(0, free - unused)))
        if taken > 0:
            demand.headroom = taken
            self._used[model] = self._used.get(model, 0) + taken

    def give_back(self, demand: Demand) -> None:
        if demand.headroom:
            self._used[demand.model] -= demand.headroom
            demand.headroom = 0
