"""The worker pool: exact in-flight accounting, weighted least-connections, the wait queue."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from balancer.pool import NoHealthyWorker, QueueFull, QueueTimeout, WorkerPool
from balancer.worker import Worker, WorkerState
from tests.support.pools import add_healthy

MODEL = "m"


def healthy_pool(slots: list[int], strategy: str = "least_connections", queue_size: int = 8,
                 seed: int = 0) -> tuple[WorkerPool, list[Worker]]:
    return add_healthy(WorkerPool(strategy, queue_size, random.Random(seed)), slots, MODEL)  # type: ignore[arg-type]


class PoolMachine(RuleBasedStateMachine):
    """Random adds, removals, health flips, acquires and releases: counts stay exact."""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.pool = WorkerPool("least_connections", 4, random.Random(1))
        self.held: Counter[int] = Counter()  # id(worker) -> leases we hold
        self.known: dict[int, Worker] = {}

    @rule(index=st.integers(0, 4), slots=st.integers(1, 4), model=st.sampled_from(["a", "b"]))
    def add_healthy(self, index: int, slots: int, model: str) -> None:
        worker = self.pool.add(f"http://w{index}")
        self.known[id(worker)] = worker
        self.pool.mark(worker, WorkerState.HEALTHY, model=model, slots=slots)

    @rule(index=st.integers(0, 4), state=st.sampled_from(list(WorkerState)))
    def flip_health(self, index: int, state: WorkerState) -> None:
        worker = self.pool.get(f"http://w{index}")
        if worker is not None:
            self.pool.mark(worker, state)

    @rule(index=st.integers(0, 4))
    def remove(self, index: int) -> None:
        self.pool.remove(f"http://w{index}")

    @rule(target=leases, model=st.sampled_from(["a", "b"]))
    def acquire(self, model: str) -> Worker | None:
        before = {id(w): w.inflight for w in self.pool}
        worker = self.pool.try_acquire(model)
        if worker is not None:
            assert worker.routable and worker.model == model
            assert before[id(worker)] < worker.slots, "acquired past capacity"
            self.held[id(worker)] += 1
        return worker

    @rule(worker=consumes(leases))
    def release(self, worker: Worker | None) -> None:
        if worker is not None:
            self.pool.release(worker)
            self.held[id(worker)] -= 1

    @invariant()
    def inflight_is_exact(self) -> None:
        for worker in self.known.values():
            assert worker.inflight >= 0
            assert worker.inflight == self.held[id(worker)]

    @invariant()
    def free_slot_counts_are_exact(self) -> None:
        for model in ("a", "b"):
            walked = sum(max(0, w.slots - w.inflight) for w in self.pool if w.routable and w.model == model)
            assert self.pool.free_slots(model) == walked, model

    @invariant()
    def drained_workers_leave(self) -> None:
        for worker in self.pool:
            assert not (worker.draining and worker.inflight == 0)

    def teardown(self) -> None:
        for key, count in list(self.held.items()):
            for _ in range(count):
                self.pool.release(self.known[key])
        assert all(w.inflight == 0 for w in self.known.values())
        assert all(not w.draining for w in self.pool)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_release_without_lease_is_refused() -> None:
    pool, (worker,) = healthy_pool([2])
    with pytest.raises(RuntimeError):
        pool.release(worker)
    assert worker.inflight == 0


@given(slots=st.lists(st.integers(1, 8), min_size=1, max_size=6), load=st.integers(0, 48))
def test_least_connections_fills_by_capacity(slots: list[int], load: int) -> None:
    """Every pick goes to a worker whose in-flight/slots ratio is the lowest, so load follows capacity."""
    pool, workers = healthy_pool(slots)
    for _ in range(load):
        ratios = [w.inflight / w.slots for w in workers if w.inflight < w.slots]
        worker = pool.try_acquire(MODEL)
        if not ratios:
            assert worker is None
            continue
        assert worker is not None
        assert (worker.inflight - 1) / worker.slots == min(ratios)
    assert sum(w.inflight for w in workers) == min(load, sum(slots))


def test_ties_are_broken_at_random() -> None:
    pool, _workers = healthy_pool([4, 4, 4])
    firsts = Counter()
    for _ in range(300):
        worker = pool.try_acquire(MODEL)
        assert worker is not None
        firsts[worker.url] += 1
        pool.release(worker)
    assert len(firsts) == 3 and min(firsts.values()) > 60


def test_round_robin_cycles_and_skips_full_workers() -> None:
    pool, _workers = healthy_pool([1, 2, 2], strategy="round_robin")
    picked = [pool.try_acquire(MODEL) for _ in range(5)]
    assert [w.url if w else None for w in picked] == ["http://w0", "http://w1", "http://w2", "http://w1", "http://w2"]
    assert pool.try_acquire(MODEL) is None


def test_unhealthy_loading_draining_and_excluded_get_no_traffic() -> None:
    pool, (a, b, c, d) = healthy_pool([4, 4, 4, 4])
    pool.mark(a, WorkerState.EJECTED)
    pool.mark(b, WorkerState.LOADING)
    pool.remove(c.url)
    assert {pool.try_acquire(MODEL, [d]) for _ in range(3)} == {None}
    assert pool.try_acquire(MODEL) is d
    assert a.ejections == 1 and pool.get(c.url) is None


def test_models_are_separate_pools() -> None:
    pool, (a,) = healthy_pool([1])
    other = pool.add("http://other")
    pool.mark(other, WorkerState.HEALTHY, model="other", slots=1)
    assert pool.try_acquire("other") is other
    assert pool.try_acquire(MODEL) is a
    assert pool.try_acquire("other") is None and pool.try_acquire("nope") is None
    assert pool.models() == [MODEL, "other"]


def test_drain_waits_for_the_last_request() -> None:
    pool, (worker,) = healthy_pool([2])
    assert pool.try_acquire(MODEL) is worker
    assert pool.remove(worker.url) is worker
    assert pool.get(worker.url) is worker and pool.try_acquire(MODEL) is None
    pool.release(worker)
    assert pool.get(worker.url) is None


async def test_released_slot_goes_to_the_oldest_waiter() -> None:
    pool, (worker,) = healthy_pool([1])
    assert pool.try_acquire(MODEL) is worker
    first = asyncio.create_task(pool.wait_for_worker(MODEL, 5))
    second = asyncio.create_task(pool.wait_for_worker(MODEL, 5))
    await asyncio.sleep(0)
    assert pool.queue_depth == 2
    pool.release(worker)
    assert await first is worker and worker.inflight == 1 and not second.done()
    pool.release(worker)
    assert await second is worker
    pool.release(worker)
    assert worker.inflight == 0 and pool.queue_depth == 0


async def test_queue_is_bounded_in_size_and_time() -> None:
    pool, (worker,) = healthy_pool([1], queue_size=1)
    pool.try_acquire(MODEL)
    waiting = asyncio.create_task(pool.wait_for_worker(MODEL, 0.05))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await pool.wait_for_worker(MODEL, 1)
    with pytest.raises(QueueTimeout):
        await waiting
    assert pool.queue_depth == 0 and worker.inflight == 1


async def test_a_model_no_worker_serves_leaves_no_queue_behind() -> None:
    """Issue 32: any caller could name 10,000 made-up models and the pool kept a queue for each."""
    pool, _ = healthy_pool([2])
    for index in range(1000):
        with pytest.raises(NoHealthyWorker):
            await pool.wait_for_worker(f"made-up-{index}", 5)
    assert set(pool.queues()) == set()
    assert (await pool.wait_for_worker(MODEL, 5)).inflight == 1
    assert set(pool.queues()) == {MODEL}


async def test_waiters_fail_fast_when_the_last_worker_is_ejected() -> None:
    pool, (worker,) = healthy_pool([1])
    pool.try_acquire(MODEL)
    waiting = asyncio.create_task(pool.wait_for_worker(MODEL, 5))
    await asyncio.sleep(0)
    pool.mark(worker, WorkerState.EJECTED)
    with pytest.raises(NoHealthyWorker):
        await waiting
    with pytest.raises(NoHealthyWorker):
        await pool.wait_for_worker(MODEL, 5)
    pool.release(worker)
    assert worker.inflight == 0 and pool.queue_depth == 0


async def test_cancelled_after_hand_off_gives_the_slot_back() -> None:
    """A waiter handed a slot but cancelled before it ran must not leak the slot."""
    pool, (worker,) = healthy_pool([1])
    pool.try_acquire(MODEL)
    waiting = asyncio.create_task(pool.wait_for_worker(MODEL, 5))
    await asyncio.sleep(0)
    pool.release(worker)  # hands the slot to the waiter...
    waiting.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert worker.inflight == 0 and pool.queue_depth == 0


async def test_retry_waiter_skips_the_worker_it_excludes() -> None:
    pool, (a, b) = healthy_pool([1, 1])
    pool.try_acquire(MODEL), pool.try_acquire(MODEL)
    retry = asyncio.create_task(pool.wait_for_worker(MODEL, 5, exclude=[a]))
    plain = asyncio.create_task(pool.wait_for_worker(MODEL, 5))
    await asyncio.sleep(0)
    pool.release(a)
    assert await plain is a and not retry.done()
    pool.release(b)
    assert await retry is b
