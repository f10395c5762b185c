"""Where a sequence's KV cells come from and what each slot's cells hold, on the llama.cpp side.

The decode thread's half of prefix reuse: :func:`inference.prefix.plan_admission`
decides on token lists alone; :class:`KvPlacement` carries a plan out on the
context's memory (keep a slot's cells, copy another slot's, restore a prefix
saved in host RAM, or wait for a slot that is prefilling the same prefix),
keeps each slot's :class:`~inference.prefix.SlotTokens` true to its cells,
and saves a slot's cells to host RAM before they are overwritten.

Every decoded token's cells, prompt and answer alike, are tracked, so when an
answer ends its cells stay with the slot (and go to host RAM with it): the
next turn, which resends that answer, prefills only the new message. In the
deterministic mode that is exact too, because the scheduler decodes every
generated token in a chunk of two or more, as a prefill would.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from inference.kvstore import HostPromptCache
from inference.model import LoadedModel
from inference.prefix import Admission, Scope, SlotTokens, common_prefix, plan_admission, usable
from inference.sequence import ActiveSequence, SequenceHandle
from inference.textstream import TextStream

__all__ = ["MIN_SAVED_TOKENS", "KvPlacement", "PromptCounter"]

# Called on the decode thread: (prompt tokens prefilled, prompt tokens reused from cached cells).
PromptCounter = Callable[[int, int], None]
# Prefixes shorter than this are not worth a trip through host RAM (saving, or restoring instead of copying).
MIN_SAVED_TOKENS = 32


class KvPlacement:
    """Each slot's cells and their bookkeeping; every method runs on the decode thread."""

    def __init__(self, model: LoadedModel, *, reuse: bool, exact: bool, host_cache_bytes: int,
                 count_prompt: PromptCounter | None) -> None:
        self.model = model
        self.reuse = reuse
        self.exact = exact
        self.tail = 2 if exact else 1  # prompt tokens always decoded again after a reused prefix
        self.held = [SlotTokens() for _ in range(model.shape.slots)]
        self._host = HostPromptCache(host_cache_bytes, model.sha256) if reuse and host_cache_bytes else None
        self._count_prompt = count_prompt
        self._tick = 0

    @property
    def host_cache(self) -> HostPromptCache | None:
        """The host-RAM prompt cache (None when prefix reuse or the cache is off)."""
        return self._host

    def save_slots(self) -> None:
        """Every slot's cells to host RAM, before the context goes (a model swap, a shutdown): the last turns of
        the conversations the slots hold. Only while no sequence runs: the caller stopped admitting them."""
        for slot in range(len(self.held)):
            self._save_evicted(slot, 0)

    def place(self, handle: SequenceHandle, free: list[int]) -> ActiveSequence:
        """A sequence in one of the ``free`` slots, starting from the longest prefix the KV cache holds for it."""
        request = handle.request
        slot, start, follow, wait = self.locate(request.prompt_tokens, request.scope, request.group, free)
        handle.cached_tokens = start
        if start and self._count_prompt is not None:
            self._count_prompt(0, start)
        return ActiveSequence(handle, slot, TextStream(request.stops), prefilled=start, n_past=start,
                              follow=follow, wait=wait)

    def resume(self, seq: ActiveSequence, free: list[int]) -> None:
        """An evicted sequence back in one of the ``free`` slots, from the longest cached prefix of its history
        (``seq.prompt``); its cells, its usage and the prompt counters are left as they were."""
        request = seq.handle.request
        seq.seq_id, seq.prefilled, seq.follow, seq.wait = self.locate(seq.prompt, request.scope, request.group, free)
        seq.n_past = seq.prefilled

    def locate(self, prompt: list[int], scope: Scope, group: str, free: list[int]) -> tuple[int, int, int, int]:
        """Carry out the best admission of ``prompt``: (slot, cells it starts from, slot it follows or -1,
        cells it waits for there)."""
        self._tick += 1
        if self.reuse:
            plan = plan_admission(self.held, free, prompt, scope, self.tail)
        elif group:  # without reuse, the choices of one request share with each other only (the only
            # cells they can find are their running siblings': released slots hold nothing)
            plan = plan_admission(self.held, free, prompt, scope, self.tail, group=group)
        else:
            plan = Admission(slot=free[0], keep=0, source=-1, copy=0, follow=-1, wait=0)
        slot, start, follow = self._start(plan, scope, prompt)
        held = self.held[slot]
        held.tokens, held.scope, held.used, held.planned = prompt[:start], scope, self._tick, prompt
        held.group = group
        return slot, start, follow, plan.wait

    def _start(self, plan: Admission, scope: Scope, prompt: list[int]) -> tuple[int, int, int]:
        """Carry out ``plan``: (slot, cells the sequence starts from, slot it still follows or -1)."""
        slot, follow = plan.slot, plan.follow
        llama, memory = self.model.llama, self.model.memory
        start = plan.keep if self.holds(slot, plan.keep) else 0
        self._save_evicted(slot, start)
        copy = plan.copy if plan.source >= 0 and self.holds(plan.source, plan.copy) else 0
        restored = self._restore(slot, scope, prompt, max(start, copy, plan.wait if follow >= 0 else 0))
        if restored:
            return slot, restored, -1
        if not self.held[slot].tokens:  # a failed restore emptied the slot
            start = 0
        if copy > start:
            self.copy(plan.source, slot, copy)
            return slot, copy, follow
        if not llama.llama_memory_seq_rm(memory, slot, start, -1):  # may be refused
            llama.llama_memory_seq_rm(memory, slot, -1, -1)
            start = 0
        return slot, start, follow

    def _save_evicted(self, slot: int, keep: int) -> None:
        """Before a slot's cells past ``keep`` are removed, copy the slot's state to host RAM if worth it."""
        held = self.held[slot]
        if self._host is None or len(held.tokens) - keep < MIN_SAVED_TOKENS or not self.holds(slot, len(held.tokens)):
            return
        llama, ctx = self.model.llama, self.model.ctx
        size = int(llama.llama_state_seq_get_size(ctx, slot))
        if size <= 0 or size > self._host.capacity:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = int(llama.llama_state_seq_get_data(ctx, buffer, size, slot))
        if written > 0:
            self._host.put(held.scope, held.tokens, bytes(buffer)[:written])

    def _restore(self, slot: int, scope: Scope, prompt: list[int], have: int) -> int:
        """Write a saved prefix back into ``slot`` when it covers more of ``prompt`` than ``have``; its length."""
        if self._host is None:
            return 0
        entry_id, match = self._host.best(scope, prompt)
        count = usable(match, prompt, self.tail)
        if count < have + MIN_SAVED_TOKENS:
            return 0
        entry = self._host.take(entry_id)
        llama, memory, ctx = self.model.llama, self.model.memory, self.model.ctx
        llama.llama_memory_seq_rm(memory, slot, -1, -1)
        data = (ctypes.c_uint8 * len(entry.state)).from_buffer_copy(entry.state)
        held = self.held[slot]
        if llama.llama_state_seq_set_data(ctx, data, len(entry.state), slot) == 0:  # no room: prefill instead
            llama.llama_memory_seq_rm(memory, slot, -1, -1)
            held.tokens = []
            return 0
        held.tokens = list(entry.tokens)
        if not self.holds(slot, count) or not llama.llama_memory_seq_rm(memory, slot, count, -1):
            llama.llama_memory_seq_rm(memory, slot, -1, -1)
            held.tokens = []
            return 0
        return count

    def copy(self, source: int, slot: int, count: int) -> None:
        """Make ``slot`` hold the first ``count`` cells of ``source``."""
        llama, memory = self.model.llama, self.model.memory
        llama.llama_memory_seq_rm(memory, slot, -1, -1)
        if self.exact:  # one KV stream per slot: llama.cpp copies the whole stream (at the next decode), cut back
            llama.llama_memory_seq_cp(memory, source, slot, -1, -1)
            llama.llama_memory_seq_rm(memory, slot, count, -1)
        else:  # one unified cache: the cells are only tagged with the slot too
            llama.llama_memory_seq_cp(memory, source, slot, 0, count)

    def holds(self, slot: int, count: int) -> bool:
        """Whether the KV cache really still holds what a prompt needs to continue from the slot's first
        ``count`` cells.

        llama.cpp keeps each sequence's positions contiguous, from ``seq_pos_min`` to ``seq_pos_max``. A
        sliding-window cache may drop (and then purge up to) cells that left a sequence's window; the full
        layers keep everything. So the first ``count`` positions can be reused only when the window cells
        that the next position attends to are still there: ``seq_pos_min`` is 0, or at most
        ``count - n_swa`` on a sliding-window model.
        """
        tokens = self.held[slot].tokens
        if count <= 0 or len(tokens) < count:
            return False
        llama, memory = self.model.llama, self.model.memory
        if int(llama.llama_memory_seq_pos_max(memory, slot)) != len(tokens) - 1:
            return False
        low = int(llama.llama_memory_seq_pos_min(memory, slot))
        return low == 0 or (self.model.n_swa > 0 and low <= count - self.model.n_swa)

    def resolve_follow(self, seq: ActiveSequence) -> None:
        """A sequence waiting for another slot's prefill: copy those cells once they are there."""
        source, held = self.held[seq.follow], self.held[seq.seq_id]
        prompt, request = seq.prompt, seq.handle.request
        ours = source.scope == request.scope and (self.reuse or source.group == request.group)
        if ours and common_prefix(source.tokens, prompt) >= seq.wait:
            if self.holds(seq.follow, seq.wait):
                self.copy(seq.follow, seq.seq_id, seq.wait)
                if self._count_prompt is not None:
                    self._count_prompt(0, seq.wait - seq.prefilled)
                seq.prefilled = seq.n_past = seq.handle.cached_tokens = seq.wait
                held.tokens = prompt[: seq.wait]
            seq.follow = -1
        elif source.planned is None or not ours or common_prefix(source.planned, prompt) < seq.wait:
            seq.follow = -1  # that slot will not get there (cancelled, reused): prefill it here

    def trim(self, slot: int, count: int) -> None:
        """Drop the slot's cells from position ``count`` on (rejected draft tokens, a token decoded again)."""
        held = self.held[slot]
        if len(held.tokens) > count:
            self.model.llama.llama_memory_seq_rm(self.model.memory, slot, count, -1)
            del held.tokens[count:]

    def release(self, slot: int) -> None:
        """A sequence left the slot: with reuse its cells, prompt and answer, stay for the next prompt."""
        held = self.held[slot]
        held.planned = None
        if not self.reuse:
            self.model.llama.llama_memory_seq_rm(self.model.memory, slot, -1, -1)
            held.tokens = []

    def clear(self) -> None:
        self.model.llama.llama_memory_clear(self.model.memory, True)
        for held in self.held:
            held.tokens, held.planned = [], None
