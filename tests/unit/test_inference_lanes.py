"""The decode lanes' rules (inference.lanes), on random slot states and on a simulated worker over many steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import example, given, settings
from hypothesis import strategies as st

from appliance.core.priority import Priority
from inference.lanes import LaneBook, LaneCounter, LanePolicy, Runner, victims

INT, B = Priority.INTERACTIVE, Priority.BATCH


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Counts(LaneCounter):
    paused_n: int = 0
    resumed_n: int = 0
    evicted_n: int = 0

    def paused(self, count: int) -> None:
        self.paused_n += count

    def resumed(self, count: int) -> None:
        self.resumed_n += count

    def evicted(self, count: int) -> None:
        self.evicted_n += count


runners_st = st.lists(st.tuples(st.sampled_from([INT, B]), st.booleans(), st.integers(0, 500)), max_size=8).map(
    lambda rows: [Runner(slot, priority, prefilling, cells) for slot, (priority, prefilling, cells) in enumerate(rows)])


@settings(max_examples=300, deadline=None)
@given(runners=runners_st, busy=st.integers(0, 8), grace=st.sampled_from([0.0, 0.25]))
@example(runners=[Runner(0, B, False), Runner(1, INT, True)], busy=8, grace=0.0)  # a prefill never shares a step
def test_one_step_follows_the_rules(runners: list[Runner], busy: int, grace: float) -> None:
    book = LaneBook(8, LanePolicy(batch_busy=busy, grace_s=grace), clock=Clock())
    chosen = book.stepping(runners)
    interactive = [r.slot for r in runners if r.priority is INT]
    batch_chosen = [r.slot for r in runners if r.priority is B and r.slot in chosen]
    assert set(interactive) <= set(chosen), "every interactive sequence steps"
    assert len(chosen) == len(set(chosen)) and set(chosen) <= {r.slot for r in runners}
    if any(r.prefilling for r in runners if r.priority is INT):
        assert not batch_chosen, "a batch row in an interactive prefill's step"
    elif interactive:
        assert len(batch_chosen) <= busy
    if not interactive and not grace:
        assert sorted(chosen) == [r.slot for r in runners], "no interactive work: the whole batch lane steps"
    has_batch = any(r.priority is B for r in runners)
    assert book.shrunk == (has_batch and bool(interactive)), "the batch prefill budget shrinks with the lane"


@given(runners=runners_st, wanted=st.integers(-1, 8))
def test_victims_are_batch_sequences_fewest_cells_first(runners: list[Runner], wanted: int) -> None:
    chosen = victims(runners, wanted)
    batch = [r for r in runners if r.priority is B]
    assert len(chosen) == max(0, min(wanted, len(batch)))
    by_slot = {r.slot: r for r in runners}
    assert all(by_slot[slot].priority is B for slot in chosen)
    if chosen:
        left = [r.cells for r in batch if r.slot not in chosen]
        assert not left or max(by_slot[slot].cells for slot in chosen) <= min(left)


@dataclass
class Seq:
    priority: Priority
    prefill_steps: int  # steps of prefill left
    tokens: int  # tokens asked for
    slot: int = -1
    generated: int = 0
    cells: int = 0


@dataclass
class Worker:
    """The scheduler's admission order and the lanes over ``slots`` slots, without llama.cpp."""

    slots: int
    book: LaneBook
    held: list[Seq | None] = field(default_factory=list)
    waiting: list[Seq] = field(default_factory=list)
    parked: list[Seq] = field(default_factory=list)
    done: list[Seq] = field(default_factory=list)

    def runners(self) -> list[Runner]:
        return [Runner(s.slot, s.priority, s.prefill_steps > 0, s.cells) for s in self.held if s is not None]

    def take(self, seq: Seq) -> None:
        seq.slot = self.held.index(None)
        self.held[seq.slot] = seq
        self.book.admitted(seq.slot)

    def admit(self) -> None:
        """Interactive first (a batch sequence's slot taken when none is free), then evicted ones, then the rest."""
        for seq in [s for s in self.waiting if s.priority is INT]:
            if None not in self.held:
                victim = victims(self.runners(), 1)
                if not victim:
                    break
                evicted = self.held[victim[0]]
                assert evicted is not None
                self.held[evicted.slot] = None
                self.book.left(evicted.slot)
                evicted.prefill_steps = 1  # it resumes from its history: a prefill again, nothing generated lost
                self.parked.append(evicted)
            self.waiting.remove(seq)
            self.take(seq)
        while self.parked and None in self.held:
            self.take(self.parked.pop(0))
        while self.waiting and None in self.held:
            self.take(self.waiting.pop(0))

    def step(self) -> list[int]:
        chosen = self.book.stepping(self.runners())
        for slot in chosen:
            seq = self.held[slot]
            assert seq is not None
            seq.cells += 1
            if seq.prefill_steps:
                seq.prefill_steps -= 1
                if seq.prefill_steps:
                    continue
            seq.generated += 1
            if seq.generated == seq.tokens:
                self.held[slot] = None
                self.book.left(slot)
                self.done.append(seq)
        return chosen


arrivals_st = st.lists(
    st.tuples(st.integers(0, 30), st.sampled_from([INT, B]), st.integers(1, 3), st.integers(1, 12)), max_size=16)


@settings(max_examples=200, deadline=None)
@given(arrivals=arrivals_st, slots=st.integers(1, 4), busy=st.integers(0, 3), grace=st.sampled_from([0.0, 2.0]))
@example(arrivals=[(0, B, 1, 5), (1, INT, 1, 3), (1, INT, 1, 3)], slots=2, busy=0, grace=0.0)  # the eviction case
@example(arrivals=[(0, B, 1, 9), (0, B, 1, 9), (0, INT, 2, 9)], slots=3, busy=1, grace=2.0)  # a prompt waits its turn
def test_no_interactive_request_waits_while_a_batch_sequence_steps_and_all_work_ends(
    arrivals: list[tuple[int, Priority, int, int]], slots: int, busy: int, grace: float,
) -> None:
    clock, counts = Clock(), Counts()
    worker = Worker(slots, LaneBook(slots, LanePolicy(batch_busy=busy, grace_s=grace), counts, clock))
    worker.held = [None] * slots
    sent = [(at, Seq(priority, prefill, tokens)) for at, priority, prefill, tokens in arrivals]
    held_out: dict[int, int] = {}  # batch sequence -> steps it was held out of while it could have stepped
    for tick in range(600):
        clock.now = tick * 0.1
        worker.waiting += [seq for at, seq in sent if at == tick]
        worker.admit()
        held = [s for s in worker.held if s is not None]
        if any(s.priority is INT for s in worker.waiting):
            assert all(s.priority is INT for s in held), "an interactive request waits while a batch one holds a slot"
        prefill = any(s.priority is INT and s.prefill_steps for s in held)
        chosen = worker.step()
        interactive = any(s.priority is INT for s in held)
        for seq in held:
            if seq.priority is not B:
                continue
            if seq.slot in chosen or not interactive or prefill:
                held_out[id(seq)] = 0 if seq.slot in chosen or not interactive else held_out.get(id(seq), 0)
                continue
            held_out[id(seq)] = held_out.get(id(seq), 0) + 1
            if busy and not seq.prefill_steps:  # the shrunk lane turns over its generating sequences (a new prompt
                # waits for a line under way to end)
                assert held_out[id(seq)] <= slots, "a generating batch sequence starved in the shrunk lane"
        if tick > 30 and not held and not worker.waiting and not worker.parked:
            break
    assert sorted(id(seq) for seq in worker.done) == sorted(id(seq) for _, seq in sent), "every request ended"
    assert all(seq.generated == seq.tokens for seq in worker.done)
    assert counts.resumed_n <= counts.paused_n  # a sequence resumes from a pause it was in
