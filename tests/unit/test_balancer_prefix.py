"""Prefix-aware routing: a conversation follows its earlier turns, unless that worker is much busier."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.fairqueue import Caller, Demand
from balancer.pool import WorkerPool
from balancer.prefix import PrefixTable, prefix_chain
from balancer.worker import Worker, WorkerState
from tests.support.pools import add_healthy

MODEL = "m"


def prefix_pool(slots: list[int], imbalance: float = 0.5, size: int = 1024) -> tuple[WorkerPool, list[Worker]]:
    pool = WorkerPool("least_connections", 16, random.Random(0), prefixes=PrefixTable(size), max_imbalance=imbalance)
    return add_healthy(pool, slots, MODEL)


def turn(key: str, *messages: str) -> Demand:
    return Demand(Caller(key), route=prefix_chain(key, MODEL, [m.encode() for m in messages]))


def test_chains_are_prefix_closed_and_scoped_by_key_and_model() -> None:
    one = prefix_chain("k", MODEL, [b"sys", b"hi"])
    two = prefix_chain("k", MODEL, [b"sys", b"hi", b"answer", b"more"])
    assert two[:2] == one
    assert not set(prefix_chain("other", MODEL, [b"sys", b"hi"])) & set(one)
    assert not set(prefix_chain("k", "other-model", [b"sys", b"hi"])) & set(one)


def test_a_conversation_returns_to_its_worker() -> None:
    pool, workers = prefix_pool([4, 4, 4])
    first = turn("k", "system", "question 1")
    home = pool.try_acquire(MODEL, demand=first)
    assert home is not None
    pool.release(home, first, prompt_tokens=10, completion_tokens=5)
    for index in range(2, 8):  # later turns resend the history plus one more exchange
        messages = ["system"] + [f"m{i}" for i in range(2 * index)]
        demand = turn("k", *messages[: 2 * index])
        demand.route = prefix_chain("k", MODEL, [b"system", b"question 1", *[m.encode() for m in messages[1:]]])
        assert pool.try_acquire(MODEL, demand=demand) is home
        pool.release(home, demand, prompt_tokens=10, completion_tokens=5)
    assert sum(w.inflight for w in workers) == 0


def test_a_much_busier_holder_loses_the_request() -> None:
    pool, (a, b) = prefix_pool([4, 4], imbalance=0.5)
    first = turn("k", "system", "q")
    pool.mark(b, WorkerState.EJECTED)
    assert pool.try_acquire(MODEL, demand=first) is a
    pool.mark(b, WorkerState.HEALTHY)
    follow = turn("k", "system", "q", "answer", "q2")
    assert pool.try_acquire(MODEL, demand=follow) is a  # a: 1/4 busy, b: 0/4: within 0.5
    assert pool.try_acquire(MODEL, demand=turn("k", "system", "q", "x")) is a  # 2/4 vs 0/4: still within 0.5
    assert pool.try_acquire(MODEL, demand=turn("k", "system", "q", "y")) is b  # 3/4 vs 0/4: too busy


def test_new_conversations_sharing_a_system_prompt_spread_out() -> None:
    pool, workers = prefix_pool([4, 4, 4])
    picked = [pool.try_acquire(MODEL, demand=turn("k", "shared system prompt", f"user {i}")) for i in range(9)]
    assert all(w is not None for w in picked)
    assert sorted(w.inflight for w in workers) == [3, 3, 3]


def test_least_connections_ignores_prefixes() -> None:
    pool = WorkerPool("least_connections", 16, random.Random(0))
    workers = []
    for index in range(2):
        worker = pool.add(f"http://w{index}")
        pool.mark(worker, WorkerState.HEALTHY, model=MODEL, slots=4)
        workers.append(worker)
    assert not pool.prefix_routing
    first = pool.try_acquire(MODEL, demand=turn("k", "a"))
    second = pool.try_acquire(MODEL, demand=turn("k", "a", "b"))
    assert {first, second} == set(workers)


def test_removed_workers_are_forgotten() -> None:
    pool, (a, b) = prefix_pool([4, 4])
    demand = turn("k", "s", "q")
    worker = pool.try_acquire(MODEL, demand=demand)
    assert worker is not None
    pool.release(worker, demand, prompt_tokens=1, completion_tokens=1)
    pool.remove(worker.url)
    other = b if worker is a else a
    assert pool.try_acquire(MODEL, demand=turn("k", "s", "q", "r")) is other


@given(
    turns=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6)), min_size=1, max_size=60), size=st.integers(16, 64)
)
@settings(max_examples=50, deadline=None)
def test_the_table_stays_bounded_and_every_pick_has_room(turns: list[tuple[int, int]], size: int) -> None:
    pool, workers = prefix_pool([2, 3], size=size)
    held: list[tuple[Worker, Demand]] = []
    for conversation, length in turns:
        demand = turn(f"k{conversation % 2}", *[f"c{conversation}-{i}" for i in range(length)])
        before = {w.url: w.inflight for w in workers}
        worker = pool.try_acquire(MODEL, demand=demand)
        if worker is None:
            assert all(w.inflight == w.slots for w in workers)
            worker, done = held.pop(0)
            pool.release(worker, done, prompt_tokens=1, completion_tokens=1)
            continue
        assert before[worker.url] < worker.slots
        least = min(w.inflight / w.slots for w in workers if before[w.url] < w.slots)
        assert before[worker.url] / worker.slots <= least + 0.5 + 1e-9
        held.append((worker, demand))
    assert pool._prefixes is not None and len(pool._prefixes) <= size
