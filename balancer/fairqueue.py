"""One model's wait queue: weighted fair between API keys, counted in tokens; interactive before batch.

A virtual token counter per key (start-time fair queuing in token units):

- a request costs the slots it occupies (``Demand.slots``: prompts x ``n``, one sequence each);
- every lease charges the key's counter its estimated tokens ÷ its weight (its prompt tokens, every
  prompt's, plus the key's mean generated tokens per sequence, capped by ``max_tokens``, for every
  sequence), and the worker's reported usage corrects the estimate when the request ends;
- a waiting request of the key with the lowest counter goes first, interactive
  always before batch (batch still takes every slot that no interactive request wants);
- on every arrival the key's counter is lifted to the queue's virtual time (the counter
  of the last request dispatched), so a key that was idle banks no credit;
- ``fair=False`` is arrival order, one flow for everyone (the old behaviour; benches).

Pure bookkeeping, no I/O: :class:`balancer.pool.WorkerPool` owns the leases and the futures.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from balancer.worker import Worker

__all__ = ["ANONYMOUS", "BATCH", "INTERACTIVE", "PRIORITIES", "Caller", "Demand", "FairQueue", "Waiter"]

INTERACTIVE, BATCH = 0, 1
PRIORITIES = ("interactive", "batch")
_NO_EXCLUDE: frozenset[Any] = frozenset()
_EWMA = 0.2
_DEFAULT_COMPLETION = 64.0  # generated tokens expected from a key never seen before
_PRUNE_AT = 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking, as the gateway said on the internal hop (the key's id, never the key)."""

    key_id: str = ""
    priority: int = INTERACTIVE
    weight: float = 1.0


ANONYMOUS = Caller()


@dataclass(slots=True)
class Demand:
    """One request's claim on slots: who, how many (``slots`` = prompts x ``n``), its estimated tokens, and its
    prefix chain for routing."""

    caller: Caller = ANONYMOUS
    prompt_tokens: float = 0.0  # every prompt's, together
    max_tokens: int | None = None  # per sequence (each choice of each prompt)
    slots: int = 1  # sequences the worker will run: prompts x n
    route: tuple[int, ...] = ()
    model: str = ""
    charged: float = 0.0  # tokens charged to the caller's counter for the current lease
    held: FairQueue | None = None  # the queue charged, until the lease is settled
    leased_at: float = 0.0
    leased: int = 0  # worker slots the current lease holds: min(slots, the worker's slots) (WorkerPool)
    headroom: int = 0  # of those, slots taken from the model's headroom (WorkerPool)


_seq = itertools.count()


@dataclass(eq=False, slots=True)
class Waiter:
    future: asyncio.Future[Worker]
    demand: Demand = field(default_factory=Demand)
    exclude: Collection[Worker] = field(default=_NO_EXCLUDE)
    enqueued_at: float = 0.0
    seq: int = field(default_factory=lambda: next(_seq))


class FairQueue:
    """Waiters of one model, in per-class, per-key flows; counters outlive the waiters."""

    __slots__ = ("_classes", "_completion", "_counters", "_len", "_running", "_slots", "_vtime", "fair",
                 "slots_charged", "tokens")

    def __init__(self, fair: bool = True) -> None:
        self.fair = fair
        self._classes: tuple[dict[str, deque[Waiter]], ...] = ({}, {})
        self._counters: dict[str, float] = {}
        self._running: dict[str, int] = {}  # leases held per key
        self._slots: dict[str, int] = {}  # sequences those leases run per key (Σ Demand.slots)
        self._completion: dict[str, float] = {}  # EWMA of generated tokens per sequence, per key
        self._vtime = 0.0
        self._len = 0
        self.tokens: dict[str, int] = {}  # tokens served per key (reported, else estimated)
        self.slots_charged: dict[str, int] = {}  # sequences charged per key (prompts x n of each lease kept)

    def __len__(self) -> int:
        return self._len

    @property
    def vtime(self) -> float:
        return self._vtime

    def counter(self, key_id: str) -> float:
        return self._counters.get(key_id, self._vtime)

    def running(self, key_id: str) -> int:
        return self._running.get(key_id, 0)

    def slots(self, key_id: str) -> int:
        """Sequences the key's running requests occupy (prompts x n each)."""
        return self._slots.get(key_id, 0)

    def _flow(self, caller: Caller) -> tuple[int, str]:
        return (caller.priority, caller.key_id) if self.fair else (INTERACTIVE, "")

    # -- arrivals and departures ------------------------------------------------------------
    def arrive(self, caller: Caller) -> None:
        """A request of ``caller`` arrived (queued or not): no credit from idle time."""
        counter = self._counters.get(caller.key_id)
        if counter is None or counter < self._vtime:
            self._counters[caller.key_id] = self._vtime

    def push(self, waiter: Waiter) -> None:
        priority, key = self._flow(waiter.demand.caller)
        flows = self._classes[priority]
        flow = flows.get(key)
        if flow is None:
            flow = flows[key] = deque()
        flow.append(waiter)
        self._len += 1

    def remove(self, waiter: Waiter) -> bool:
        """Take a waiter out (dispatched, timed out, cancelled); False if it was not queued."""
        priority, key = self._flow(waiter.demand.caller)
        flows = self._classes[priority]
        flow = flows.get(key)
        if flow is None:
            return False
        if flow[0] is waiter:
            flow.popleft()
        else:
            try:
                flow.remove(waiter)
            except ValueError:
                return False
        if not flow:
            del flows[key]
        self._len -= 1
        return True

    def drain(self) -> list[Waiter]:
        """Every waiter, queue emptied (no worker left for the model)."""
        waiters = [w for flows in self._classes for flow in flows.values() for w in flow]
        for flows in self._classes:
            flows.clear()
        self._len = 0
        return waiters

    # -- service order ----------------------------------------------------------------------
    def order(self) -> Iterator[Waiter]:
        """Waiters in the order they should get a slot (skipping those already finished)."""
        for flows in self._classes:
            if not flows:
                continue
            if len(flows) == 1:
                keys: list[str] = list(flows)
            else:
                counters, vtime = self._counters, self._vtime
                keys = sorted(flows, key=lambda k: (counters.get(k, vtime), flows[k][0].seq))
            for key in keys:
                for waiter in flows[key]:
                    if not waiter.future.done():
                        yield waiter

    def victim(self, caller: Caller) -> Waiter | None:
        """Whom a newcomer pushes out of a full queue: the newest waiter of the longest flow of the
        lowest class, when that flow is longer than the newcomer's would be (None: refuse the newcomer)."""
        if not self.fair:
            return None
        priority, key = self._flow(caller)
        for lowest in range(len(self._classes) - 1, priority - 1, -1):
            flows = self._classes[lowest]
            if not flows:
                continue
            longest = max(flows, key=lambda k: (len(flows[k]), self._counters.get(k, self._vtime)))
            mine = len(flows.get(key, ())) + 1 if lowest == priority else 0
            if lowest > priority or len(flows[longest]) > mine:
                return flows[longest][-1]
            return None
        return None

    def position(self, waiter: Waiter) -> int:
        """About how many waiters go before this one (keys alternate by counter, costs as estimated)."""
        priority, key = self._flow(waiter.demand.caller)
        ahead = sum(len(flow) for flows in self._classes[:priority] for flow in flows.values())
        flows = self._classes[priority]
        flow = flows.get(key)
        if flow is None:
            return ahead
        index = next((i for i, w in enumerate(flow) if w is waiter), len(flow))
        if not self.fair:
            return ahead + index
        start = self.counter(key) + index * self._step(waiter.demand)
        for other, queued in flows.items():
            if other == key:
                ahead += index
                continue
            step = self._step(queued[0].demand)
            behind = start - self.counter(other)
            ahead += 0 if behind < 0 else min(len(queued), math.floor(behind / step) + 1)
        return ahead

    def _step(self, demand: Demand) -> float:
        caller = demand.caller
        return max(1.0, self._completion.get(caller.key_id, _DEFAULT_COMPLETION) * demand.slots) / caller.weight

    # -- accounting -------------------------------------------------------------------------
    def estimate(self, demand: Demand) -> float:
        """Tokens a lease is charged up front: every prompt, and the expected answer of every sequence."""
        expected = self._completion.get(demand.caller.key_id, _DEFAULT_COMPLETION)
        limit = demand.max_tokens
        if limit is not None and limit < expected:
            expected = float(limit)
        return demand.prompt_tokens + expected * demand.slots

    def charge(self, demand: Demand) -> None:
        """A lease begins: the key pays its estimate now (in-flight work counts at once)."""
        caller = demand.caller
        key = caller.key_id
        vtime = self._vtime
        counter = self._counters.get(key, vtime)
        if counter > vtime:
            self._vtime = counter  # the start tag of the request now served
        cost = self.estimate(demand)
        demand.charged, demand.held = cost, self
        self._counters[key] = counter + cost / caller.weight
        running, slots, charged = self._running, self._slots, self.slots_charged
        running[key] = running.get(key, 0) + 1
        slots[key] = slots.get(key, 0) + demand.slots
        charged[key] = charged.get(key, 0) + demand.slots

    def settle(
        self, demand: Demand, prompt_tokens: int | None, completion_tokens: int | None, *, refund: bool = False
    ) -> None:
        """A lease ends: correct the estimate with what the worker reported (None: not reported);
        ``refund``: nothing was served (a failed attempt, a client gone before the worker answered)."""
        if demand.held is not self:
            return
        demand.held = None
        caller = demand.caller
        key = caller.key_id
        _take(self._running, key, 1)
        _take(self._slots, key, demand.slots)
        used = demand.charged
        if refund:
            if key in self._counters:
                self._counters[key] -= used / caller.weight
            _take(self.slots_charged, key, demand.slots)
            demand.charged = 0.0
            return
        if completion_tokens is not None:
            previous = self._completion.get(key, _DEFAULT_COMPLETION)
            per_sequence = completion_tokens / demand.slots
            self._completion[key] = previous + _EWMA * (per_sequence - previous)
            prompt = demand.prompt_tokens if prompt_tokens is None else float(prompt_tokens)
            used = prompt + completion_tokens
            if key in self._counters:
                self._counters[key] += (used - demand.charged) / caller.weight
        demand.charged = 0.0
        tokens = self.tokens
        tokens[key] = tokens.get(key, 0) + int(used)
        if len(self._counters) > _PRUNE_AT:
            self._prune()

    def _prune(self) -> None:
        """Forget keys that hold nothing and are at or below virtual time (arrival would lift them anyway)."""
        busy = {k for flows in self._classes for k in flows} | set(self._running)
        for key in [k for k, c in self._counters.items() if c <= self._vtime and k not in busy]:
            del self._counters[key]
            self._completion.pop(key, None)
        if len(self.tokens) > _PRUNE_AT:
            kept = sorted(self.tokens.items(), key=lambda item: item[1], reverse=True)[: _PRUNE_AT // 2]
            self.tokens = dict(kept)
            self.slots_charged = {k: self.slots_charged[k] for k, _ in kept if k in self.slots_charged}

    # -- operators --------------------------------------------------------------------------
    def describe(self, now: float) -> list[dict[str, Any]]:
        """Who waits and who runs, per key (for the admin page)."""
        rows: dict[tuple[int, str], dict[str, Any]] = {}
        for priority, flows in enumerate(self._classes):
            for key, flow in flows.items():
                caller = flow[0].demand.caller
                rows[(priority, key)] = {
                    "key_id": key,
                    "priority": PRIORITIES[priority],
                    "weight": caller.weight,
                    "waiting": len(flow),
                    "oldest_wait_s": round(now - flow[0].enqueued_at, 3),
                }
        for key, count in self._running.items():
            row = next((r for (_, k), r in rows.items() if k == key), None)
            if row is None:
                row = rows[(-1, key)] = {
                    "key_id": key,
                    "priority": None,
                    "weight": None,
                    "waiting": 0,
                    "oldest_wait_s": 0.0,
                }
            row["running"] = count
        for row in rows.values():
            key = row["key_id"]
            row.setdefault("running", 0)
            row["slots"] = self._slots.get(key, 0)
            row["counter"] = round(self.counter(key) - self._vtime, 1)
            row["tokens"] = self.tokens.get(key, 0)
            row["slots_charged"] = self.slots_charged.get(key, 0)
        return sorted(rows.values(), key=lambda r: (-r["waiting"], r["key_id"]))

    def depth_by_priority(self) -> tuple[int, ...]:
        return tuple(sum(len(flow) for flow in flows.values()) for flows in self._classes)


def _take(counts: dict[str, int], key: str, amount: int) -> None:
    """Lower a per-key count, forgetting the key at zero (never below)."""
    left = counts.get(key, 0) - amount
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
