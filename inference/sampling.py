"""Per-sequence sampling parameters and the llama.cpp sampler chain built from them.

Each sequence owns its chain, so one request's temperature, seed, penalties
or grammar never leaks into another's. A grammar (structured outputs) is a
separate sampler, checked against the chain's pick (inference.constrained).
"""

from __future__ import annotations

import ctypes
import random
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SamplingParams", "build_grammar", "build_sampler_chain"]

# How many recent tokens the repetition penalties look at (llama.cpp's default).
PENALTY_LAST_N = 64


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF, root rule "root"
    grammar_trigger: str | None = None  # the grammar is lazy: dormant until the output contains this text

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def resolved_seed(self) -> int:
        return self.seed & 0xFFFFFFFF if self.seed is not None else random.getrandbits(32)


def build_grammar(llama: Any, vocab: Any, params: SamplingParams) -> Any:
    """The sequence's grammar sampler, or None; kept out of the chain (see inference.constrained)."""
    if params.grammar is None:
        return None
    if params.grammar_trigger is not None:
        # llama.cpp matches the pattern against all output so far; the grammar starts at the first group.
        pattern = f"[\\s\\S]*?({re.escape(params.grammar_trigger)})[\\s\\S]*".encode()
        patterns = (ctypes.c_char_p * 1)(pattern)
        grammar = llama.llama_sampler_init_grammar_lazy_patterns(
            vocab, params.grammar.encode(), b"root", patterns, 1, None, 0)
    else:
        grammar = llama.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
    if not grammar:
        raise ValueError("the grammar could not be parsed")
    return grammar


def build_sampler_chain(llama: Any, vocab: Any, n_vocab: int, params: SamplingParams) -> Any:
    """A new sampler chain without the grammar (caller frees it with ``llama_sampler_free``).

    ``llama`` is the ``llama_cpp`` module, passed in so importing this module
    stays free of the native library.
    """
    chain_params = llama.llama_sampler_chain_default_params()
    chain_params.no_perf = True
    chain = llama.llama_sampler_chain_init(chain_params)
    add = llama.llama_sampler_chain_add
    if params.logit_bias:
        biases = (llama.llama_logit_bias * len(params.logit_bias))()
        for slot, (token, bias) in enumerate(params.logit_bias.items()):
            biases[slot].token = token
            biases[slot].bias = bias
        add(chain, llama.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
    penalties = params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
    if params.greedy:
        if penalties:
            add(chain, _penalties(llama, n_vocab, params))
        add(chain, llama.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(chain, llama.llama_sampler_init_top_k(params.top_k))
    if penalties:  # after top-k: searching the whole vocabulary for repeats is slow
        add(chain, _penalties(llama, n_vocab, params))
    if params.top_p < 1.0:
        add(chain, llama.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(chain, llama.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, llama.llama_sampler_init_temp(params.temperature))
    add(chain, llama.llama_sampler_init_dist(params.resolved_seed()))
    return chain


def _penalties(llama: Any, n_vocab: int, params: SamplingParams) -> Any:
    return llama.llama_sampler_init_penalties(
        n_vocab, PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty,
    )
