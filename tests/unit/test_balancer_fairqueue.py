"""The balancer's weighted fair queue: nothing lost or served twice, interactive first, shares follow weights."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from balancer.fairqueue import BATCH, INTERACTIVE, Caller, Demand, FairQueue, Waiter
from balancer.pool import QueueFull, QueueTimeout, WorkerPool
from balancer.worker import Worker
from tests.support.pools import add_healthy

MODEL = "m"


def healthy_pool(
    slots: list[int], queue_size: int = 64, fair: bool = True, reserve: int = 0
) -> tuple[WorkerPool, list[Worker]]:
    pool = WorkerPool("least_connections", queue_size, random.Random(0), fair=fair, reserve=reserve)
    return add_healthy(pool, slots, MODEL)


async def settle_loop() -> None:
    for _ in range(4):
        await asyncio.sleep(0)


class FairPoolMachine(RuleBasedStateMachine):
    """Requests of several keys and classes arrive, finish and give up in any order against 3 slots."""

    SLOTS = (2, 1)
    RESERVE = 0  # interactive headroom asked for (the pool keeps at most a quarter of its slots)

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pool, self.workers = healthy_pool(list(self.SLOTS), queue_size=5, reserve=self.RESERVE)
        self.headroom = min(self.RESERVE, sum(self.SLOTS) // 4)
        self.requests: list[tuple[Demand, asyncio.Task[Worker]]] = []
        self.released: set[int] = set()

    def _run(self) -> None:
        self.loop.run_until_complete(settle_loop())

    def _holding(self) -> list[tuple[Demand, asyncio.Task[Worker]]]:
        return [
            (d, t)
            for d, t in self.requests
            if t.done() and not t.cancelled() and t.exception() is None and id(t) not in self.released
        ]

    def _waiting(self) -> list[tuple[Demand, asyncio.Task[Worker]]]:
        return [(d, t) for d, t in self.requests if not t.done()]

    @rule(
        key=st.sampled_from(["a", "b", "c"]),
        batch=st.booleans(),
        weight=st.sampled_from([1.0, 3.0]),
        prompt=st.integers(1, 500),
    )
    def arrive(self, key: str, batch: bool, weight: float, prompt: int) -> None:
        demand = Demand(Caller(key, BATCH if batch else INTERACTIVE, weight), prompt_tokens=prompt)
        task = self.loop.create_task(self.pool.wait_for_worker(MODEL, 1000.0, demand=demand))
        self.requests.append((demand, task))
        self._run()

    @precondition(lambda self: bool(self._holding()))
    @rule(data=st.data(), completion=st.integers(0, 300))
    def finish(self, data: st.DataObject, completion: int) -> None:
        demand, task = data.draw(st.sampled_from(self._holding()))
        waiting_interactive = {id(t) for d, t in self._waiting() if d.caller.priority == INTERACTIVE}
        waiting_before = {id(t) for _, t in self._waiting()}
        self.released.add(id(task))
        self.pool.release(
            task.result(), demand, prompt_tokens=round(demand.prompt_tokens), completion_tokens=completion
        )
        self._run()
        started = [(d, t) for d, t in self._holding() if id(t) in waiting_before]
        # One released slot serves one waiter; with headroom, the release can also make the releasing key's
        # next waiter eligible for an idle headroom slot.
        assert len(started) <= 1 + self.headroom, "one released slot, one waiter served"
        if any(d.caller.priority == BATCH for d, _ in started):
            still = {id(t) for _, t in self._waiting()}
            assert not waiting_interactive & still, "a batch request went before a waiting interactive one"

    @precondition(lambda self: bool(self._waiting()))
    @rule(data=st.data())
    def give_up(self, data: st.DataObject) -> None:
        _, task = data.draw(st.sampled_from(self._waiting()))
        task.cancel()
        self._run()

    @invariant()
    def nothing_lost_nothing_twice(self) -> None:
        holding = self._holding()
        assert sum(w.inflight for w in self.workers) == len(holding)
        assert self.pool.queue_depth == len(self._waiting())
        for _, task in self.requests:
            if task.done() and not task.cancelled() and task.exception() is not None:
                assert isinstance(task.exception(), QueueFull)

    @invariant()
    def headroom_in_use_is_exact(self) -> None:
        """Only interactive requests run in the headroom (the key's only one when it got there; it may send
        more since), never more of them than the headroom, and the pool counts each."""
        taken = [d for d, _ in self._holding() if d.headroom]
        assert self.pool.headroom_in_use(MODEL) == len(taken) <= self.headroom
        assert all(demand.caller.priority == INTERACTIVE for demand in taken)

    @invariant()
    def no_idle_slot_while_someone_waits(self) -> None:
        """Beyond the unused headroom no slot idles while someone waits (a headroom slot in use is not held
        back a second time), and the headroom idles only while every waiter is batch or has a request of its
        key running."""
        if not self.pool.queue_depth:
            return
        free = sum(w.slots - w.inflight for w in self.workers)
        assert self.pool.free_slots(MODEL) == free
        assert free <= self.headroom - self.pool.headroom_in_use(MODEL)
        if free:
            queue = self.pool.queue(MODEL)
            for demand, _ in self._waiting():
                caller = demand.caller
                assert caller.priority == BATCH or queue.running(caller.key_id) > 0, (caller, free)

    @invariant()
    def running_counts_per_key_are_exact(self) -> None:
        queue = self.pool.queue(MODEL)
        held = Counter(d.caller.key_id for d, _ in self._holding())
        for key in ("a", "b", "c"):
            assert queue.running(key) == held[key]

    def teardown(self) -> None:
        try:
            for _ in range(len(self.requests) + 1):  # every waiter is served once slots come back
                holding = self._holding()
                if not holding:
                    break
                for demand, task in holding:
                    self.released.add(id(task))
                    self.pool.release(task.result(), demand, prompt_tokens=1, completion_tokens=1)
                self._run()
            assert all(t.done() for _, t in self.requests)
            assert self.pool.queue_depth == 0 and all(w.inflight == 0 for w in self.workers)
        finally:
            self.loop.close()


TestFairPoolMachine = FairPoolMachine.TestCase
TestFairPoolMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


class HeadroomPoolMachine(FairPoolMachine):
    """The same against 4 slots with one kept for interactive keys that have nothing running."""

    SLOTS = (2, 2)
    RESERVE = 1


TestHeadroomPoolMachine = HeadroomPoolMachine.TestCase
TestHeadroomPoolMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


class CostPoolMachine(FairPoolMachine):
    """Requests of 1 to 6 sequences (prompts x n) against workers of 4 and 2 slots with one headroom slot: every
    lease holds min(cost, the worker's slots), in flight never goes negative nor past a worker's slots, each key
    is charged the sequences of every lease it kept, and no waiter that fits somewhere is left waiting."""

    SLOTS = (4, 2)
    RESERVE = 1

    def __init__(self) -> None:
        super().__init__()
        self.kept: Counter[str] = Counter()  # sequences of the leases each key finished (charged for good)

    @rule(key=st.sampled_from(["a", "b", "c"]), batch=st.booleans(), prompts=st.integers(1, 3),
          n=st.integers(1, 2))
    def arrive(self, key: str, batch: bool, prompts: int, n: int) -> None:
        demand = Demand(Caller(key, BATCH if batch else INTERACTIVE), prompt_tokens=prompts * 10.0, max_tokens=8,
                        slots=prompts * n)
        task = self.loop.create_task(self.pool.wait_for_worker(MODEL, 1000.0, demand=demand))
        self.requests.append((demand, task))
        self._run()

    @precondition(lambda self: bool(self._holding()))
    @rule(data=st.data(), completion=st.integers(0, 300))
    def finish(self, data: st.DataObject, completion: int) -> None:
        demand, task = data.draw(st.sampled_from(self._holding()))
        self.released.add(id(task))
        self.kept[demand.caller.key_id] += demand.slots
        self.pool.release(task.result(), demand, prompt_tokens=round(demand.prompt_tokens),
                          completion_tokens=completion)
        self._run()

    @invariant()
    def nothing_lost_nothing_twice(self) -> None:
        holding = self._holding()
        for worker in self.workers:
            held = sum(d.leased for d, t in holding if t.result() is worker)
            assert 0 <= worker.inflight == held <= worker.slots
        assert all(d.leased == min(d.slots, t.result().slots) for d, t in holding)
        assert self.pool.queue_depth == len(self._waiting())

    @invariant()
    def headroom_in_use_is_exact(self) -> None:
        taken = [d for d, _ in self._holding() if d.headroom]
        assert self.pool.headroom_in_use(MODEL) == sum(d.headroom for d in taken) <= self.headroom
        assert all(demand.caller.priority == INTERACTIVE for demand in taken)

    @invariant()
    def no_idle_slot_while_someone_waits(self) -> None:
        """A waiter is left waiting only when no worker has room for its sequences, or when taking them would
        eat into the unused headroom that it may not use."""
        queue = self.pool.queue(MODEL)
        free = sum(w.slots - w.inflight for w in self.workers)
        assert self.pool.free_slots(MODEL) == free
        unused = self.headroom - self.pool.headroom_in_use(MODEL)
        for demand, _ in self._waiting():
            caller = demand.caller
            regular = caller.priority == BATCH or queue.running(caller.key_id) > 0
            for worker in self.workers:
                need = min(demand.slots, worker.slots)
                room = worker.slots - worker.inflight >= need
                assert not room or (regular and free - need < unused), (demand, worker.inflight, free)

    @invariant()
    def running_counts_per_key_are_exact(self) -> None:
        queue = self.pool.queue(MODEL)
        holding = self._holding()
        for key in ("a", "b", "c"):
            mine = [d for d, _ in holding if d.caller.key_id == key]
            assert queue.running(key) == len(mine)
            assert queue.slots(key) == sum(d.slots for d in mine) >= 0
            assert queue.slots_charged.get(key, 0) == self.kept[key] + queue.slots(key)


TestCostPoolMachine = CostPoolMachine.TestCase
TestCostPoolMachine.settings = settings(max_examples=250, stateful_step_count=40, deadline=None)


def _simulate(weights: tuple[float, float], costs: tuple[int, int], slots: int, rounds: int) -> Counter[str]:
    """Two keys that always have work queued; tokens served per key after a warm-up."""
    loop = asyncio.new_event_loop()
    try:
        queue = FairQueue()
        callers = {"a": Caller("a", INTERACTIVE, weights[0]), "b": Caller("b", INTERACTIVE, weights[1])}
        cost = {"a": costs[0], "b": costs[1]}

        def enqueue(key: str) -> None:
            queue.arrive(callers[key])
            queue.push(Waiter(loop.create_future(), Demand(callers[key], prompt_tokens=cost[key] // 2)))

        for key in callers:
            for _ in range(slots + 2):
                enqueue(key)
        running: list[Demand] = []
        served: Counter[str] = Counter()
        for step in range(rounds):
            while len(running) < slots:
                waiter = next(queue.order())
                queue.remove(waiter)
                queue.charge(waiter.demand)
                running.append(waiter.demand)
                enqueue(waiter.demand.caller.key_id)
            done = running.pop(0)
            key = done.caller.key_id
            queue.settle(done, cost[key] // 2, cost[key] - cost[key] // 2)
            if step >= rounds // 5:
                served[key] += cost[key]
        return served
    finally:
        loop.close()


@given(
    weights=st.tuples(st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0]), st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0])),
    costs=st.tuples(st.integers(2, 300), st.integers(2, 300)),
    slots=st.integers(1, 8),
)
@example(weights=(1.0, 3.0), costs=(100, 100), slots=4)
@example(weights=(1.0, 3.0), costs=(300, 2), slots=8)
@settings(max_examples=40, deadline=None)
def test_token_shares_converge_to_the_weights(weights: tuple[float, float], costs: tuple[int, int], slots: int) -> None:
    served = _simulate(weights, costs, slots, rounds=3000)
    share = served["a"] / (served["a"] + served["b"])
    wanted = weights[0] / (weights[0] + weights[1])
    # Within 10 % of the weight ratio, plus one request of slack per slot in the measured window.
    slack = slots * max(costs) / (served["a"] + served["b"])
    assert abs(share - wanted) <= 0.1 * wanted + slack, (share, wanted)


def test_an_idle_key_banks_no_credit() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = FairQueue()
        busy, idle = Caller("busy"), Caller("idle")
        for _ in range(200):  # busy alone for a long time
            queue.arrive(busy)
            demand = Demand(busy, prompt_tokens=50)
            queue.charge(demand)
            queue.settle(demand, 50, 50)
        waiters = []
        for caller in [busy, idle] * 20:
            queue.arrive(caller)
            waiter = Waiter(loop.create_future(), Demand(caller, prompt_tokens=50))
            queue.push(waiter)
            waiters.append(waiter)
        order = []
        for _ in range(20):
            waiter = next(queue.order())
            queue.remove(waiter)
            queue.charge(waiter.demand)
            queue.settle(waiter.demand, 50, 50)
            order.append(waiter.demand.caller.key_id)
        assert abs(order.count("idle") - 10) <= 1, order  # alternation, not 20 in a row for the returning key
    finally:
        loop.close()


async def test_interactive_goes_first_and_batch_takes_idle_slots() -> None:
    pool, (worker,) = healthy_pool([1])
    batch = Demand(Caller("bulk", BATCH))
    assert await pool.wait_for_worker(MODEL, 5, demand=batch) is worker  # batch alone: idle slot, no wait
    later_batch = asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("bulk", BATCH))))
    await settle_loop()
    interactive = asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("person"))))
    await settle_loop()
    pool.release(worker, batch, prompt_tokens=1, completion_tokens=1)
    await settle_loop()
    assert interactive.done() and not later_batch.done()
    pool.release(worker, completion_tokens=None)
    assert await later_batch is worker


async def test_headroom_starts_a_light_key_at_once_behind_a_heavy_backlog() -> None:
    pool, workers = healthy_pool([2, 2], reserve=1)
    heavy = [
        asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("heavy"), prompt_tokens=10)))
        for _ in range(8)
    ]
    await settle_loop()
    assert sum(task.done() for task in heavy) == 3, "a key that has something running leaves the headroom free"
    assert sum(w.inflight for w in workers) == 3
    bulk = asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("bulk", BATCH))))
    await settle_loop()
    assert not bulk.done(), "batch work never takes the headroom"
    light = Demand(Caller("light"), prompt_tokens=10)
    worker = await asyncio.wait_for(pool.wait_for_worker(MODEL, 5, demand=light), 1)
    assert sum(w.inflight for w in workers) == 4
    second = asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("light"))))
    await settle_loop()
    pool.release(worker, light, prompt_tokens=10, completion_tokens=1)
    await settle_loop()
    assert second.done(), "the light key's next request takes the headroom it gave back"
    assert sum(task.done() for task in heavy) == 3 and not bulk.done()
    for task in [*heavy, bulk, second]:
        task.cancel()
    await settle_loop()


async def test_a_headroom_slot_in_use_is_not_held_back_twice() -> None:
    """While the light key runs in the headroom, a slot a heavy request gives back goes to the heavy
    backlog: holding it free too would idle a second slot for as long as the light key keeps asking."""
    pool, workers = healthy_pool([2, 2], reserve=1)
    heavy = [
        asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("heavy"), prompt_tokens=10)))
        for _ in range(8)
    ]
    await settle_loop()
    running = [task for task in heavy if task.done()]
    assert len(running) == 3
    light = Demand(Caller("light"), prompt_tokens=10)
    await asyncio.wait_for(pool.wait_for_worker(MODEL, 5, demand=light), 1)
    assert light.headroom and pool.headroom_in_use(MODEL) == 1
    first = running[0]
    pool.release(first.result(), completion_tokens=1)
    await settle_loop()
    assert sum(task.done() for task in heavy) == 4, "the freed slot went to the heavy backlog"
    assert sum(w.inflight for w in workers) == 4
    for task in heavy:
        task.cancel()
    await settle_loop()


async def test_no_headroom_below_four_slots_or_in_fifo() -> None:
    for slots, fair in (([2, 1], True), ([2, 2], False)):
        pool, workers = healthy_pool(slots, fair=fair, reserve=1)
        held = [await pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("heavy"))) for _ in range(sum(slots))]
        assert len(held) == sum(slots) and all(w.inflight == w.slots for w in workers)


async def test_light_key_overtakes_a_heavy_backlog() -> None:
    pool, (worker,) = healthy_pool([1])
    assert pool.try_acquire(MODEL, demand=Demand(Caller("heavy"), prompt_tokens=100)) is worker
    heavy = [
        asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("heavy"), prompt_tokens=100)))
        for _ in range(5)
    ]
    await settle_loop()
    light = asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("light"), prompt_tokens=100)))
    await settle_loop()
    pool.release(worker)
    await settle_loop()
    assert light.done() and not any(task.done() for task in heavy)
    assert pool.queue(MODEL).position(next(pool.queue(MODEL).order())) == 0
    for task in heavy:
        task.cancel()
    await asyncio.gather(*heavy, return_exceptions=True)
    assert pool.queue_depth == 0


async def test_fifo_mode_keeps_arrival_order() -> None:
    pool, (worker,) = healthy_pool([1], fair=False)
    assert pool.try_acquire(MODEL) is worker
    heavy = asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("heavy"))))
    await settle_loop()
    light = asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("light", BATCH))))
    await settle_loop()
    pool.release(worker)
    assert await heavy is worker and not light.done()
    pool.release(worker)
    assert await light is worker


async def test_a_full_queue_pushes_out_the_longest_flow() -> None:
    pool, (worker,) = healthy_pool([1], queue_size=2)
    assert pool.try_acquire(MODEL, demand=Demand(Caller("flood"), prompt_tokens=100)) is worker
    flood = [asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("flood")))) for _ in range(2)]
    await settle_loop()
    light = asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("light"))))
    await settle_loop()
    with pytest.raises(QueueFull):
        await flood[1]  # the flood's newest waiter makes room
    with pytest.raises(QueueFull):  # the flood may not push the light key back out
        await pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("flood")))
    assert pool.queue_depth == 2 and not light.done()
    pool.release(worker)
    await settle_loop()
    assert light.done() and not flood[0].done()
    pool.release(worker)
    assert await flood[0] is worker


async def test_queue_timeout_refunds_nothing_and_forgets_the_waiter() -> None:
    pool, (worker,) = healthy_pool([1])
    assert pool.try_acquire(MODEL) is worker
    with pytest.raises(QueueTimeout):
        await pool.wait_for_worker(MODEL, 0.01, demand=Demand(Caller("k")))
    assert pool.queue_depth == 0 and pool.queue(MODEL).running("k") == 0


async def test_position_and_eta_are_reported_while_waiting() -> None:
    pool, (worker,) = healthy_pool([1])
    assert pool.try_acquire(MODEL) is worker
    seen: list[tuple[int, float]] = []
    first = asyncio.create_task(pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("a"))))
    await settle_loop()

    async def notice(waiter: Waiter) -> None:
        seen.append(pool.position(MODEL, waiter))

    second = asyncio.create_task(
        pool.wait_for_worker(MODEL, 5, demand=Demand(Caller("a")), notice=notice, notice_after_s=0, notice_every_s=0.01)
    )
    while not seen:  # waiting on the notice callback itself
        await asyncio.sleep(0.005)
    assert seen[0][0] == 1 and seen[0][1] > 0
    pool.release(worker)
    assert await first is worker
    pool.release(worker)
    assert await second is worker


@pytest.mark.parametrize(
    ("body", "max_tokens", "slots"),
    [
        ({"max_tokens": 40}, 40, 1),
        ({"max_tokens": 40, "n": 3}, 40, 3),  # three choices: three sequences of up to 40 tokens each
        ({"max_completion_tokens": 10, "max_tokens": 99, "n": 2}, 10, 2),
        ({"max_tokens": 40, "n": True}, None, 1),  # odd field types: routed on model and stream alone (worker: 400)
        ({"max_tokens": 40, "n": 10_000}, 40, 1),  # above any slot count: the worker refuses it
        ({"max_tokens": 40, "n": "3"}, 40, 1),
        ({"n": 3}, None, 3),  # no limit: the key's running average answer length stands
        ({"prompt": "one", "n": 2}, None, 2),  # a completions prompt string: one prompt
        ({"prompt": ["a", "b", "c"], "n": 2}, None, 6),  # every prompt x every choice
        ({"prompt": [[1, 2], [3], [4], [5]], "n": 4}, None, 16),
        ({"prompt": [1, 2, 3, 4]}, None, 1),  # one prompt of token ids
        ({"prompt": ["x"] * 5000}, None, 1),  # past any worker's max_prompts: the worker refuses it
    ],
)
def test_the_cost_is_every_prompt_times_every_choice(body: dict[str, object], max_tokens: int | None,
                                                     slots: int) -> None:
    from balancer.peek import peek_body

    pool, _ = healthy_pool([2])
    demand = Demand(Caller("key_a", INTERACTIVE, 1.0))
    raw = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}).encode()
    assert peek_body(raw, demand, pool) == (MODEL, False)
    assert (demand.max_tokens, demand.slots) == (max_tokens, slots)


def test_a_lease_is_charged_for_every_sequence() -> None:
    queue = FairQueue()
    caller = Caller("flood", INTERACTIVE, 2.0)
    queue.arrive(caller)
    demand = Demand(caller, prompt_tokens=100.0, max_tokens=10, slots=16 * 4)
    queue.charge(demand)
    assert demand.charged == 100 + 16 * 4 * 10  # every prompt's tokens, and up to max_tokens for each sequence
    assert queue.counter("flood") - queue.vtime == demand.charged / 2
    assert (queue.running("flood"), queue.slots("flood"), queue.slots_charged["flood"]) == (1, 64, 64)
    queue.settle(demand, prompt_tokens=100, completion_tokens=640)
    assert (queue.running("flood"), queue.slots("flood"), queue.slots_charged["flood"]) == (0, 0, 64)
    assert queue.tokens["flood"] == 740
    row = queue.describe(0.0)
    assert row == []  # nothing waits or runs: no row (the counters stay)


@given(costs=st.lists(st.tuples(st.integers(1, 16), st.integers(1, 8), st.sampled_from(["done", "refund"])),
                      min_size=1, max_size=12),
       order=st.randoms(use_true_random=False))
@example(costs=[(16, 8, "done")], order=random.Random(0))
def test_charged_slots_are_prompts_times_n_and_in_flight_never_negative(
        costs: list[tuple[int, int, str]], order: random.Random) -> None:
    """Leases of any cost end in any order: the key is charged prompts x n for each lease it kept, the slots
    in flight follow every lease and end, never below zero."""
    queue = FairQueue()
    caller = Caller("k")
    queue.arrive(caller)
    leases = []
    for prompts, n, end in costs:
        demand = Demand(caller, prompt_tokens=float(prompts), max_tokens=4, slots=prompts * n)
        queue.charge(demand)
        leases.append((demand, end))
    assert queue.slots("k") == sum(d.slots for d, _ in leases) and queue.running("k") == len(leases)
    order.shuffle(leases)
    for index, (demand, end) in enumerate(leases):
        queue.settle(demand, None, 1, refund=end == "refund")
        queue.settle(demand, None, 1)  # settling twice changes nothing
        rest = leases[index + 1:]
        assert queue.slots("k") == sum(d.slots for d, _ in rest) >= 0
        assert queue.running("k") == len(rest)
    kept = sum(prompts * n for prompts, n, end in costs if end == "done")
    assert queue.slots_charged.get("k", 0) == kept


async def test_a_multi_slot_lease_holds_its_slots_and_leaves_the_headroom() -> None:
    """A request of 16 sequences holds a whole 4-slot worker (the worker queues the rest itself); the next one
    may not take the other worker's last free slots, which stay for a chat from another key."""
    pool, (first, second) = healthy_pool([4, 4], reserve=2)
    flood = Caller("flood")
    big = Demand(flood, slots=16)
    worker = await pool.wait_for_worker(MODEL, 5.0, demand=big)
    assert worker.inflight == 4 and big.leased == 4 and pool.free_slots(MODEL) == 4
    other = second if worker is first else first
    queued = asyncio.create_task(pool.wait_for_worker(MODEL, 5.0, demand=Demand(flood, slots=16)))
    await settle_loop()
    assert not queued.done() and other.inflight == 0, "the headroom stays free"
    chat = Demand(Caller("person"), slots=2)
    assert await pool.wait_for_worker(MODEL, 5.0, demand=chat) is other and other.inflight == 2
    pool.release(worker, big, prompt_tokens=10, completion_tokens=160)
    assert await queued is worker and worker.inflight == 4
    assert pool.queue(MODEL).slots("flood") == 16 and pool.queue(MODEL).slots_charged["flood"] == 32
    pool.release(other, chat)
    assert other.inflight == 0 and pool.free_slots(MODEL) == 4
