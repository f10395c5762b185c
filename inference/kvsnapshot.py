"""The slots as they were: every slot's KV cells taken from a context before it goes, and put back into the next
context of the same model and shape (a swap out and back, a restart).

llama.cpp's state of one sequence keeps, on a sliding-window model, only the window's cells of the
sliding-window layers (the rest are masked for its next token), so such a state resumes only where it ended;
a conversation whose next prompt re-renders the end of the last answer (most chat templates) could not use
it past the window. The state of the whole memory (sequence -1) keeps every cell: the slots come back exactly
as the live ones were, and the next turn starts from its slot as if no swap had happened.

Both functions use the llama.cpp context from the calling thread: only while no decode thread runs on it
(before the scheduler starts, or once no sequence runs and none can be admitted).
"""

from __future__ import annotations

import ctypes

from inference.kvstore import ContextSnapshot
from inference.placement import KvPlacement

__all__ = ["restore_snapshot", "take_snapshot"]

ALL_SEQUENCES = -1


def take_snapshot(kv: KvPlacement) -> ContextSnapshot | None:
    """Every slot's cells and what they hold; None when the slots hold nothing."""
    if not any(held.tokens for held in kv.held):
        return None
    model = kv.model
    llama, ctx = model.llama, model.ctx
    size = int(llama.llama_state_seq_get_size(ctx, ALL_SEQUENCES))
    if size <= 0:
        return None
    buffer = (ctypes.c_uint8 * size)()
    written = int(llama.llama_state_seq_get_data(ctx, buffer, size, ALL_SEQUENCES))
    if written <= 0:
        return None
    slots = tuple((held.scope, tuple(held.tokens)) for held in kv.held)
    return ContextSnapshot(model.sha256, slots, bytes(buffer)[:written])


def restore_snapshot(kv: KvPlacement, snapshot: ContextSnapshot) -> int:
    """Put the slots back (a context of the same model and shape, its slots empty); the slots that hold cells
    again. A snapshot llama.cpp refuses, or a slot whose cells do not match its tokens, leaves them empty."""
    model = kv.model
    if snapshot.model != model.sha256 or len(snapshot.slots) != len(kv.held):
        return 0
    llama, ctx, memory = model.llama, model.ctx, model.memory
    data = (ctypes.c_uint8 * len(snapshot.state)).from_buffer_copy(snapshot.state)
    if llama.llama_state_seq_set_data(ctx, data, len(snapshot.state), ALL_SEQUENCES) == 0:
        kv.clear()
        return 0
    restored = 0
    for slot, (held, (scope, tokens)) in enumerate(zip(kv.held, snapshot.slots, strict=True)):
        held.tokens, held.scope, held.planned = list(tokens), scope, None
        if not tokens:
            llama.llama_memory_seq_rm(memory, slot, -1, -1)
        elif kv.holds(slot, len(tokens)):
            restored += 1
        else:  # the cells are not those tokens': never serve them
            llama.llama_memory_seq_rm(memory, slot, -1, -1)
            held.tokens = []
    return restored
