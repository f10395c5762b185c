"""In the deterministic mode, prefix reuse and speculation are exact: the real model and scheduler answer the
same with both on and both off.

Two schedulers run side by side in this process on the real default model,
one with prefix reuse and speculative decoding (prompt-lookup drafts) and one
with neither. Hypothesis draws conversation trees
(new conversations over a few shared system prompts, follow-up turns,
branches from an earlier turn, edits of an earlier turn, prompts sent
together, a long prompt cancelled in the middle of its prefill); with two
slots, conversations evict each other. At temperature 0 every answer must be
identical, and the reuse side must really have reused cells, answers' cells
included, and really have accepted drafts.

Both sides decode batch-invariantly (``[worker] deterministic = true``; see
inference.model and inference.scheduler). With it off (a unified KV cache, flash attention, repacked
weights, the K-quant kernel switch at 8 rows) the pinned example fails at
once: the second of three prompts sent together answered differently.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from inference.model import LoadedModel, load_model
from inference.sampling import SamplingParams
from inference.scheduler import Event, Scheduler, SpeculationSettings
from inference.sequence import GenerationRequest, SequenceHandle
from inference.settings import WorkerSettings

pytestmark = pytest.mark.integration

SLOTS = 2  # two slots: conversations evict each other (to host RAM and back) and copy prefixes between slots
N_CTX = 1024
CHUNK = 32
ANSWER_TOKENS = 8
HOST_CACHE_BYTES = 64 << 20  # evicted conversations come back from host RAM
SYSTEMS = (
    "You are a terse assistant for a hardware store. " * 12,
    "You are a terse assistant for a hardware store. " * 12 + "Prefer metric units. " * 6,
    "You answer questions about the weather in one line. " * 10,
)
QUESTIONS = (
    "What is a hammer for?",
    "Name a colour.",
    "How tall is a door?",
    "Say hello.",
    "Why is the sky blue?",
    "Count to three.",
)


class Engine:
    """A real model and scheduler on a private event loop thread; ``ask`` runs prompts to completion."""

    def __init__(self, model_path: Path, data_dir: Path, *, reuse: bool) -> None:
        self.settings = WorkerSettings(
            model_path=str(model_path),
            data_dir=data_dir,
            slots=SLOTS,
            n_ctx=N_CTX,
            prefill_chunk=CHUNK,
            prefix_reuse=reuse,
            deterministic=True,
        )
        self.model: LoadedModel = load_model(self.settings)
        self.reused = 0
        self.prefilled = 0
        self.drafted = 0
        self.accepted = 0
        self.scheduler = Scheduler(
            self.model,
            queue_size=8,
            prefill_chunk=CHUNK,
            reuse=reuse,
            count_prompt=self._count,
            host_cache_bytes=HOST_CACHE_BYTES,
            speculation=SpeculationSettings(enabled=reuse),
            count_draft=self._count_draft,
        )
        self.loop = asyncio.new_event_loop()
        self.steps = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.scheduler.start(self.loop, self._report)

    def _count(self, prefilled: int, reused: int) -> None:
        self.prefilled += prefilled
        self.reused += reused

    def _count_draft(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted

    def _report(self, events: list[Event], batch: int, busy: int, waiting: int) -> None:
        self.steps += 1
        for handle, text, new_tokens, finish, error, logprobs in events:
            handle.push(text, new_tokens, finish, error, logprobs)

    def tokens(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=True, parse_special=True)

    def _submit(self, text: str, max_tokens: int) -> SequenceHandle:
        request = GenerationRequest(
            prompt_tokens=self.tokens(text), max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0)
        )
        return self.scheduler.submit(request)

    def ask(self, texts: list[str], cancel_after_steps: int | None = None, max_tokens: int = ANSWER_TOKENS
            ) -> list[str]:
        """Answers to ``texts`` sent together; with ``cancel_after_steps`` the last one is cancelled then."""

        async def run() -> list[str]:
            handles = [self._submit(text, max_tokens) for text in texts]
            if cancel_after_steps is not None:
                start = self.steps
                while self.steps - start < cancel_after_steps and not handles[-1].done:
                    await asyncio.sleep(0.001)
                handles[-1].cancel()
                handles = handles[:-1]
            return list(await asyncio.gather(*(h.text() for h in handles)))

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=600)

    def close(self) -> None:
        self.scheduler.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
        self.model.close()


@pytest.fixture(scope="module")
def engines(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Engine]]:
    data = tmp_path_factory.mktemp("prefix-exactness")
    on, off = Engine(model_path, data, reuse=True), Engine(model_path, data, reuse=False)
    try:
        yield on, off
    finally:
        on.close()
        off.close()


def render(system: str, turns: list[tuple[str, str | None]]) -> str:
    """A Gemma-style chat prompt: the system text, then (user, answer) turns; an open last turn."""
    parts = [f"<start_of_turn>user\n{system}\n\n"]
    for i, (user, answer) in enumerate(turns):
        parts.append(("" if i == 0 else "<start_of_turn>user\n") + f"{user}<end_of_turn>\n<start_of_turn>model\n")
        if answer is not None:
            parts.append(f"{answer}<end_of_turn>\n")
    return "".join(parts)


@dataclass
class Conversation:
    system: str
    turns: list[tuple[str, str | None]] = field(default_factory=list)


# One step of a conversation tree: (kind, which conversation, which turn, which question, which system).
Op = tuple[str, int, int, int, int]
ops = st.lists(
    st.tuples(
        st.sampled_from(["new", "next", "branch", "edit", "together", "cancel"]),
        st.integers(0, 7),
        st.integers(0, 7),
        st.integers(0, len(QUESTIONS) - 1),
        st.integers(0, len(SYSTEMS) - 1),
    ),
    min_size=2,
    max_size=7,
)


def _prompts(conversations: list[Conversation], op: Op) -> tuple[list[tuple[Conversation, str]], bool]:
    """The (conversation, prompt) pairs an op sends, and whether the last is cancelled mid-prefill."""
    kind, which, turn, question, system = op
    if kind == "new" or not conversations:
        conversations.append(Conversation(SYSTEMS[system]))
        chosen = conversations[-1]
    else:
        chosen = conversations[which % len(conversations)]
    user = QUESTIONS[question]
    if kind in ("branch", "edit") and chosen.turns:
        cut = turn % len(chosen.turns)
        kept = chosen.turns[:cut] if kind == "edit" else chosen.turns[: cut + 1]
        chosen = Conversation(chosen.system, list(kept))
        conversations.append(chosen)
    chosen.turns.append((user, None))
    first = (chosen, render(chosen.system, chosen.turns))
    if kind == "together":  # two more new conversations on the same system prompt, all three at once
        extra = [Conversation(chosen.system, [(q, None)]) for q in QUESTIONS[question + 1 : question + 3]]
        conversations.extend(extra)
        return [first, *((c, render(c.system, c.turns)) for c in extra)], False
    if kind == "cancel":  # the same prompt plus a long paste, dropped while it prefills
        return [first, (chosen, render(chosen.system, chosen.turns) + "lorem ipsum dolor " * 120)], True
    return [first], False


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@example(
    ops=[
        ("new", 0, 0, 0, 0),
        ("next", 0, 0, 1, 0),
        ("together", 0, 0, 2, 0),
        ("edit", 0, 1, 3, 0),
        ("cancel", 1, 0, 4, 0),
        ("new", 0, 0, 5, 2),
        ("branch", 0, 0, 0, 0),
    ]
)
@given(ops=ops)
def test_answers_are_identical_with_reuse_on_and_off(engines: tuple[Engine, Engine], ops: list[Op]) -> None:
    on, off = engines
    conversations: list[Conversation] = []
    for op in ops:
        pairs, cancel = _prompts(conversations, op)
        texts = [text for _, text in pairs]
        got = on.ask(texts, cancel_after_steps=3 if cancel else None)
        want = off.ask(texts, cancel_after_steps=3 if cancel else None)
        assert got == want, f"op {op}: reuse on {got!r} != reuse off {want!r}"
        for (conversation, _), answer in zip(pairs, got, strict=False):
            user, _ = conversation.turns[-1]
            conversation.turns[-1] = (user, answer)
    assert off.reused == 0


def test_reuse_really_happened(engines: tuple[Engine, Engine]) -> None:
    on, _ = engines
    conversation = Conversation(SYSTEMS[0], [(QUESTIONS[0], None)])
    before = on.reused
    answer = on.ask([render(conversation.system, conversation.turns)])[0]
    conversation.turns = [(QUESTIONS[0], answer), (QUESTIONS[1], None)]
    prompt = render(conversation.system, conversation.turns)
    on.ask([prompt])
    assert on.reused - before >= len(on.tokens(render(SYSTEMS[0], [])))


def test_the_next_turn_prefills_only_the_new_message(engines: tuple[Engine, Engine]) -> None:
    """The answer's cells stayed with the slot: the next turn, resending it, prefills the new message only."""
    on, _ = engines
    conversation = Conversation(SYSTEMS[2], [(QUESTIONS[4], None)])
    answer = on.ask([render(conversation.system, conversation.turns)], max_tokens=24)[0]
    conversation.turns = [(QUESTIONS[4], answer), (QUESTIONS[5], None)]
    before = on.prefilled
    on.ask([render(conversation.system, conversation.turns)], max_tokens=2)
    new_message = len(on.tokens(f"<end_of_turn>\n<start_of_turn>user\n{QUESTIONS[5]}<end_of_turn>\n"
                                "<start_of_turn>model\n"))
    assert on.prefilled - before <= new_message + 8


QUOTED = (
    "Document: The pump room is on level two, behind the blue door next to the freight lift. "
    "Staff must sign the logbook before entering and wear ear protection at all times.\n"
    "Question: Repeat the document word for word."
)


def test_drafts_from_the_prompt_are_accepted_and_change_nothing(engines: tuple[Engine, Engine]) -> None:
    on, off = engines
    prompt = render(SYSTEMS[0][:60], [(QUOTED, None)])
    drafted, accepted = on.drafted, on.accepted
    for text in (prompt, prompt.replace("two", "three")):  # one at a time: drafts are for a sequence alone here
        assert on.ask([text], max_tokens=48) == off.ask([text], max_tokens=48)
    assert on.accepted - accepted > 0 and on.drafted - drafted > 0
    assert off.drafted == 0
