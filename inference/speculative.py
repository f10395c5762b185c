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

NGRAMS = (3, 2)  # the longest n-gram that occurred before is the draft's context


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


@dataclass(slots=True)
class StepCost:
    """A decode call's time as ``c0 + c1 * tokens``, fitted to the calls measured (recent ones weigh more).

    :attr:`token_cost` (``c1 / c0``) is what one more token in a step costs, as a share of the step's
    fixed part (reading the weights, the threads' barriers): small on a GPU, larger on a few CPU cores.
    Until the calls seen differ enough in size to fit a line, it is ``prior``.
    """

    prior: float
    decay: float = 0.98
    _n: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._n = self._n * d + 1.0
        self._x = self._x * d + tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * seconds

    @property
    def token_cost(self) -> float:
        n = self._n
        spread = n * self._xx - self._x * self._x
        if n < 8 or spread < n * n * 0.25:  # too few calls, or all of about one size: no line to fit
            return self.prior
        c1 = (n * self._xy - self._x * self._y) / spread
        c0 = (self._y - c1 * self._x) / n
        if c0 <= 0 or c1 <= 0:
            return self.prior
        return min(2.0, max(0.01, c1 / c0))


@dataclass(slots=True)
class DraftPolicy:
    """Per sequence: how long a draft pays this step, from the acceptance measured so far.

    A decode step costs about ``c0 + c1 * tokens``; ``token_cost`` is ``c1 / c0`` (:class:`StepCost`).
    Adding ``k`` draft tokens to a step that decodes ``B`` tokens pays when the expected accepted tokens exceed
    ``k * B * token_cost / (1 + B * token_cost)`` (each accepted token saves one step for this sequence;
    the extra tokens slow every sequence of the step). A sequence that stops drafting tries a short
    draft again every ``probe_every`` steps, so a quoting stretch later in an answer is still found.
    """

    most: int
    rate: float = 0.5  # acceptance per drafted token (running average; the prior before any draft)
    drafted: int = 0
    accepted: int = 0
    resting: int = field(default=0)
    probe_every: int = 16

    def length(self, available: int, batch_tokens: int, token_cost: float) -> int:
        """Draft tokens to decode now (0: none), given ``available`` drafted tokens, the step's tokens and what
        one more token costs (``c1 / c0``)."""
        if available <= 0 or self.most <= 0:
            return 0
        if self.resting > 0:
            self.resting -= 1
            return 0 if self.resting else min(2, available)
        load = max(1, batch_tokens) * token_cost
        threshold = load / (1.0 + load)
        best, gain = 0, 0.0
        for k in range(1, min(self.most, available) + 1):
            value = expected_accepted(self.rate, k) - threshold * k
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
