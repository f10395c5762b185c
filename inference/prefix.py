"""Which slot a new prompt goes to, and which cached prefix it starts from (pure bookkeeping, no llama.cpp).

Every slot remembers the tokens whose KV cells it holds (:class:`SlotTokens`)
and whose they are (``scope``: the calling API key's id, or ``None`` for one
scope shared by everyone: no key on the request, or a site that shares
prefixes across keys). The scope is part of every request
(``GenerationRequest.scope``, parsed by the HTTP handler), never ambient state. A finished sequence keeps its
cells, so the next turn of the same conversation finds its history there.

:func:`plan_admission` picks, for one waiting prompt, the free slot to run it
in and the best place to take its prefix from: the slot itself, another slot
(free or busy: the cells are copied, which in a unified KV cache only tags
them), or a slot still prefilling the same prefix (the new sequence waits for
those cells and then copies them, so prompts that arrive together prefill
their shared part once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from appliance.core.ids import KeyId

__all__ = ["Admission", "Scope", "SlotTokens", "common_prefix", "plan_admission", "usable"]

# Whose cached cells a prompt may use: one API key's id, or None (no key given, or prefixes shared by all keys).
Scope: TypeAlias = KeyId | None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(slots=True)
class SlotTokens:
    """What one slot's KV cells hold: ``tokens[i]`` at position ``i``, computed for ``scope``."""

    tokens: list[int] = field(default_factory=list)
    scope: Scope = None
    used: int = 0  # admission tick of the last sequence that ran here (LRU order)
    planned: list[int] | None = None  # a prefilling sequence's whole prompt (the cells it will hold)
    group: str = ""  # the request group (GenerationRequest.group) of the last sequence that ran here


@dataclass(frozen=True, slots=True)
class Admission:
    slot: int  # the free slot the sequence runs in
    keep: int  # leading cells of that slot it keeps (the rest are removed)
    source: int  # slot to copy cells [0, copy) from now (-1: none)
    copy: int
    follow: int  # slot still prefilling cells [0, wait) this prompt needs (-1: none)
    wait: int


# A slot whose cells past the match are this few holds nothing worth keeping (a re-rendered answer's end).
SPARE_TAIL = 8


def usable(match: int, prompt: Sequence[int], tail: int = 1) -> int:
    """How much of a ``match``-token cached prefix a prompt can start from: at least ``tail`` tokens are decoded
    again (the last one's logits pick the first answer token; batch-invariant decoding never decodes a prompt
    token alone, so it keeps two)."""
    return max(0, min(match, len(prompt) - tail))


def plan_admission(
    slots: Sequence[SlotTokens],
    free: Sequence[int],
    prompt: Sequence[int],
    scope: Scope,
    tail: int = 1,
    *,
    group: str | None = None,
) -> Admission:
    """Where ``prompt`` (of ``scope``) runs, among the ``free`` slots, and where its prefix comes from.

    The slot: one that loses nothing of value (empty, or its cells past the match are few), holding the
    most of the prompt; else one holding the longest prefix; else the least recently used one. With a
    ``group`` only the cells of that group's slots count (prefix reuse off: the choices of one request
    share their prompt with each other only).
    """

    def reusable(tokens: Sequence[int]) -> int:
        return usable(common_prefix(tokens, prompt), prompt, tail)

    def ours(held: SlotTokens) -> bool:
        return held.scope == scope and (group is None or held.group == group)

    held_match = {i: reusable(held.tokens) for i, held in enumerate(slots) if ours(held)}
    own = {i: held_match.get(i, 0) for i in free}
    best_done, best_done_slot = 0, -1
    best_plan, best_plan_slot = 0, -1
    for index, held in enumerate(slots):
        if not ours(held):
            continue
        done = held_match[index]
        if done > best_done:
            best_done, best_done_slot = done, index
        if held.planned is not None:
            planned = reusable(held.planned)
            if planned > best_plan:
                best_plan, best_plan_slot = planned, index

    def lost(i: int) -> int:  # cells this prompt would destroy in slot i
        return len(slots[i].tokens) - own[i] if ours(slots[i]) else len(slots[i].tokens)

    # A slot that loses (almost) nothing, holding most of the prompt; else one holding the best prefix
    # (a regenerated answer: its old tail goes); else the least recently used. Copies between slots only
    # tag cells, so a new conversation goes to a spare slot rather than evict the one it shares a prefix with.
    spare = [i for i in free if lost(i) <= SPARE_TAIL]
    if spare:
        slot = min(spare, key=lambda i: (-own[i], slots[i].used))
    else:
        slot = min(free, key=lambda i: (own[i] != best_done or best_done == 0, slots[i].used))
    keep = own[slot]
    source, copy = -1, 0
    if best_done > keep:
        source, copy = best_done_slot, best_done
    start = max(keep, copy)
    follow, wait = -1, 0
    if best_plan > start and best_plan_slot != slot:
        follow, wait = best_plan_slot, best_plan
    return Admission(slot=slot, keep=keep, source=source, copy=copy, follow=follow, wait=wait)
