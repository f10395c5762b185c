"""The default (fast) decode mode: prefix reuse and speculation never change what an answer says.

Two real workers on the bundled model, both in the default mode (fast
kernels, one unified KV cache): one with prefix reuse and speculative
decoding, one with neither. Hypothesis draws conversation trees (new
conversations over shared system prompts, follow-up turns that resend the
answers, branches) and every turn goes to both at temperature 0 with the top
two logprobs. The fast kernels are not batch-invariant, so the bits may move;
the meaning may not: at every token both sides agree on, the chosen token's
logprob differs by at most ``LOGPROB_BOUND``, and where the answers part, the
two candidates were a near-tie (within ``TIE_BOUND`` nats) on both sides.

The worker also says which mode it runs in ``/health`` (``decode``) and
counts drafted and accepted tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from appliance.core.hop import KEY_ID_HEADER
from tests.support.inference_worker import MODEL, Worker, spawn_worker

pytestmark = pytest.mark.integration

LOGPROB_BOUND = 0.5
TIE_BOUND = 0.5
ANSWER_TOKENS = 8
SYSTEMS = (
    "You are a terse assistant for a hardware store. " * 10,
    "You answer questions about the weather in one line. " * 8,
)
QUESTIONS = ("What is a hammer for?", "Name a colour.", "Why is the sky blue?", "Count to three.")
HEADERS = {KEY_ID_HEADER: "key_fastmode"}


@pytest.fixture(scope="module")
def workers(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Worker]]:
    common = {"slots": "2", "n_ctx": "1024", "prefill_chunk": "32", "n_threads": "2"}
    # Whether a lone sequence's draft pays depends on this machine's measured step costs: the `on` worker tries
    # one again every 4 steps whatever they say, so a quoting answer is drafted on any machine.
    with spawn_worker(model_path, tmp_path_factory.mktemp("fast-on"), prefix_reuse="true", speculative="true",
                      draft_probe_every="4", **common) as on, \
            spawn_worker(model_path, tmp_path_factory.mktemp("fast-off"), prefix_reuse="false",
                         speculative="false", **common) as off:
        yield on, off


Token = tuple[str, float, dict[str, float]]  # (token, its logprob, top candidates' logprobs)


def ask(worker: Worker, messages: list[dict[str, str]]) -> tuple[str, list[Token]]:
    reply = worker.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=ANSWER_TOKENS, temperature=0, logprobs=True, top_logprobs=2,
        extra_headers=HEADERS,  # type: ignore[arg-type]
    )
    content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
    tokens = [(item.token, item.logprob, {top.token: top.logprob for top in item.top_logprobs})
              for item in content or []]
    return reply.choices[0].message.content or "", tokens


def same_meaning(got: list[Token], want: list[Token]) -> str | None:
    """Why two greedy answers differ in more than rounding (None: they do not)."""
    for index, ((token_a, lp_a, top_a), (token_b, lp_b, top_b)) in enumerate(zip(got, want, strict=False)):
        if token_a == token_b:
            if abs(lp_a - lp_b) > LOGPROB_BOUND:
                return f"token {index} {token_a!r}: logprob {lp_a} vs {lp_b}"
            continue
        gap_a = lp_a - top_a.get(token_b, float("-inf"))
        gap_b = lp_b - top_b.get(token_a, float("-inf"))
        if gap_a > TIE_BOUND or gap_b > TIE_BOUND:
            return f"token {index}: {token_a!r} vs {token_b!r} is no near-tie (gaps {gap_a}, {gap_b})"
        return None  # past a near-tie the answers may go their own ways
    if len(got) != len(want):
        return f"lengths {len(got)} vs {len(want)} with the same tokens"
    return None


@dataclass
class Conversation:
    system: str
    messages: list[dict[str, str]] = field(default_factory=list)


Op = tuple[str, int, int, int]  # (kind, which conversation, which question, which system)
ops = st.lists(
    st.tuples(st.sampled_from(["new", "next", "branch"]), st.integers(0, 7), st.integers(0, len(QUESTIONS) - 1),
              st.integers(0, len(SYSTEMS) - 1)),
    min_size=2, max_size=3,
)


def _turn(conversations: list[Conversation], op: Op) -> Conversation:
    kind, which, question, system = op
    if kind == "new" or not conversations:
        conversations.append(Conversation(SYSTEMS[system], [{"role": "system", "content": SYSTEMS[system]}]))
        chosen = conversations[-1]
    else:
        chosen = conversations[which % len(conversations)]
    if kind == "branch" and len(chosen.messages) > 1:
        chosen = Conversation(chosen.system, chosen.messages[:-2] or chosen.messages[:1])
        conversations.append(chosen)
    chosen.messages.append({"role": "user", "content": QUESTIONS[question]})
    return chosen


@settings(max_examples=2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(ops=[("new", 0, 0, 0), ("next", 0, 1, 0), ("new", 0, 2, 0), ("branch", 0, 3, 0), ("next", 1, 0, 1)])
@given(ops=ops)
def test_reuse_and_speculation_never_change_an_answers_meaning(workers: tuple[Worker, Worker], ops: list[Op]
                                                              ) -> None:
    on, off = workers
    conversations: list[Conversation] = []
    for op in ops:
        conversation = _turn(conversations, op)
        text, got = ask(on, conversation.messages)
        _, want = ask(off, conversation.messages)
        problem = same_meaning(got, want)
        assert problem is None, f"op {op}: {problem}"
        conversation.messages.append({"role": "assistant", "content": text})


def test_health_says_the_decode_mode(workers: tuple[Worker, Worker]) -> None:
    on, off = workers
    decode: dict[str, Any] = on.health()["decode"]
    assert decode["mode"] == "fast" and decode["kv_unified"] is True and decode["speculative"] is True
    assert decode["kernels"]["repacked"] is True
    assert off.health()["decode"]["speculative"] is False


def _counter(worker: Worker, name: str) -> float:
    text = worker.get("/metrics")[1].decode()
    match = re.search(rf"^appliance_worker_{name}_total{{[^}}]*}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_quoting_answer_is_drafted_and_usage_counts_tokens_once(workers: tuple[Worker, Worker]) -> None:
    on, off = workers
    document = ("The pump room is on level two, behind the blue door next to the freight lift. Staff must sign "
                "the logbook before entering and wear ear protection at all times.")
    messages = [{"role": "system", "content": f"Document: {document}"},
                {"role": "user", "content": "Repeat the document word for word."}]
    drafted, accepted = _counter(on, "draft_tokens"), _counter(on, "draft_accepted_tokens")
    reply = on.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                                logprobs=True, extra_headers=HEADERS)  # type: ignore[arg-type]
    assert _counter(on, "draft_accepted_tokens") > accepted and _counter(on, "draft_tokens") > drafted
    assert _counter(off, "draft_tokens") == 0
    # Usage counts each generated token once, however many a step produced.
    assert reply.usage is not None and reply.choices[0].logprobs is not None
    assert reply.usage.completion_tokens == len(reply.choices[0].logprobs.content or [])
