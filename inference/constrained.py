"""Grammar-constrained sampling that stays cheap on large vocabularies.

Applying a grammar to every candidate of a 262k-token vocabulary costs far
more than a decode step of a small model. Like llama.cpp's own common
sampler, sample without the grammar first and only check that one token;
only when the grammar rejects it, rebuild the full candidate list, apply the
grammar, then the sequence's chain.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

__all__ = ["ConstrainedSampler"]

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class ConstrainedSampler:
    """Decode-thread helper; one per scheduler (its buffers are reused for every sequence)."""

    def __init__(self, llama: Any, ctx: Any, n_vocab: int) -> None:
        self.llama = llama
        self.ctx = ctx
        self.n_vocab = n_vocab
        self._one = (llama.llama_token_data * 1)()
        self._one_array = llama.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._all = (llama.llama_token_data * n_vocab)()
        self._all_view = np.frombuffer(self._all, dtype=TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._all_array = llama.llama_token_data_array(data=self._all, size=n_vocab, selected=-1, sorted=False)

    def sample(self, chain: Any, grammar: Any, index: int) -> int:
        llama = self.llama
        token = int(llama.llama_sampler_sample(chain, self.ctx, index))
        if not self._rejects(grammar, token):
            llama.llama_sampler_accept(grammar, token)
            return token
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        view = self._all_view
        view["id"] = self._ids
        view["logit"] = logits
        view["p"] = 0.0
        array = self._all_array
        array.size, array.selected, array.sorted = self.n_vocab, -1, False
        llama.llama_sampler_apply(grammar, ctypes.byref(array))
        llama.llama_sampler_apply(chain, ctypes.byref(array))
        token = int(self._all[array.selected].id)
        llama.llama_sampler_accept(grammar, token)
        return token

    def _rejects(self, grammar: Any, token: int) -> bool:
        one = self._one[0]
        one.id, one.logit, one.p = token, 1.0, 0.0
        array = self._one_array
        array.size, array.selected, array.sorted = 1, -1, False
        self.llama.llama_sampler_apply(grammar, ctypes.byref(array))
        return bool(math.isinf(one.logit) and one.logit < 0)
