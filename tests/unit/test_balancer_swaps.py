"""The swap policy (balancer/swaps.py) in a discrete-time world of swap hosts, loads and requests.

The world keeps what the balancer keeps (per model, a FIFO of waiting requests; per host, its model, the
requests running on it, a swap target) and applies the policy's answers the way ``balancer.swapper`` does:
a drained host takes no new request and is told to load once nothing runs on it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hypothesis import example, given, settings
from hypothesis import strategies as st

from balancer.swaps import Backlog, Host, Swap, SwapPolicy, plan_swaps, ready_to_load

TICK = 0.1


@dataclass
class SimHost:
    url: str
    model: str | None
    slots: int
    running: list[float] = field(default_factory=list)  # seconds left of each running request
    swap_to: str | None = None
    loading_left: float | None = None
    idle_since: float = float("-inf")


@dataclass
class World:
    hosts: list[SimHost]
    policy: SwapPolicy
    max_wait_s: float
    load_s: float
    pinned: frozenset[str] = frozenset()
    now: float = 0.0
    queues: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)  # model -> (arrived, duration)
    waits: list[tuple[str, float]] = field(default_factory=list)
    swaps: int = 0
    loads_while_running: int = 0
    unserved_since: dict[str, float] = field(default_factory=dict)  # model -> since when it waits with no host
    longest_unserved: float = 0.0

    def arrive(self, model: str, duration: float) -> None:
        self.queues.setdefault(model, deque()).append((self.now, duration))

    def tick(self) -> None:
        self.now += TICK
        for host in self.hosts:
            was_running = bool(host.running)
            host.running = [left - TICK for left in host.running if left - TICK > 1e-9]
            if was_running and not host.running:
                host.idle_since = self.now
            if host.loading_left is not None:
                host.loading_left -= TICK
                if host.loading_left <= 1e-9:
                    host.model, host.swap_to, host.loading_left = host.swap_to, None, None
        self.dispatch()
        self.plan()
        self.watch()

    def watch(self) -> None:
        """How long each model has had requests waiting and no host serving it (what the policy bounds)."""
        served = {h.model for h in self.hosts if h.swap_to is None}
        for model, queue in self.queues.items():
            if queue and model not in served:
                since = self.unserved_since.setdefault(model, self.now)
                self.longest_unserved = max(self.longest_unserved, self.now - since)
            else:
                self.unserved_since.pop(model, None)

    def dispatch(self) -> None:
        for host in self.hosts:
            queue = self.queues.get(host.model) if host.model is not None else None
            while host.swap_to is None and queue and len(host.running) < host.slots:
                arrived, duration = queue.popleft()
                self.waits.append((host.model or "", self.now - arrived))
                host.running.append(duration)

    def views(self) -> list[Host]:
        return [Host(h.url, h.model, len(h.running), pinned=h.model in self.pinned, swap_to=h.swap_to,
                     drain_s=self.drain_s(h), idle_s=0.0 if h.running else self.now - h.idle_since)
                for h in self.hosts]

    def drain_s(self, host: SimHost) -> float:
        """What the balancer estimates: how long the host's running requests, or one it would start next, last."""
        queued = self.queues.get(host.model) if host.model is not None else None
        return max([*host.running, *(d for _, d in queued or ())], default=0.0)

    def plan(self) -> list[Swap]:
        backlogs = {m: Backlog(m, len(q), self.now - q[0][0]) for m, q in self.queues.items() if q}
        served = {h.model for h in self.hosts if h.swap_to is None and h.model is not None}
        swaps = plan_swaps(self.views(), backlogs, served, policy=self.policy, max_wait_s=self.max_wait_s)
        by_url = {h.url: h for h in self.hosts}
        for swap in swaps:
            host = by_url[swap.host]
            assert host.swap_to is None, "a host already swapping was chosen again"
            assert host.model not in self.pinned, "a pinned model was chosen to unload"
            host.swap_to = swap.model
            self.swaps += 1
        for view in ready_to_load(self.views(), {h.url for h in self.hosts if h.loading_left is not None}):
            host = by_url[view.url]
            if host.running:
                self.loads_while_running += 1
            host.loading_left = self.load_s
        return swaps

    def idle(self) -> bool:
        return not any(self.queues.values()) and all(h.swap_to is None for h in self.hosts)


def run(world: World, arrivals: list[tuple[float, str, float]], limit_s: float) -> None:
    pending = deque(sorted(arrivals))
    while world.now < limit_s and (pending or not world.idle()):
        while pending and pending[0][0] <= world.now + 1e-9:
            _, model, duration = pending.popleft()
            world.arrive(model, duration)
        world.dispatch()
        world.tick()


MODELS = ["a", "b", "c", "d"]
arrival = st.tuples(st.floats(0, 30, allow_nan=False).map(lambda t: round(t, 1)), st.sampled_from(MODELS),
                    st.floats(0.1, 4.0, allow_nan=False).map(lambda d: round(d, 1)))


@settings(max_examples=150, deadline=None)
@given(hosts=st.integers(1, 3), models=st.integers(2, 4), slots=st.integers(1, 4),
       initial=st.lists(st.sampled_from([None, *MODELS]), min_size=3, max_size=3),
       max_wait_s=st.sampled_from([0.0, 1.0, 5.0, 10.0]), load_s=st.sampled_from([0.5, 2.0, 5.0]),
       policy=st.sampled_from(["grouped", "fcfs"]), arrivals=st.lists(arrival, max_size=60))
@example(hosts=1, models=2, slots=1, initial=["a", None, None], max_wait_s=5.0, load_s=2.0, policy="grouped",
         arrivals=[(0.0, "a", 4.0), (0.0, "b", 1.0), (0.1, "a", 4.0)])
def test_every_request_is_served_no_model_waits_past_the_bound_and_no_load_runs_under_a_request(
        hosts: int, models: int, slots: int, initial: list[str | None], max_wait_s: float, load_s: float,
        policy: SwapPolicy, arrivals: list[tuple[float, str, float]]) -> None:
    names = MODELS[:models]
    arrivals = [(t, m, d) for t, m, d in arrivals if m in names]
    world = World([SimHost(f"h{i}", initial[i] if initial[i] in names else None, slots) for i in range(hosts)],
                  policy, max_wait_s, load_s)
    run(world, arrivals, limit_s=3000.0)
    assert world.idle(), "a request never got a host (a model starved)"
    assert len(world.waits) == len(arrivals)
    assert world.loads_while_running == 0
    if policy == "grouped" and models <= hosts + 1:
        # A model with requests waiting and no host gets one within: the way of the host it lost to the other
        # model (the end of its running requests, never cut, and a load), the bounded wait, the end of the
        # requests running on the host it takes (at most the longest request) and one load.
        longest = max((d for _, _, d in arrivals), default=0.0)
        bound = max_wait_s + 2 * (longest + load_s) + 3 * TICK
        assert world.longest_unserved <= bound, (world.longest_unserved, bound)


def alternating(world: World, clients_per_model: int, duration: float, seconds: float) -> None:
    """Closed-loop clients of models a and b: each sends its next request as soon as its last one ends."""
    due: list[tuple[float, str]] = [(0.0, m) for m in ("a", "b") for _ in range(clients_per_model)]
    while world.now < seconds:
        for arrived_at, model in [d for d in due if d[0] <= world.now + 1e-9]:
            due.remove((arrived_at, model))
            world.arrive(model, duration)
        served = len(world.waits)
        world.dispatch()
        world.tick()
        due.extend((world.now + duration, model) for model, _ in world.waits[served:])


def test_grouped_swaps_a_third_as_often_as_fcfs_on_alternating_traffic() -> None:
    counts = {}
    for policy in ("grouped", "fcfs"):
        world = World([SimHost("h0", "a", slots=4)], policy, max_wait_s=10.0, load_s=1.5)
        alternating(world, clients_per_model=3, duration=0.5, seconds=300.0)
        counts[policy] = world.swaps
        if policy == "grouped":
            assert world.longest_unserved <= 10.0 + 1.5 + 3 * TICK, world.longest_unserved
    assert counts["grouped"] >= 5
    assert counts["fcfs"] >= 3 * counts["grouped"], counts


def test_a_pinned_model_is_never_unloaded() -> None:
    hosts = [Host("h0", "a", running=0, pinned=True), Host("h1", "b", running=2)]
    backlogs = {"c": Backlog("c", 3, oldest_s=100.0), "b": Backlog("b", 1, oldest_s=1.0)}
    assert plan_swaps(hosts, backlogs, {"a", "b"}, policy="grouped", max_wait_s=5.0) == [Swap("h1", "c")]
    only_pinned = [Host("h0", "a", running=0, pinned=True)]
    for policy in ("grouped", "fcfs"):
        assert plan_swaps(only_pinned, backlogs, {"a"}, policy=policy, max_wait_s=0.0) == []


def test_grouped_keeps_a_busy_host_until_the_bounded_wait_and_fcfs_does_not() -> None:
    hosts = [Host("h0", "a", running=3, drain_s=1.0)]
    young = {"b": Backlog("b", 2, oldest_s=3.0)}
    assert plan_swaps(hosts, young, {"a"}, policy="grouped", max_wait_s=10.0) == []
    assert plan_swaps(hosts, young, {"a"}, policy="fcfs", max_wait_s=10.0) == [Swap("h0", "b")]
    due = {"b": Backlog("b", 2, oldest_s=9.0)}  # 9 s waited + 1 s to drain = the bounded wait
    assert plan_swaps(hosts, due, {"a"}, policy="grouped", max_wait_s=10.0) == [Swap("h0", "b")]


def test_an_empty_or_idle_host_is_taken_first_and_a_host_on_its_way_is_not_taken_twice() -> None:
    hosts = [Host("h0", "a", running=1), Host("h1", None, running=0), Host("h2", "c", running=0)]
    backlogs = {"b": Backlog("b", 1, 0.0), "d": Backlog("d", 1, 0.5)}
    assert plan_swaps(hosts, backlogs, {"a", "c"}, policy="grouped", max_wait_s=30.0) == [
        Swap("h1", "d"), Swap("h2", "b")]
    on_the_way = [Host("h0", "a", running=1, swap_to="b"), Host("h1", None, running=0)]
    assert plan_swaps(on_the_way, {"b": Backlog("b", 4, 50.0)}, {"a"}, policy="grouped", max_wait_s=1.0) == []
    assert ready_to_load(on_the_way, set()) == []  # a request still runs on h0
    drained = [Host("h0", "a", running=0, swap_to="b")]
    assert ready_to_load(drained, set()) == drained
    assert ready_to_load(drained, {"h0"}) == []  # its load is under way
