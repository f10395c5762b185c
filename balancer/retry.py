"""Retry budget: retries may add at most a fixed fraction of load, so failures do not multiply it."""

from __future__ import annotations

__all__ = ["RetryBudget"]


class RetryBudget:
    """Token bucket fed by requests: each request earns ``ratio`` tokens, each retry spends one.

    With ``ratio=0.2`` retries add at most 20 % to the load in steady state; ``burst`` tokens
    (the bucket's size, full at start) absorb a short spike such as one worker dying under load.
    """

    __slots__ = ("_burst", "_ratio", "_tokens", "granted", "refused")

    def __init__(self, ratio: float = 0.2, burst: float = 10.0) -> None:
        self._ratio = ratio
        self._burst = burst
        self._tokens = burst
        self.granted = 0
        self.refused = 0

    @property
    def tokens(self) -> float:
        return self._tokens

    def deposit(self) -> None:
        tokens = self._tokens + self._ratio
        self._tokens = tokens if tokens < self._burst else self._burst

    def try_spend(self) -> bool:
        if self._tokens >= 1.0 - 1e-9:  # 5 x 0.2 must buy one retry despite float rounding
            self._tokens = max(0.0, self._tokens - 1.0)
            self.granted += 1
            return True
        self.refused += 1
        return False
