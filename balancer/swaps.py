"""The swap policy: which swap host is drained to load which model, and when. Pure choice, no I/O.

A swap host serves one on_demand model at a time. A model with waiting requests and no worker serving it
(nor a host already on its way to it) is *needy*; needy models are taken oldest waiter first, and each gets:

1. an empty host, else an idle one (nothing running, nothing queued for its model; under ``grouped``, for
   :data:`IDLE_GRACE_S` at least, as a client of the model sends its next request just after the last ended);
2. else, by policy:

   - ``grouped`` (default): a host keeps serving its model while that model has work (running or queued),
     until the needy model's oldest request has waited ``max_wait_s``, less the time the host is expected
     to take to finish what runs on it (its drain), so alternating traffic does not swap on every request
     and no model starves; the host given up is the one whose model is least urgent;
   - ``fcfs``: at once, from any host whose model has no request waiting longer than the needy one's
     oldest (llama-swap's first come, first served: swaps whenever the oldest request is for another model).

A host whose model is pinned is never chosen. The chosen host is *drained* (:class:`balancer.swapper.Swapper`
takes it out of routing: every running request ends normally) and told to load only once nothing runs on it
(:func:`ready_to_load`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["IDLE_GRACE_S", "Backlog", "Host", "Swap", "SwapPolicy", "plan_swaps", "ready_to_load"]

SwapPolicy = Literal["grouped", "fcfs"]
IDLE_GRACE_S = 1.0  # capped at the bounded wait


@dataclass(frozen=True, slots=True)
class Host:
    """A swap host as the policy sees it."""

    url: str
    model: str | None  # the model it serves (None: empty)
    running: int  # requests in flight on it
    pinned: bool = False  # its model is pinned: never unloaded
    swap_to: str | None = None  # already draining for, or loading, this model: not free
    drain_s: float = 0.0  # expected seconds until what runs on it has ended
    idle_s: float = float("inf")  # seconds since its last request ended (0 while one runs)


@dataclass(frozen=True, slots=True)
class Backlog:
    """One model's waiting requests."""

    model: str
    waiting: int
    oldest_s: float  # how long its oldest waiting request has waited


@dataclass(frozen=True, slots=True)
class Swap:
    """Drain ``host`` and load ``model`` on it."""

    host: str
    model: str


def plan_swaps(hosts: Iterable[Host], backlogs: Mapping[str, Backlog], served: Collection[str], *,
               policy: SwapPolicy, max_wait_s: float) -> list[Swap]:
    """The swaps to begin now. ``hosts``: the healthy swap hosts; ``backlogs``: the on_demand models' queues;
    ``served``: the models some routable worker serves (a model a host is on its way to counts as served)."""
    hosts = list(hosts)
    on_the_way = {h.swap_to for h in hosts if h.swap_to is not None}
    free = [h for h in hosts if h.swap_to is None and not h.pinned]
    needy = sorted((b for b in backlogs.values() if b.waiting and b.model not in served and b.model not in on_the_way),
                   key=lambda b: (-b.oldest_s, b.model))
    swaps: list[Swap] = []
    for backlog in needy:
        host = _choose(free, backlog, backlogs, policy, max_wait_s)
        if host is None:
            continue
        free.remove(host)
        swaps.append(Swap(host.url, backlog.model))
    return swaps


def _choose(free: list[Host], needy: Backlog, backlogs: Mapping[str, Backlog], policy: SwapPolicy,
            max_wait_s: float) -> Host | None:
    def waiting(host: Host) -> Backlog | None:
        found = backlogs.get(host.model) if host.model is not None else None
        return found if found is not None and found.waiting else None

    empty = [h for h in free if h.model is None]
    if empty:
        return min(empty, key=lambda h: h.url)
    grace = 0.0 if policy == "fcfs" else min(IDLE_GRACE_S, max_wait_s)
    idle = [h for h in free if not h.running and waiting(h) is None and h.idle_s >= grace]
    if idle:
        return min(idle, key=lambda h: h.url)
    if policy == "fcfs":
        behind = [h for h in free if (w := waiting(h)) is None or w.oldest_s <= needy.oldest_s]
        return min(behind, key=lambda h: (h.running, h.url)) if behind else None
    due = [h for h in free if needy.oldest_s + h.drain_s >= max_wait_s]
    if not due:
        return None

    def urgency(host: Host) -> tuple[float, int, str]:
        w = waiting(host)
        return (w.oldest_s if w is not None else -1.0, host.running, host.url)

    return min(due, key=urgency)


def ready_to_load(hosts: Iterable[Host], loading: Collection[str]) -> list[Host]:
    """Hosts drained for a swap with nothing left running and no load under way: tell them to load now.
    A host with a request in flight is never told to load."""
    return [h for h in hosts if h.swap_to is not None and h.running == 0 and h.url not in loading]
