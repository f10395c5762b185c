"""Decode lanes: which sequences take part in a step, which wait, which give their slot to an interactive one.

Pure bookkeeping over what the scheduler tells it (no llama.cpp), so the rules are unit-tested alone:

- an interactive prompt's prefill goes first: a step in which an interactive sequence prefills carries no
  batch row, so its time to first token is its idle one plus at most the step already under way;
- while interactive sequences run (or ran less than ``grace_s`` ago: a chat client's next turn is coming),
  the batch lane shrinks to ``batch_busy`` sequences, generating ones before prompts still prefilling (a
  prefill chunk costs a step far more than a decoded row), each kind in turn (least recently stepped first),
  the others paused with their KV cells kept in their slots (0 pauses the lane), and its prompts get at most
  ``batch_prefill`` tokens a step;
- with no interactive sequence about, every batch sequence steps again;
- an interactive request that finds every slot taken takes one from a batch sequence: the batch sequence
  with the fewest cells leaves its slot (its cells stay behind as a cached prefix, so it is resumed from
  them, from host RAM, or recomputed from its tokens) and is resumed before any new batch request.

The scheduler owns the slots and calls :meth:`LaneBook.stepping` once per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from appliance.core.priority import Priority

__all__ = ["LaneBook", "LaneCounter", "LanePolicy", "Runner", "victims"]


@dataclass(frozen=True, slots=True)
class LanePolicy:
    batch_busy: int = 0  # batch sequences that keep stepping beside interactive work (0: the batch lane pauses)
    grace_s: float = 1.0  # how long after the last interactive sequence the batch lane stays shrunk
    batch_prefill: int = 32  # batch prompt tokens per step beside interactive work (a chunk lengthens the step)


@dataclass(frozen=True, slots=True)
class Runner:
    """A sequence holding a slot, as the lanes see it."""

    slot: int
    priority: Priority
    prefilling: bool
    cells: int = 0  # KV cells it holds (the cost of taking its slot away)

    @property
    def batch(self) -> bool:
        return self.priority is Priority.BATCH


class LaneCounter:
    """What the lanes report to metrics (the worker's are :class:`inference.metrics.LaneMetrics`); a no-op."""

    def paused(self, count: int) -> None:
        """``count`` batch sequences stepped last step and are held out of this one."""

    def evicted(self, count: int) -> None:
        """``count`` batch sequences left their slot for an interactive request."""

    def resumed(self, count: int) -> None:
        """``count`` paused or evicted batch sequences step again."""

    def recomputed(self, count: int) -> None:
        """``count`` cells of a resumed batch sequence were prefilled again (not found cached)."""

    def tokens(self, priority: Priority, prompt: int, generated: int) -> None:
        """Prompt tokens prefilled and tokens generated for one class in one step."""


class LaneBook:
    """The lanes' memory across steps: when each slot's sequence last stepped, and which are held out."""

    def __init__(self, slots: int, policy: LanePolicy, counter: LaneCounter | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.policy = policy
        self.counter = counter or LaneCounter()
        self._clock = clock or time.monotonic
        self._step = 0
        self._stepped = [0] * slots  # step number each slot's sequence last took part in
        self._held: set[int] = set()  # batch slots held out of the last step
        self._interactive_at = -float("inf")  # when an interactive sequence last held a slot
        self.shrunk = False  # whether the last step's batch lane was shrunk (its prefill budget is batch_prefill)

    def admitted(self, slot: int) -> None:
        """A sequence (new or resumed) took ``slot``: it has not stepped yet."""
        self._stepped[slot] = self._step
        self._held.discard(slot)

    def left(self, slot: int) -> None:
        """The slot's sequence ended or was evicted."""
        self._held.discard(slot)

    def note_interactive(self) -> None:
        """An interactive request is here (running, or waiting for a slot)."""
        self._interactive_at = self._clock()

    def grace_left(self) -> float:
        """Seconds the batch lane stays shrunk with no interactive sequence about (0: it is over)."""
        return max(0.0, self._interactive_at + self.policy.grace_s - self._clock())

    def stepping(self, runners: Sequence[Runner]) -> list[int]:
        """The slots whose sequences take part in this step (interactive first, then the batch lane's)."""
        self._step += 1
        interactive = [r for r in runners if not r.batch]
        batch = [r for r in runners if r.batch]
        if interactive:
            self.note_interactive()
        self.shrunk = bool(batch) and (bool(interactive) or self.grace_left() > 0)
        if not batch or any(r.prefilling for r in interactive):  # an interactive prefill steps without batch rows
            chosen = [r.slot for r in interactive]
        elif not self.shrunk:
            chosen = [r.slot for r in batch]
        else:
            # Lines under way first (they end and free their slot), then new prompts, each in turn.
            turn = sorted(batch, key=lambda r: (r.prefilling, self._stepped[r.slot], r.slot))[: self.policy.batch_busy]
            chosen = [r.slot for r in interactive] + [r.slot for r in turn]
        self._account(batch, set(chosen))
        for slot in chosen:
            self._stepped[slot] = self._step
        return chosen

    def _account(self, batch: Iterable[Runner], chosen: set[int]) -> None:
        held = {r.slot for r in batch if r.slot not in chosen}
        newly = held - self._held
        back = self._held - held
        if newly:
            self.counter.paused(len(newly))
        if back:
            self.counter.resumed(len(back))
        self._held = held


def victims(runners: Sequence[Runner], wanted: int) -> list[int]:
    """Up to ``wanted`` batch slots to give to waiting interactive requests: the fewest cells first."""
    if wanted <= 0:
        return []
    batch = sorted((r for r in runners if r.batch), key=lambda r: (r.cells, r.slot))
    return [r.slot for r in batch[:wanted]]
