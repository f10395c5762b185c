"""Prompt-lookup drafts and the per-sequence decision to draft (pure logic, no model)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from inference.speculative import DraftPolicy, PromptLookup, StepCost, expected_accepted


def test_a_quoted_run_is_drafted_from_the_prompt() -> None:
    prompt = [7, 1, 2, 3, 4, 5, 6, 9, 9]
    lookup = PromptLookup(prompt)
    for token in (1, 2):  # the answer starts quoting the prompt
        lookup.append(token)
    assert lookup.draft(3) == [3, 4, 5]
    assert lookup.draft(10) == [3, 4, 5, 6, 9, 9, 1, 2]  # up to the end of the history


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
    # Some n in (3, 2): the last n tokens occurred before, and the draft is what followed that occurrence.
    assert any(
        tokens[start - n : start] == tokens[end - n :] and tokens[start : start + len(draft)] == draft
        for n in (3, 2) if end >= n
        for start in range(n, end)
    )


def test_expected_accepted_grows_with_the_rate_and_the_length() -> None:
    assert expected_accepted(0.0, 8) == 0.0
    assert expected_accepted(1.0, 5) == 5.0
    assert 0.4 < expected_accepted(0.5, 1) < 0.6
    assert expected_accepted(0.9, 8) > expected_accepted(0.9, 4) > expected_accepted(0.5, 4)


def test_free_chat_stops_drafting_after_rejections_and_probes_again_later() -> None:
    policy = DraftPolicy(most=8)
    drafted_steps = 0
    for _ in range(64):
        length = policy.length(available=8, batch_tokens=1, token_cost=0.15)
        if length:
            drafted_steps += 1
            policy.update(length, 0)  # nothing ever accepted
    assert policy.rate < 0.05
    assert drafted_steps <= 8  # a few tries, then one short probe every probe_every steps
    assert policy.drafted <= 8 * 2 + 8


def test_a_quoting_answer_drafts_long_and_a_crowded_batch_drafts_less() -> None:
    quoting = DraftPolicy(most=8)
    for _ in range(10):
        length = quoting.length(8, 1, 0.15) or 8
        quoting.update(length, length)
    assert quoting.rate > 0.9
    assert quoting.length(8, 1, 0.15) == 8
    unsure = DraftPolicy(most=8, rate=0.5)
    assert unsure.length(8, 1, 0.15) > unsure.length(8, 64, 0.15)


def test_the_step_cost_is_fitted_from_measured_calls() -> None:
    cost = StepCost(prior=0.15)
    assert cost.token_cost == 0.15
    for _ in range(4):
        for tokens in (1, 2, 5, 9):
            cost.add(tokens, 0.010 + 0.002 * tokens)  # c0 10 ms, c1 2 ms
    assert abs(cost.token_cost - 0.2) < 1e-6
    same = StepCost(prior=0.15)
    for _ in range(20):
        same.add(8, 0.02)
    assert same.token_cost == 0.15  # one size only: nothing to fit
