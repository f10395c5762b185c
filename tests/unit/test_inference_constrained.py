"""The grammar sampler's fast path (top candidates only) picks exactly what the whole-vocabulary pass picks.

Real model, in-process: at every step both samplers see the same logits, each
with its own identically seeded chain and grammar; their tokens must agree,
the output must follow the grammar, and the fast path must skip most
whole-vocabulary passes (the reason it exists).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.constrained import ConstrainedSampler
from inference.model import LoadedModel
from inference.sampling import SamplingParams, build_grammar, build_sampler_chain
from inference.settings import WorkerSettings
from inference.structured import schema_grammar

SCHEMA = {
    "type": "object",
    "properties": {"notes": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2}},
    "required": ["notes"],
}
PROMPT = "User: The history of the printing press begins\nAssistant:"
COMPARED = 40  # picks checked against the whole-vocabulary pass


@pytest.fixture(scope="module")
def model(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedModel]:
    config = tmp_path_factory.mktemp("constrained") / "empty.toml"
    config.write_text("")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_CONFIG", str(config))
        settings = WorkerSettings(model_path=str(model_path), slots=1, n_ctx=256, n_threads=2)
    loaded = LoadedModel(model_path, "test", settings)
    yield loaded
    loaded.close()


def _decode(model: LoadedModel, batch: Any, tokens: list[int], start: int) -> None:
    for n, token in enumerate(tokens):
        batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, start + n, 1, 0
        batch.seq_id[n][0] = 0
    batch.logits[len(tokens) - 1] = 1
    batch.n_tokens = len(tokens)
    assert model.llama.llama_decode(model.ctx, batch) == 0


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=7),
        SamplingParams(temperature=1.0, top_k=0, min_p=0.05, seed=11),
        SamplingParams(temperature=0.7, top_p=0.9, frequency_penalty=0.5, seed=3),
    ],
    ids=["greedy", "top_k", "min_p_only", "top_p_penalty"],
)
def test_fast_path_matches_the_whole_vocabulary(model: LoadedModel, params: SamplingParams) -> None:
    params = SamplingParams(
        **{**{f: getattr(params, f) for f in params.__dataclass_fields__}, "grammar": schema_grammar(SCHEMA)}
    )
    fast = ConstrainedSampler(model.llama, model.ctx, model.n_vocab)
    full = ConstrainedSampler(model.llama, model.ctx, model.n_vocab)
    full._tiers = []  # the reference: every rejection goes through the whole vocabulary
    full._remember = lambda key, ids: None  # type: ignore[method-assign]  # ... and nothing is remembered
    first = _generate(model, fast, full, params)
    passes = fast.full_passes
    assert passes < full.full_passes or full.full_passes == 0, (passes, full.full_passes)
    # The same grammar again: its first token comes from the remembered allowed set, still the same pick.
    assert _generate(model, fast, full, params) == first
    assert fast.full_passes - passes <= max(0, passes - 1), (passes, fast.full_passes)


def _generate(model: LoadedModel, fast: ConstrainedSampler, full: ConstrainedSampler, params: SamplingParams) -> str:
    """Generate with both samplers on the same logits, asserting every pick agrees; the text."""
    llama = model.llama
    pairs = [
        (build_sampler_chain(llama, model.vocab, model.n_vocab, params), build_grammar(llama, model.vocab, params))
        for _ in range(2)
    ]
    llama.llama_memory_clear(model.memory, True)
    batch = llama.llama_batch_init(256, 0, 1)
    prompt = model.tokenize(PROMPT, add_special=True, parse_special=False)
    out: list[int] = []
    ended = False
    try:
        _decode(model, batch, prompt, 0)
        # The schema bounds the document (two notes of at most 12 characters), so the grammar must end it
        # within the context; the output is checked against the schema every time, not only when short.
        # The whole-vocabulary reference is slow: it checks the first COMPARED picks, the fast path goes on.
        while len(prompt) + len(out) < model.shape.n_ctx_per_slot - 1:
            index = batch.n_tokens - 1
            token = fast.sample(*pairs[0], index, params, first=not out)
            if len(out) < COMPARED:
                assert full.sample(*pairs[1], index, params, first=not out) == token, model.detokenize(out)
            if model.is_eog(token):
                ended = True
                break
            out.append(token)
            _decode(model, batch, [token], len(prompt) + len(out) - 1)
    finally:
        llama.llama_batch_free(batch)
        for chain, grammar in pairs:
            llama.llama_sampler_free(chain)
            llama.llama_sampler_free(grammar)
    text = model.detokenize(out)
    assert ended, f"the grammar did not end the document in {len(out)} tokens: {text!r}"
    notes = json.loads(text)["notes"]
    assert isinstance(notes, list) and len(notes) <= 2 and all(isinstance(n, str) and len(n) <= 12 for n in notes), text
    return text


def test_lazy_tool_grammar_wakes_at_the_trigger(model: LoadedModel) -> None:
    from appliance.core.wire import Tool
    from inference.structured import LAZY_TRIGGER, lazy_tool_grammar

    tool = Tool.model_validate(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    )
    params = SamplingParams(grammar=lazy_tool_grammar([tool]), grammar_trigger=LAZY_TRIGGER)
    llama = model.llama
    grammar = build_grammar(llama, model.vocab, params)
    sampler = ConstrainedSampler(llama, model.ctx, model.n_vocab)

    def rejects(text: str) -> bool:  # the grammar's verdict on the first token of ``text``
        return sampler._rejects(grammar, model.tokenize(text, add_special=False, parse_special=False)[0])

    def accept(text: str) -> None:
        for token in model.tokenize(text, add_special=False, parse_special=False):
            llama.llama_sampler_accept(grammar, token)

    try:
        assert not rejects("Hello there") and not rejects("}{ anything")  # dormant: free text
        accept("Let me look that up. ")
        assert not rejects("Hello")
        accept(LAZY_TRIGGER)
        assert rejects("Hello") and not rejects('{"')  # awake: only a call may follow
    finally:
        llama.llama_sampler_free(grammar)


def _candidates(model: LoadedModel, index: int) -> Any:
    from inference.constrained import _Candidates

    logits = np.ctypeslib.as_array(model.llama.llama_get_logits_ith(model.ctx, index), shape=(model.n_vocab,))
    pool = _Candidates(model.llama, model.n_vocab)
    pool.load(np.arange(model.n_vocab, dtype=np.int32), logits)
    return pool


def test_the_emitted_token_is_the_one_the_penalties_remember(model: LoadedModel) -> None:
    """After the grammar overrules the chain's pick, the chain's penalties count the token actually emitted.

    A reference chain (same settings, no grammar) is told every emitted token; before each pick a clone of
    the sequence's chain and the reference must penalise the same logits identically.
    """
    params = SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5,
                            grammar=schema_grammar(SCHEMA))
    llama = model.llama
    chain = build_sampler_chain(llama, model.vocab, model.n_vocab, params)
    reference = build_sampler_chain(llama, model.vocab, model.n_vocab, params)
    grammar = build_grammar(llama, model.vocab, params)
    sampler = ConstrainedSampler(llama, model.ctx, model.n_vocab)
    llama.llama_memory_clear(model.memory, True)
    batch = llama.llama_batch_init(256, 0, 1)
    prompt = model.tokenize(PROMPT, add_special=True, parse_special=False)
    out: list[int] = []
    overruled = 0
    try:
        _decode(model, batch, prompt, 0)
        for _ in range(24):
            index = batch.n_tokens - 1
            probe = llama.llama_sampler_clone(chain)
            mine, theirs = _candidates(model, index), _candidates(model, index)
            llama.llama_sampler_apply(probe, ctypes.byref(mine.array))
            llama.llama_sampler_apply(reference, ctypes.byref(theirs.array))
            llama.llama_sampler_free(probe)
            assert np.array_equal(mine.view["logit"], theirs.view["logit"]), f"penalties differ after {out}"
            token = sampler.sample(chain, grammar, index, params, first=not out)
            overruled += token != theirs.selected()
            llama.llama_sampler_accept(reference, token)
            if model.is_eog(token):
                break
            out.append(token)
            _decode(model, batch, [token], len(prompt) + len(out) - 1)
    finally:
        llama.llama_batch_free(batch)
        for item in (chain, reference, grammar):
            llama.llama_sampler_free(item)
    assert overruled > 0, "the grammar never overruled the chain: the test would prove nothing"


def _forcing_chain(model: LoadedModel, token: int) -> Any:
    """A greedy chain that picks ``token`` (a +100 bias), to drive emitted tokens through ``sample``."""
    return build_sampler_chain(model.llama, model.vocab, model.n_vocab,
                               SamplingParams(temperature=0.0, logit_bias={token: 100.0}))


def _tool_params() -> SamplingParams:
    from appliance.core.wire import Tool
    from inference.structured import LAZY_TRIGGER, lazy_tool_grammar

    tool = Tool.model_validate({"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    return SamplingParams(temperature=1.0, seed=5, grammar=lazy_tool_grammar([tool]), grammar_trigger=LAZY_TRIGGER)


def test_lazy_trigger_work_per_token_stays_flat_over_2000_tokens(model: LoadedModel) -> None:
    """With tools declared, watching for ``<tool_call>`` costs the same at token 2,000 as at token 1.

    Work is counted (bytes examined for the trigger per token), not timed: llama.cpp's own lazy grammar
    searches all output so far at every token, which grows linearly (quadratic over the answer).
    """
    params = _tool_params()
    llama = model.llama
    grammar = build_grammar(llama, model.vocab, params)
    chain = build_sampler_chain(llama, model.vocab, model.n_vocab, params)
    sampler = ConstrainedSampler(llama, model.ctx, model.n_vocab)
    llama.llama_memory_clear(model.memory, True)
    batch = llama.llama_batch_init(256, 0, 1)
    per_token: list[int] = []
    emitted = 0
    try:
        _decode(model, batch, model.tokenize(PROMPT, add_special=True, parse_special=False), 0)
        index = batch.n_tokens - 1
        for _ in range(2000):  # the same logits each time: what is measured is the watch, not the model
            before = grammar.scanned
            token = sampler.sample(chain, grammar, index, params, first=False)
            per_token.append(grammar.scanned - before)
            emitted += len(sampler._piece(token))
        assert grammar.dormant, "the random text spelled the trigger"
    finally:
        llama.llama_batch_free(batch)
        llama.llama_sampler_free(chain)
        llama.llama_sampler_free(grammar)
    longest_piece = max(len(sampler._piece(t)) for t in range(model.n_vocab))
    bound = len(grammar.trigger) - 1 + longest_piece
    assert emitted > 4000 and max(per_token) <= bound, (emitted, max(per_token), bound)
    first, last = per_token[:500], per_token[-500:]
    assert sum(last) <= 2 * sum(first) + 500, (sum(first), sum(last))


def test_lazy_grammar_wakes_when_the_emitted_tokens_spell_the_trigger(model: LoadedModel) -> None:
    params = _tool_params()
    llama = model.llama
    grammar = build_grammar(llama, model.vocab, params)
    sampler = ConstrainedSampler(llama, model.ctx, model.n_vocab)
    llama.llama_memory_clear(model.memory, True)
    batch = llama.llama_batch_init(256, 0, 1)
    try:
        _decode(model, batch, model.tokenize(PROMPT, add_special=True, parse_special=False), 0)
        index = batch.n_tokens - 1
        for token in model.tokenize("Let me check.\n<tool_call>", add_special=False, parse_special=False):
            assert grammar.dormant
            chain = _forcing_chain(model, token)
            assert sampler.sample(chain, grammar, index, params) == token
            llama.llama_sampler_free(chain)
        assert not grammar.dormant
        first = model.tokenize('{"', add_special=False, parse_special=False)[0]
        assert sampler._rejects(grammar, model.tokenize("Hello", add_special=False, parse_special=False)[0])
        assert not sampler._rejects(grammar, first)
    finally:
        llama.llama_batch_free(batch)
        llama.llama_sampler_free(grammar)


def test_a_repeated_grammar_is_compiled_once_and_cloned(model: LoadedModel) -> None:
    from inference.sampling import GRAMMARS, compile_grammar

    params = SamplingParams(grammar=schema_grammar({"type": "object", "properties": {"k": {"type": "integer"}}}))
    before = GRAMMARS.compiled
    compile_grammar(model.llama, model.vocab, params)
    compile_grammar(model.llama, model.vocab, params)
    one, two = (build_grammar(model.llama, model.vocab, params) for _ in range(2))
    try:
        assert GRAMMARS.compiled == before + 1
        assert one != two  # each sequence gets its own copy (grammar state is per sequence)
        brace = model.tokenize("{", add_special=False, parse_special=False)[0]
        model.llama.llama_sampler_accept(one, brace)  # advancing one copy leaves the other at its start
        sampler = ConstrainedSampler(model.llama, model.ctx, model.n_vocab)
        assert sampler._rejects(one, brace) and not sampler._rejects(two, brace)
    finally:
        model.llama.llama_sampler_free(one)
        model.llama.llama_sampler_free(two)
