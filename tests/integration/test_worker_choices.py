"""``n`` choices on a real worker (official ``openai`` client): one prefill shared by every choice, the greedy
answer n times, distinct seeded samples, OpenAI's usage, indices whole and streamed, limits, and a hang-up."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from appliance.core.hop import KEY_ID_HEADER
from tests.support.inference_worker import MODEL, Worker, check_token_logprobs, spawn_worker, wait_idle

pytestmark = pytest.mark.integration

SLOTS = 4
SYSTEM = "You are the garden centre's assistant. Answer in one short sentence. " * 16
QUESTION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which plants like shade?"}]


@pytest.fixture(scope="module")
def worker(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    # Deterministic mode: the choices are the greedy answer bit for bit (in the fast mode they may part where two
    # tokens are near-tied: the follower choices decode the prompt's last token in a chunk of another size).
    with spawn_worker(model_path, tmp_path_factory.mktemp("choices-worker"), slots=str(SLOTS), n_ctx="1024",
                      queue_size="4", deterministic="true") as worker:
        yield worker


def counter(worker: Worker, name: str) -> float:
    text = worker.get("/metrics")[1].decode()
    match = re.search(rf"^appliance_worker_{name}_total{{[^}}]*}} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def _key(name: str) -> dict[str, str]:
    return {KEY_ID_HEADER: name}  # a scope of its own: nothing cached from other tests


def _streamed(chunks: Any) -> tuple[dict[int, str], list[Any]]:
    """Each choice's text by index, and the usage chunks."""
    texts: dict[int, str] = {}
    usages = []
    for chunk in chunks:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
    return texts, usages


def test_chat_choices_prefill_the_prompt_once_and_are_the_greedy_answer(worker: Worker) -> None:
    client = worker.client()
    before = counter(worker, "prompt_tokens_prefilled")
    many = client.chat.completions.create(model=MODEL, messages=QUESTION, n=3, max_tokens=12, temperature=0,
                                          extra_headers=_key("key_nwhole"))
    prefilled = counter(worker, "prompt_tokens_prefilled") - before
    single = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                            extra_headers=_key("key_nsingle"))  # prefilled afresh, no reuse
    answer = single.choices[0].message.content
    assert answer and [c.index for c in many.choices] == [0, 1, 2]
    assert [c.message.content for c in many.choices] == [answer] * 3
    assert many.usage is not None and single.usage is not None
    prompt = single.usage.prompt_tokens
    assert many.usage.prompt_tokens == prompt > 150  # counted once, as OpenAI does
    assert many.usage.completion_tokens == 3 * single.usage.completion_tokens
    assert many.usage.prompt_tokens_details is not None and many.usage.prompt_tokens_details.cached_tokens == 0
    # The first choice prefilled the prompt; the others copied its cells (and decode their last tokens again).
    assert prompt <= prefilled < prompt + 16, (prefilled, prompt)

    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, n=3, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_headers=_key("key_nstream"))
    texts, usages = _streamed(stream)
    assert texts == {0: answer, 1: answer, 2: answer}
    assert len(usages) == 1 and usages[0].prompt_tokens == prompt
    assert usages[0].completion_tokens == 3 * single.usage.completion_tokens

    again = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, max_tokens=12, temperature=0,
                                           extra_headers=_key("key_nwhole"))  # the same key's next request reuses
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert 0 < (again.usage.prompt_tokens_details.cached_tokens or 0) < prompt
    assert [c.message.content for c in again.choices] == [answer] * 2


def test_seeded_choices_differ_repeat_and_stream_the_same(worker: Worker) -> None:
    client = worker.client()
    ask: dict[str, Any] = {"model": MODEL, "prompt": "Once upon a time, in a small village by the sea,",
                           "max_tokens": 12, "temperature": 1.0, "seed": 7}
    first = client.completions.create(**ask, n=3)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1, texts  # choice i samples with seed + i
    assert [c.text for c in client.completions.create(**ask, n=3).choices] == texts
    assert client.completions.create(**ask).choices[0].text == texts[0]  # n=1 is choice 0
    streamed, usages = _streamed(client.completions.create(**ask, n=3, stream=True,
                                                           stream_options={"include_usage": True}))
    assert streamed == dict(enumerate(texts)) and len(usages) == 1
    assert first.usage is not None and usages[0].completion_tokens == first.usage.completion_tokens


def test_a_list_of_prompts_times_n_is_indexed_prompt_by_prompt(worker: Worker) -> None:
    client = worker.client()
    prompts = ["The capital of France is", "Two plus two equals"]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    both = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [s.choices[0].text for s in singles for _ in range(2)]
    assert both.usage is not None and all(s.usage is not None for s in singles)
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles if s.usage)
    assert both.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in singles if s.usage)


@pytest.mark.parametrize("n", [0, SLOTS + 1])
def test_n_outside_one_to_the_slot_count_is_a_400_naming_n(worker: Worker, n: int) -> None:
    for path, body in (("/v1/chat/completions", {"messages": QUESTION}), ("/v1/completions", {"prompt": "Hi"})):
        status, reply = worker.post(path, {"model": MODEL, **body, "n": n})
        assert status == 400 and reply["error"]["param"] == "n", reply
    with pytest.raises(openai.BadRequestError, match="n is"):
        worker.client().chat.completions.create(model=MODEL, messages=QUESTION, n=SLOTS + 1, max_tokens=1)


def test_a_hang_up_cancels_every_choice(worker: Worker) -> None:
    client = worker.client()
    before = counter(worker, "generated_tokens")
    longest = 600  # a plain prompt, no template stop strings: without the hang-up every choice runs this long
    stream = client.completions.create(model=MODEL, prompt="Here is a very long story about the sea.", n=3,
                                       max_tokens=longest, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}, extra_headers=_key("key_nhangup"))
    chunks = iter(stream)
    for _ in range(8):
        next(chunks)
    stream.close()
    wait_idle(worker, timeout=200)
    generated = counter(worker, "generated_tokens") - before
    assert 0 < generated < 3 * longest / 2, generated  # every choice stopped long before its max_tokens


def test_without_prefix_reuse_the_choices_still_prefill_the_prompt_once(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with spawn_worker(model_path, tmp_path_factory.mktemp("choices-no-reuse"), slots="3", n_ctx="1024",
                      prefix_reuse="false", deterministic="true") as worker:
        client = worker.client()
        single = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
        assert single.usage is not None
        before = counter(worker, "prompt_tokens_prefilled")
        many = client.chat.completions.create(model=MODEL, messages=QUESTION, n=3, max_tokens=8, temperature=0)
        prefilled = counter(worker, "prompt_tokens_prefilled") - before
        prompt = single.usage.prompt_tokens
        assert [c.message.content for c in many.choices] == [single.choices[0].message.content] * 3
        assert prompt <= prefilled < prompt + 16, (prefilled, prompt)  # not 3 x prompt
        before = counter(worker, "prompt_tokens_prefilled")
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1, temperature=0)
        assert counter(worker, "prompt_tokens_prefilled") - before == prompt  # nothing reused across requests


def test_chat_logprobs_whole_and_streamed(worker: Worker) -> None:
    """Streamed logprobs are the whole answer's, token for token. Here, on the deterministic worker: the
    streamed request reuses the first one's prompt cells, and in the fast mode a near-tie may then break the
    other way (seen: EOS after 7 tokens whole, a newline streamed)."""
    client = worker.client()
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
           "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    whole = client.chat.completions.create(**ask).choices[0]
    assert whole.logprobs is not None and whole.logprobs.content
    items = whole.logprobs.content
    check_token_logprobs(whole.message.content or "", items, 5)
    for item in items:  # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == pytest.approx(item.logprob)
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    streamed = []
    for chunk in chunks:
        choice = chunk.choices[0]
        mine = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
        assert "".join(item.token for item in mine) == (choice.delta.content or "")  # each chunk: its own tokens
        streamed += mine
    assert [i.token for i in streamed] == [i.token for i in items]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in items], abs=1e-3)
