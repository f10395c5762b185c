"""Token log-probabilities (``logprobs`` / ``top_logprobs``), OpenAI-shaped.

Which distribution: the log-softmax of the model's raw logits at that
position, as OpenAI reports them (llama.cpp's server reports post-sampling
probabilities instead). It is the model's own belief, before temperature,
top-k/top-p/min-p, penalties, ``logit_bias`` and any grammar: a token a
grammar forced still gets its real, finite logprob, and the same text gets
the same logprobs whatever the sampling settings. At temperature 0 without
penalties or biases the chosen token is the first of ``top_logprobs``.

Only sequences that ask pay for it: one pass over the vocabulary of their own
row of logits (``llama_get_logits_ith``) on the decode thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LogprobReader", "TokenLogprob", "chat_logprobs", "completion_logprobs"]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token: its bytes, its logprob, and the most likely alternatives (best first)."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", errors="replace")


class LogprobReader:
    """Decode-thread helper; its scratch buffer is reused for every sequence and step."""

    def __init__(self, llama: Any, ctx: Any, n_vocab: int, piece: Callable[[int], bytes]) -> None:
        self.llama = llama
        self.ctx = ctx
        self.n_vocab = n_vocab
        self.piece = piece
        self._scratch = np.empty(n_vocab, dtype=np.float32)

    def read(self, index: int, token: int, top_n: int) -> TokenLogprob:
        """Logprob of ``token`` at batch row ``index`` (valid until the next ``llama_decode``)."""
        logits = np.ctypeslib.as_array(self.llama.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        peak = float(logits.max())
        np.subtract(logits, peak, out=self._scratch)
        np.exp(self._scratch, out=self._scratch)
        log_total = peak + math.log(float(self._scratch.sum(dtype=np.float64)))
        chosen = float(logits[token]) - log_total
        if top_n <= 0:
            return TokenLogprob(self.piece(token), chosen)
        best = np.argpartition(logits, -top_n)[-top_n:]
        # Highest logit first; ties by token id, as llama.cpp's greedy pick breaks them.
        ordered = sorted(best.tolist(), key=lambda t: (-float(logits[t]), t))
        top = tuple((self.piece(t), float(logits[t]) - log_total) for t in ordered)
        return TokenLogprob(self.piece(token), chosen, top)


def _entry(piece: bytes, logprob: float) -> dict[str, Any]:
    return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or of one stream chunk)."""
    content = [
        {**_entry(item.piece, item.logprob), "top_logprobs": [_entry(piece, lp) for piece, lp in item.top]}
        for item in tokens
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """Legacy ``/v1/completions`` logprobs: the top alternatives plus the chosen token, keyed by text."""
    offsets: list[int] = []
    for item in tokens:
        offsets.append(text_offset)
        text_offset += len(item.text)
    top: list[dict[str, float]] = []
    for item in tokens:
        alternatives = {piece.decode("utf-8", errors="replace"): lp for piece, lp in item.top}
        alternatives.setdefault(item.text, item.logprob)
        top.append(alternatives)
    return {
        "tokens": [item.text for item in tokens],
        "token_logprobs": [item.logprob for item in tokens],
        "top_logprobs": top,
        "text_offset": offsets,
    }
