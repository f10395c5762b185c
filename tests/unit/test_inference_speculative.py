"""Prompt-lookup drafts and the per-sequence decision to draft (pure logic, no model)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from inference.speculative import NGRAMS, DraftPolicy, PromptLookup, StepCost, expected_accepted


def test_a_quoted_run_is_drafted_from_the_prompt() -> None:
    prompt = [7, 1, 2, 3, 4, 5, 6, 9, 9]
    lookup = PromptLookup(prompt)
    for token in (1, 2, 3):  # the answer starts quoting the prompt
        lookup.append(token)
    assert lookup.draft(3) == [4, 5, 6]
    assert lookup.draft(10) == [4, 5, 6, 9, 9, 1, 2, 3]  # up to the end of the history


def test_nothing_is_drafted_without_an_earlier_occurrence() -> None:
    lookup = PromptLookup([1, 2, 3, 4])
    lookup.append(5)
    assert lookup.draft(4) == []


@given(st.lists(st.integers(0, 5), max_size=60), st.integers(1, 8))
def test_a_draft_continues_an_earlier_occurrence_of_the_last_ngram(tokens: list[int], most: int) -> None:
    lookup = PromptLookup(tokens)
    draft = lookup.draft(most)
    assert len(draft) <= most
    if not draft:
        return
    end = len(tokens)
    # Some n of NGRAMS: the last n tokens occurred before, and the draft is what followed that occurrence.
    assert any(
        tokens[start - n : start] == tokens[end - n :] and tokens[start : start + len(draft)] == draft
        for n in NGRAMS if end >= n
        for start in range(n, end)
    )


def test_expected_accepted_grows_with_the_rate_and_the_length() -> None:
    assert expected_accepted(0.0, 8) == 0.0
    assert expected_accepted(1.0, 5) == 5.0
    assert 0.4 < expected_accepted(0.5, 1) < 0.6
    assert expected_accepted(0.9, 8) > expected_accepted(0.9, 4) > expected_accepted(0.5, 4)


def _cpu_like() -> StepCost:
    cost = StepCost(prior=0.15)
    for rows, ms in ((1, 11), (2, 25), (3, 27), (4, 28), (8, 32), (9, 33), (16, 36), (17, 38)):
        cost.add(rows, ms / 1000)
    return cost


def test_free_chat_stops_drafting_after_rejections_and_probes_again_later() -> None:
    policy = DraftPolicy(most=8, rate=0.9)
    cost = _cpu_like()
    drafted_steps = 0
    for _ in range(128):
        length = policy.length(available=8, batch_rows=1, cost=cost)
        if length:
            drafted_steps += 1
            policy.update(length, 0)  # nothing ever accepted
    assert policy.rate < 0.2
    assert drafted_steps <= 2 + 128 // policy.probe_every  # a try or two, then one probe every probe_every steps


def test_a_quoting_answer_drafts_long_and_a_crowded_batch_drafts_more_cheaply() -> None:
    cost = _cpu_like()
    quoting = DraftPolicy(most=8)
    for _ in range(10):
        quoting.update(8, 8)
    assert quoting.rate > 0.9
    assert quoting.length(8, 1, cost) == 8
    unsure = DraftPolicy(most=8, rate=0.5)
    assert unsure.length(8, 1, cost) == 0  # alone, one draft row doubles the step: a coin flip does not pay
    assert DraftPolicy(most=8, rate=0.5).length(8, 8, cost) > 0  # in a batch of eight, eight rows cost little


def test_the_step_cost_is_measured_per_row_count() -> None:
    cost = StepCost(prior=0.15)
    assert abs(cost.slowdown(1, 1) - 0.15) < 1e-9  # nothing measured: the prior
    for _ in range(20):
        cost.add(1, 0.011)
        cost.add(2, 0.025)
    assert abs(cost.seconds(1) - 0.011) < 1e-9 and abs(cost.slowdown(1, 1) - 25 / 11 + 1) < 1e-6
    assert cost.seconds(6) > cost.seconds(2)  # not measured: from the nearest measured count
