"""Speculative decoding from the prompt (prompt lookup): drafts, and whether a sequence drafts this step.

No draft model exists below the bundled 270M, but answers that quote their
input (RAG, code edits, JSON about a document) repeat runs of the prompt. The
tokens that followed the last occurrence of the sequence's latest n-gram in
its own history (prompt and answer so far) are a draft; the scheduler decodes
them after the sequence's token in the same batch, samples every position,
and keeps the draft up to the first token the sampler did not pick, so the
text is the one decoding token by token gives (bit for bit in the
deterministic mode, where every position's numbers do not depend on the
batch).

Drafting costs decode work for every sequence in the batch, so it is decided
per sequence and per step (:class:`DraftPolicy`) from the sequence's measured
acceptance and from how many tokens the step already decodes: free chat,
whose drafts are rarely accepted, stops drafting after a few tries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["DraftPolicy", "PromptLookup", "StepCost", "expected_accepted"]

# The draft's context: the last three tokens, seen before (two would draft on every common word pair of free chat).
NGRAMS = (3,)


class PromptLookup:
    """An n-gram index over one sequence's tokens; :meth:`draft` continues its latest n-gram."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens: list[int] = []
        # n-gram -> position of the token that followed its latest occurrence whose follower is known
        self._index: dict[tuple[int, ...], int] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        tokens = self.tokens
        end = len(tokens)  # ``token`` follows every n-gram ending at end - 1
        for n in NGRAMS:
            if end >= n:
                self._index[tuple(tokens[end - n : end])] = end
        tokens.append(token)

    def draft(self, most: int) -> list[int]:
        """Up to ``most`` tokens that followed the latest earlier occurrence of the sequence's last n-gram."""
        tokens = self.tokens
        end = len(tokens)
        for n in NGRAMS:
            if end < n:
                continue
            found = self._index.get(tuple(tokens[end - n : end]))
            if found is not None:
                return tokens[found : min(found + most, end)]
        return []


def expected_accepted(rate: float, length: int) -> float:
    """Expected accepted tokens of a ``length``-token draft when each is accepted with probability ``rate``."""
    if rate >= 1.0:
        return float(length)
    return rate * (1.0 - rate**length) / (1.0 - rate)


# Output-row counts whose decode times are kept apart (a call of r rows falls in the first bucket >= r).
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class StepCost:
    """What a decode call costs by how many rows it computes logits for, as measured (recent calls weigh more).

    On a CPU the shape is not a line: the model's output layer takes a matrix-vector path for one row and
    a matrix-matrix path for more (on the bundled 270M, 2 threads: ~11 ms for 1 row, ~25 ms for 2, ~33 ms
    for 9), so a sequence decoding alone pays the jump for any draft, and a batch of eight hardly notices
    eight more rows. Row counts not measured yet are estimated from the nearest measured one as
    ``1 + prior`` per extra row (a share of the one-row cost).
    """

    def __init__(self, prior: float, decay: float = 0.9) -> None:
        self.prior = prior
        self.decay = decay
        self._mean: dict[int, float] = {}

    @staticmethod
    def _bucket(rows: int) -> int:
        for bucket in ROW_BUCKETS:
            if rows <= bucket:
                return bucket
        return ROW_BUCKETS[-1]

    def add(self, rows: int, seconds: float) -> None:
        bucket = self._bucket(max(1, rows))
        known = self._mean.get(bucket)
        self._mean[bucket] = seconds if known is None else known * self.decay + seconds * (1.0 - self.decay)

    def seconds(self, rows: int) -> float:
        """The expected time of a call computing ``rows`` output rows (relative when nothing is measured)."""
        bucket = self._bucket(max(1, rows))
        known = self._mean.get(bucket)
        if known is not None:
            return known
        if not self._mean:
            return 1.0 + self.prior * (rows - 1)
        nearest = min(self._mean, key=lambda b: abs(b - bucket))
        return self._mean[nearest] * (1.0 + self.prior * (rows - 1)) / (1.0 + self.prior * (nearest - 1))

    def slowdown(self, rows: int, extra: int) -> float:
        """How much longer a call of ``rows + extra`` rows takes than one of ``rows`` (0 = free)."""
        return max(0.0, self.seconds(rows + extra) / self.seconds(rows) - 1.0)


@dataclass(slots=True)
class DraftPolicy:
    """Per sequence: how long a draft pays this step, from the acceptance measured so far.

    A draft of ``k`` tokens makes a step that computes ``B`` rows compute ``B + k``: every sequence in it
    waits that much longer (:meth:`StepCost.slowdown`), and this one gains the tokens it expects accepted.
    It pays when ``expected_accepted(rate, k) > B * slowdown(B, k)``; the length chosen is the one that
    gains most. A sequence whose drafts do not pay rests, then tries again every ``probe_every`` steps
    (with the whole draft at hand: on a CPU one draft row costs about what eight do), so a quoting
    stretch later in an answer is still found.
    """

    most: int
    # Acceptance per drafted token (running average). The prior: a three-token run seen before usually goes on
    # as it did (a quote); one rejected draft brings it down to where drafting stops.
    rate: float = 0.7
    drafted: int = 0
    accepted: int = 0
    resting: int = field(default=0)
    probe_every: int = 48

    def length(self, available: int, batch_rows: int, cost: StepCost) -> int:
        """Draft tokens to decode now (0: none), given ``available`` drafted tokens and the step's rows."""
        if available <= 0 or self.most <= 0:
            return 0
        if self.resting > 0:
            self.resting -= 1
            return 0 if self.resting else min(self.most, available)
        rows = max(1, batch_rows)
        best, gain = 0, 0.0
        for k in range(1, min(self.most, available) + 1):
            value = expected_accepted(self.rate, k) - rows * cost.slowdown(rows, k)
            if value > gain:
                best, gain = k, value
        if best == 0:
            self.resting = self.probe_every
        return best

    def update(self, drafted: int, accepted: int) -> None:
        """Record one verified draft."""
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        # Per-token acceptance of this draft (a geometric run: accepted of the first accepted + 1 tried).
        tried = min(drafted, accepted + 1)
        sample = accepted / tried
        self.rate = 0.6 * self.rate + 0.4 * sample
