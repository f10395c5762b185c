"""The grammar sampler's fast path (top candidates only) picks exactly what the whole-vocabulary pass picks.

Real model, in-process: at every step both samplers see the same logits, each
with its own identically seeded chain and grammar; their tokens must agree,
the output must follow the grammar, and the fast path must skip most
whole-vocabulary passes (the reason it exists).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    try:
        _decode(model, batch, prompt, 0)
        for _ in range(40):
            index = batch.n_tokens - 1
            token = fast.sample(*pairs[0], index, params, first=not out)
            assert full.sample(*pairs[1], index, params, first=not out) == token, model.detokenize(out)
            if model.is_eog(token):
                text = model.detokenize(out)
                assert isinstance(json.loads(text)["notes"], list), text
                break
            out.append(token)
            _decode(model, batch, [token], len(prompt) + len(out) - 1)
    finally:
        llama.llama_batch_free(batch)
        for chain, grammar in pairs:
            llama.llama_sampler_free(chain)
            llama.llama_sampler_free(grammar)
    return model.detokenize(out)


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
