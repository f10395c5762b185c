"""Slot choice and prefix sources for prompt-prefix reuse (inference.prefix), without a model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from inference.kvstore import HostPromptCache
from inference.prefix import SlotTokens, common_prefix, plan_admission

SYSTEM = list(range(100, 160))


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([5], [6]) == 0


def test_the_next_turn_goes_back_to_its_own_slot() -> None:
    history = [*SYSTEM, 1, 2, 3]
    slots = [SlotTokens([*SYSTEM, 9, 9], "k", used=3), SlotTokens(history, "k", used=1), SlotTokens([], "", used=0)]
    plan = plan_admission(slots, [0, 1, 2], [*history, 4, 5], "k")
    assert (plan.slot, plan.keep, plan.source, plan.follow) == (1, len(history), -1, -1)


def test_the_last_prompt_token_is_always_computed() -> None:
    slots = [SlotTokens([1, 2, 3, 4], "k")]
    plan = plan_admission(slots, [0], [1, 2, 3, 4], "k")
    assert plan.keep == 3  # its logits choose the first answer token


def test_a_new_conversation_copies_the_shared_prefix_into_an_empty_slot() -> None:
    other = [*SYSTEM, *range(20)]  # another conversation: its own turns after the shared system prompt
    slots = [SlotTokens(other, "k", used=5), SlotTokens([], "", used=0)]
    plan = plan_admission(slots, [0, 1], [*SYSTEM, 7, 7], "k")
    assert (plan.slot, plan.keep, plan.source, plan.copy) == (1, 0, 0, len(SYSTEM))
    full = [SlotTokens(other, "k", used=5), SlotTokens(list(range(50, 90)), "k", used=2)]
    plan = plan_admission(full, [0, 1], [*SYSTEM, 7, 7], "k")  # nothing spare: the slot holding the prefix
    assert (plan.slot, plan.keep, plan.source) == (0, len(SYSTEM), -1)


def test_eviction_takes_the_least_recently_used_slot() -> None:
    slots = [SlotTokens([1] * 20, "k", used=7), SlotTokens([4] * 20, "k", used=2), SlotTokens([7] * 20, "k", used=4)]
    assert plan_admission(slots, [0, 1, 2], [9, 9, 9], "k").slot == 1
    assert plan_admission(slots, [0, 2], [9, 9, 9], "k").slot == 2


def test_ties_between_holders_go_to_the_least_recently_used() -> None:
    slots = [SlotTokens([*SYSTEM, 1], "k", used=9), SlotTokens([*SYSTEM, 2], "k", used=3)]
    plan = plan_admission(slots, [0, 1], [*SYSTEM, 3], "k")
    assert (plan.slot, plan.keep) == (1, len(SYSTEM))


def test_another_keys_cells_are_never_reused() -> None:
    slots = [SlotTokens([*SYSTEM, 1, 2], "other", used=1), SlotTokens([], "", used=0)]
    plan = plan_admission(slots, [0, 1], [*SYSTEM, 1, 2, 3], "mine")
    assert (plan.keep, plan.source, plan.copy, plan.follow) == (0, -1, 0, -1)


def test_a_prompt_waits_for_a_slot_prefilling_its_prefix() -> None:
    busy = SlotTokens(SYSTEM[:10], "k", used=1, planned=[*SYSTEM, 1])  # 10 cells done, 61 planned
    slots = [busy, SlotTokens([], "", used=0)]
    plan = plan_admission(slots, [1], [*SYSTEM, 2], "k")
    assert (plan.slot, plan.source, plan.copy) == (1, 0, 10)
    assert (plan.follow, plan.wait) == (0, len(SYSTEM))


def test_with_a_group_only_that_groups_cells_are_found() -> None:
    """Prefix reuse off: the choices of one request copy (or wait for) each other's cells, never another's."""
    stranger = SlotTokens([*SYSTEM, 1], "k", used=1, group="")  # the same key, another request
    sibling = SlotTokens(SYSTEM[:10], "k", used=2, planned=[*SYSTEM, 1], group="g")  # still prefilling
    slots = [stranger, sibling, SlotTokens([], "k", used=0)]
    plan = plan_admission(slots, [2], [*SYSTEM, 1], "k", group="g")
    assert (plan.source, plan.copy, plan.follow, plan.wait) == (1, 10, 1, len(SYSTEM))
    plan = plan_admission(slots, [2], [*SYSTEM, 1], "k", group="h")
    assert (plan.keep, plan.source, plan.copy, plan.follow) == (0, -1, 0, -1)
    other_key = [SlotTokens([*SYSTEM, 1], "other", group="g"), SlotTokens([], "k")]
    plan = plan_admission(other_key, [1], [*SYSTEM, 1], "k", group="g")  # the group stays in the caller's scope
    assert (plan.source, plan.follow) == (-1, -1)
    assert plan_admission(slots, [2], [*SYSTEM, 1], "k").source == 0  # no group (reuse on): the scope decides


prompts = st.lists(st.integers(0, 3), min_size=1, max_size=12)


@given(
    st.lists(st.tuples(prompts, st.sampled_from(["a", "b"]), st.integers(0, 9)), min_size=1, max_size=5),
    prompts,
    st.sampled_from(["a", "b"]),
    st.data(),
)
def test_plans_only_promise_cells_that_match(
    held: list[tuple[list[int], str, int]], prompt: list[int], scope: str, data: st.DataObject
) -> None:
    slots = [SlotTokens(tokens, owner, used) for tokens, owner, used in held]
    free = data.draw(st.lists(st.sampled_from(range(len(slots))), min_size=1, unique=True))
    plan = plan_admission(slots, free, prompt, scope)
    assert plan.slot in free
    assert 0 <= plan.keep < len(prompt) or plan.keep == 0
    if plan.keep:
        assert slots[plan.slot].scope == scope and slots[plan.slot].tokens[: plan.keep] == prompt[: plan.keep]
    if plan.source >= 0:
        source = slots[plan.source]
        assert source.scope == scope and plan.keep < plan.copy < len(prompt)
        assert source.tokens[: plan.copy] == prompt[: plan.copy]
    best = max((common_prefix(s.tokens, prompt) for s in slots if s.scope == scope), default=0)
    assert max(plan.keep, plan.copy) == min(best, len(prompt) - 1)


def test_host_cache_is_bounded_lru_and_scoped() -> None:
    cache = HostPromptCache(100, "sha")
    assert cache.put("k", [1, 2, 3], b"x" * 40)
    assert cache.put("k", [4, 5, 6], b"y" * 40)
    assert cache.best("k", [1, 2, 3, 9])[1] == 3
    assert cache.best("other", [1, 2, 3, 9]) == (-1, 0)
    assert cache.put("k", [7, 8], b"z" * 40)  # over 100 bytes: the oldest goes
    assert cache.best("k", [1, 2, 3])[1] == 0 and len(cache) == 2 and cache.used == 80
    assert not cache.put("k", [9], b"w" * 101)


def test_host_cache_drops_prefixes_of_a_longer_entry_and_take_removes() -> None:
    cache = HostPromptCache(1000, "sha")
    cache.put("k", [1, 2], b"a" * 10)
    cache.put("k", [1, 2, 3, 4], b"b" * 10)
    assert len(cache) == 1
    entry_id, match = cache.best("k", [1, 2, 3, 5])
    assert match == 3
    assert cache.take(entry_id).tokens == (1, 2, 3, 4) and len(cache) == 0 and cache.used == 0
