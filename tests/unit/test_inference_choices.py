"""``n`` choices: the one n rule, derived seeds, usage counted as OpenAI does, choice indices, the cache key."""

from __future__ import annotations

import asyncio

import pytest

from appliance.core.errors import APIError
from appliance.core.wire import ChatCompletionRequest, CompletionRequest, check_n, reject_unsupported
from gateway.cache import cache_key
from inference.answers import stream, usage
from inference.replies import ChatReply, CompletionReply
from inference.sampling import SamplingParams
from inference.sequence import GenerationRequest, SequenceHandle
from inference.service import choices
from inference.structured import StructuredPlan

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _chat(**extra: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({**CHAT, **extra})


def test_n_up_to_the_slot_count_is_served_and_above_it_is_a_400_naming_n() -> None:
    reject_unsupported(_chat(n=4))
    reject_unsupported(CompletionRequest.model_validate({"model": "m", "prompt": "x", "n": 3}))
    check_n(_chat(n=4), 4)
    with pytest.raises(APIError) as info:
        check_n(_chat(n=5), 4)
    assert (info.value.status, info.value.param, info.value.code) == (400, "n", "too_many_choices")


def test_choice_i_samples_with_seed_plus_i_and_unseeded_choices_draw_their_own() -> None:
    base = GenerationRequest(prompt_tokens=[1, 2, 3], max_tokens=4, sampling=SamplingParams(seed=41))
    seeded = choices(base, 3)
    assert [c.sampling.seed for c in seeded] == [41, 42, 43]
    assert all(c.prompt_tokens == base.prompt_tokens and c.max_tokens == 4 for c in seeded)
    assert seeded[0] is base  # choice 0 is what n=1 would sample
    unseeded = GenerationRequest(prompt_tokens=[1], max_tokens=1)
    assert [c.sampling.seed for c in choices(unseeded, 2)] == [None, None]


def _handle(prompt: int, completion: int, cached: int) -> SequenceHandle:
    handle = SequenceHandle(GenerationRequest(prompt_tokens=list(range(prompt)), max_tokens=8), sampler=None)
    handle.completion_tokens, handle.cached_tokens = completion, cached
    return handle


def test_a_prompt_counts_once_however_many_choices_and_completions_add_up() -> None:
    # Two prompts (10 and 6 tokens) x n=2: the first choice of each prefilled, the second copied its cells.
    handles = [_handle(10, 3, 0), _handle(10, 5, 8), _handle(6, 1, 4), _handle(6, 2, 4)]
    counted = usage(handles, 2)
    assert (counted.prompt_tokens, counted.completion_tokens, counted.total_tokens) == (16, 11, 27)
    assert counted.prompt_tokens_details.cached_tokens == 4
    assert usage(handles).prompt_tokens == 32  # n=1: every handle is a prompt of its own


def test_streamed_chunks_carry_their_choice_index_and_usage_comes_once() -> None:
    handles = [_handle(5, 0, 0) for _ in range(2)]
    reply = ChatReply("chatcmpl-x", "m", 0, StructuredPlan(), False)
    pairs = [(h, ChatReply("chatcmpl-x", "m", 0, StructuredPlan(), False, index=i).emitter())
             for i, h in enumerate(handles)]

    async def run() -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        chunks = stream(pairs, {**reply.chunk({}), "choices": []}, 2)
        for i, handle in enumerate(handles):
            handle.push(f"t{i}", 1, "stop", None)
        async for chunk in chunks:
            out.append(chunk)
        return out

    out = asyncio.run(run())
    indices = [c["choices"][0]["index"] for c in out if c["choices"]]  # type: ignore[index]
    assert sorted(set(indices)) == [0, 1] and indices.count(0) == indices.count(1) == 3  # role, text, finish
    assert [c for c in out if "usage" in c] == [out[-1]]
    assert out[-1]["usage"]["prompt_tokens"] == 5 and out[-1]["usage"]["completion_tokens"] == 2  # type: ignore[index]
    assert CompletionReply("cmpl-x", "m", 0, False, index=3).choice("a", [], "stop")["index"] == 3


def test_the_response_cache_keys_on_n() -> None:
    assert cache_key("chat", _chat(n=2, temperature=0), "sha") != cache_key("chat", _chat(temperature=0), "sha")
