"""Grammar-constrained sampling that stays cheap on large vocabularies.

Applying a grammar to every candidate of a 262k-token vocabulary costs far
more than a decode step of a small model (~150 ms against ~1 ms for the
unconstrained pick, measured on the default Gemma 3 270M). So, like
llama.cpp's common sampler, sample without the grammar first and check only
that token. When the grammar rejects it, apply the grammar to the highest
logits only (``CANDIDATE_TIERS``: hundreds, then thousands, then an eighth), then
the sequence's chain to those; that pick is provably the one the full
vocabulary would give whenever enough of them survive (see
:meth:`ConstrainedSampler._exact`). Only when it cannot be proven does the
whole vocabulary go through the grammar. That happens mostly on a sequence's
first token, where the grammar forces something the model ranks low (``{``
after a chat prompt, ranked ~40 000th by the default model); but a grammar's
initial state is the same for every request that uses it, so the tokens it
allows there are remembered per grammar and the next such request samples
among exactly those.
"""

from __future__ import annotations

import ctypes
import math
from collections import OrderedDict
from typing import Any

import numpy as np

from inference.sampling import LazyGrammar, SamplingParams

__all__ = ["CANDIDATE_TIERS", "ConstrainedSampler"]

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
# Candidates the grammar sees before the whole vocabulary: above the default top_k (40), small next to 262k.
CANDIDATE_TIERS = (256, 4096, 32768)
# Grammars whose first-token allowed set is remembered (each at most MAX_REMEMBERED ids).
REMEMBERED_GRAMMARS = 64
MAX_REMEMBERED = 32768


class _Candidates:
    """A reusable llama_token_data_array of up to ``size`` entries, with a numpy view of its data."""

    def __init__(self, llama: Any, size: int) -> None:
        self.data = (llama.llama_token_data * size)()
        self.view = np.frombuffer(self.data, dtype=TOKEN_DATA)
        self.array = llama.llama_token_data_array(data=self.data, size=size, selected=-1, sorted=False)

    def load(self, ids: Any, logits: Any) -> Any:
        count = len(ids)
        view = self.view[:count]
        view["id"], view["logit"], view["p"] = ids, logits, 0.0
        array = self.array
        array.size, array.selected, array.sorted = count, -1, False
        return ctypes.byref(array)

    def allowed(self) -> Any:
        """Logits the grammar left finite."""
        logits = self.view["logit"][: self.array.size]
        return logits[np.isfinite(logits)]

    def selected(self) -> int:
        return int(self.view[self.array.selected]["id"])


class ConstrainedSampler:
    """Decode-thread helper; one per scheduler (its buffers are reused for every sequence)."""

    def __init__(self, llama: Any, ctx: Any, n_vocab: int) -> None:
        self.llama = llama
        self.ctx = ctx
        self.n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._one = _Candidates(llama, 1)
        self._tiers = [_Candidates(llama, size) for size in CANDIDATE_TIERS if size < n_vocab]
        self._all = _Candidates(llama, n_vocab)
        self._remembered = _Candidates(llama, min(MAX_REMEMBERED, n_vocab))
        self._last_full_allowed: Any = None  # ids the grammar allowed in the last whole-vocabulary pass
        self.full_passes = 0  # whole-vocabulary grammar passes (the slow path), for tests and profiling
        self._first_allowed: OrderedDict[str, Any] = OrderedDict()  # grammar text -> ids allowed at its start
        self._vocab = llama.llama_model_get_vocab(llama.llama_get_model(ctx))
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)

    def sample(self, chain: Any, grammar: Any, index: int, params: SamplingParams, *, first: bool = False) -> int:
        """The sequence's next token; ``first``: the grammar is still in its initial state.

        The token returned is the one accepted into the chain (whose penalties
        remember it) and into the grammar, also when the grammar rejected the
        chain's first pick.
        """
        llama = self.llama
        if isinstance(grammar, LazyGrammar) and grammar.dormant:
            token = int(llama.llama_sampler_sample(chain, self.ctx, index))
            replay = grammar.observe(token, self._piece(token))
            for spelled in replay or ():  # the trigger is out: the llama.cpp grammar takes over from it
                llama.llama_sampler_accept(grammar, spelled)
            return token
        stateful = _has_penalties(params)  # the only chain samplers that remember accepted tokens
        if stateful:  # pick without accepting: the chain must remember the token finally emitted
            logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
            llama.llama_sampler_apply(chain, self._all.load(self._ids, logits))
            token = self._all.selected()
        else:  # llama_sampler_sample accepts its pick, which a chain without penalties forgets at once
            token = int(llama.llama_sampler_sample(chain, self.ctx, index))
        if self._rejects(grammar, token):
            logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
            key = params.grammar if first and params.grammar_trigger is None else None
            remembered = self._first_allowed.get(key) if key is not None else None
            if remembered is not None:
                self._first_allowed.move_to_end(key)  # type: ignore[arg-type]
                token = self._pick(self._remembered, remembered, chain, grammar, logits)
            else:
                token = self._resample(chain, grammar, logits, params)
                if key is not None and self._last_full_allowed is not None:
                    self._remember(key, self._last_full_allowed)
        if stateful:
            llama.llama_sampler_accept(chain, token)
        llama.llama_sampler_accept(grammar, token)
        return token

    def _piece(self, token: int) -> bytes:
        """The token's text as llama.cpp's grammar sees it (special tokens spelled out)."""
        cached = self._pieces.get(token)
        if cached is None:
            size = self.llama.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, True)
            cached = self._piece_buf.raw[:max(size, 0)]
            self._pieces[token] = cached
        return cached

    def _remember(self, key: str, ids: Any) -> None:
        if len(ids) > MAX_REMEMBERED:
            return
        self._first_allowed[key] = ids
        while len(self._first_allowed) > REMEMBERED_GRAMMARS:
            self._first_allowed.popitem(last=False)

    def _pick(self, pool: _Candidates, ids: Any, chain: Any, grammar: Any, logits: Any) -> int:
        """The chain's pick among exactly the tokens the grammar allows (``ids``, in id order)."""
        array = pool.load(ids, logits[ids])
        self.llama.llama_sampler_apply(grammar, array)
        self.llama.llama_sampler_apply(chain, array)
        return pool.selected()

    def _resample(self, chain: Any, grammar: Any, logits: Any, params: SamplingParams) -> int:
        self._last_full_allowed = None
        if self._tiers and self._exact_possible(params):
            for tier in self._tiers:
                # One partial sort per tier actually tried (a single split point is ~5x cheaper than three).
                size = len(tier.view)
                ids = np.sort(np.argpartition(logits, self.n_vocab - size)[-size:])  # id order, as the full pass
                top = logits[ids]
                array = tier.load(ids, top)
                self.llama.llama_sampler_apply(grammar, array)
                if self._exact(params, tier.allowed(), float(top.min())):
                    self.llama.llama_sampler_apply(chain, array)
                    return tier.selected()
        return self._sample_all(chain, grammar, logits)

    def _rejects(self, grammar: Any, token: int) -> bool:
        self._one.load((token,), (1.0,))
        self.llama.llama_sampler_apply(grammar, ctypes.byref(self._one.array))
        logit = float(self._one.view[0]["logit"])
        return math.isinf(logit) and logit < 0

    @staticmethod
    def _exact_possible(params: SamplingParams) -> bool:
        # A bias or a negative penalty can lift a token from outside the top candidates above them.
        negative = params.presence_penalty < 0 or params.frequency_penalty < 0 or params.repeat_penalty < 1
        return not params.logit_bias and not negative

    @staticmethod
    def _exact(params: SamplingParams, allowed: Any, floor: float) -> bool:
        """Whether no token outside the top candidates (all with logits <= ``floor``) could be picked."""
        if not len(allowed):
            return False
        penalties = params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        if params.greedy:
            return not penalties  # penalties come before the greedy pick and may reorder the candidates
        if 0 < params.top_k <= len(allowed):
            return True  # top-k keeps only top candidates; penalties and the rest come after it
        # min-p drops everything below max + ln(min_p) (without penalties the max is the top allowed logit).
        return params.min_p > 0 and not penalties and floor < float(allowed.max()) + math.log(params.min_p)

    def _sample_all(self, chain: Any, grammar: Any, logits: Any) -> int:
        self.full_passes += 1
        array = self._all.load(self._ids, logits)
        self.llama.llama_sampler_apply(grammar, array)
        self._last_full_allowed = np.flatnonzero(np.isfinite(self._all.view["logit"])).astype(np.int32)
        self.llama.llama_sampler_apply(chain, array)
        return self._all.selected()


def _has_penalties(params: SamplingParams) -> bool:
    return bool(params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty)
