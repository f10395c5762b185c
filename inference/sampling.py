"""Per-sequence sampling parameters and the llama.cpp sampler chain built from them.

Each sequence owns its chain, so one request's temperature, seed, penalties
or grammar never leaks into another's. A grammar (structured outputs) is a
separate sampler, checked against the chain's pick (inference.constrained);
compiled grammars are cached and cloned per sequence.
"""

from __future__ import annotations

import ctypes
import random
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GRAMMARS", "LazyGrammar", "SamplingParams", "build_grammar", "build_sampler_chain", "compile_grammar"]

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


class LazyGrammar:
    """A grammar that stays dormant until the output contains ``trigger``, watched at constant cost per token.

    llama.cpp's lazy grammar appends every token to a buffer and searches the
    whole buffer at each token (quadratic over a long answer; the
    ``[\\s\\S]*?(...)[\\s\\S]*`` pattern form also overflowed the stack in
    llama.cpp). Here the literal is looked for in the last few bytes only, and
    the llama.cpp sampler (lazy, the escaped literal as its pattern) is fed just
    the tokens that spell the trigger, from where it takes over as usual.
    Passed to ctypes it is the sampler (``_as_parameter_``), so whoever frees
    the sequence's grammar frees this one too.
    """

    def __init__(self, sampler: Any, trigger: bytes) -> None:
        self._as_parameter_ = sampler
        self.trigger = trigger
        self.dormant = True
        self.scanned = 0  # bytes examined for the trigger so far (work count, for tests)
        self._tail = b""  # the last len(trigger) - 1 bytes of output
        self._window: list[tuple[int, bytes]] = []  # the tokens the tail (and the current token) came from

    def observe(self, token: int, piece: bytes) -> list[int] | None:
        """Note one emitted token while dormant; the tokens to replay into the sampler once the trigger is out."""
        text = self._tail + piece
        self.scanned += len(text)
        self._window.append((token, piece))
        if self.trigger in text:
            self.dormant = False
            tokens = [tok for tok, _ in self._window]
            self._window, self._tail = [], b""
            return tokens
        keep = len(self.trigger) - 1
        self._tail = text[-keep:] if keep else b""
        covered = sum(len(p) for _, p in self._window)
        while self._window and covered - len(self._window[0][1]) >= keep:
            covered -= len(self._window.pop(0)[1])
        return None


class _GrammarCache:
    """Compiled grammar samplers in their initial state, per vocabulary and grammar (LRU).

    Parsing a large GBNF takes milliseconds: :func:`compile_grammar` does it
    off the event loop once per distinct grammar, and :func:`build_grammar`
    (on submit) only clones the pristine copy.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[int, str, str | None], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars parsed (not cloned), for tests

    def get(self, llama: Any, vocab: Any, params: SamplingParams) -> Any:
        key = (_address(vocab), params.grammar or "", params.grammar_trigger)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        fresh = _parse_grammar(llama, vocab, params)
        with self._lock:
            self.compiled += 1
            found = self._items.get(key)
            if found is not None:  # compiled twice at once: keep the first
                llama.llama_sampler_free(fresh)
                return found
            self._items[key] = fresh
            while len(self._items) > self._size:
                llama.llama_sampler_free(self._items.popitem(last=False)[1])
            return fresh

    def clone(self, llama: Any, vocab: Any, params: SamplingParams) -> Any:
        with self._lock:  # a clone must not race the eviction (free) of its original
            key = (_address(vocab), params.grammar or "", params.grammar_trigger)
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return llama.llama_sampler_clone(found)
        self.get(llama, vocab, params)
        return self.clone(llama, vocab, params)


GRAMMARS = _GrammarCache(64)


def _address(pointer: Any) -> int:
    value = getattr(pointer, "value", pointer)
    return int(value) if value is not None else 0


def _parse_grammar(llama: Any, vocab: Any, params: SamplingParams) -> Any:
    grammar_text = (params.grammar or "").encode()
    if params.grammar_trigger is not None:
        patterns = (ctypes.c_char_p * 1)(re.escape(params.grammar_trigger).encode())
        grammar = llama.llama_sampler_init_grammar_lazy_patterns(vocab, grammar_text, b"root", patterns, 1, None, 0)
    else:
        grammar = llama.llama_sampler_init_grammar(vocab, grammar_text, b"root")
    if not grammar:
        raise ValueError("the grammar could not be parsed")
    return grammar


def compile_grammar(llama: Any, vocab: Any, params: SamplingParams) -> None:
    """Parse the request's grammar into the cache (blocking: call it off the event loop)."""
    if params.grammar is not None:
        GRAMMARS.get(llama, vocab, params)


def build_grammar(llama: Any, vocab: Any, params: SamplingParams) -> Any:
    """The sequence's grammar sampler, or None; kept out of the chain (see inference.constrained)."""
    if params.grammar is None:
        return None
    grammar = GRAMMARS.clone(llama, vocab, params)
    if not grammar:
        raise ValueError("the grammar could not be parsed")
    if params.grammar_trigger is not None:
        return LazyGrammar(grammar, params.grammar_trigger.encode())
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
