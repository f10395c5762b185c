"""A host-RAM cache of prompt prefixes evicted from slots: their KV cells as llama.cpp sequence state.

When a slot is taken for an unrelated prompt, the scheduler saves what the
slot held (``llama_state_seq_get_data``: its tokens' K and V for every layer)
here before removing it. A later prompt that starts with more of a saved
entry than any slot holds gets it written back into its slot
(``llama_state_seq_set_data``), a memory copy instead of a prefill.

Bounded in bytes, least recently used first out; entries are keyed by the
model's sha256 and the caller's scope, so a state is only ever restored into
the model that wrote it and for the key that computed it. inference.diskcache
keeps the entries on disk across a model swap or a restart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from inference.prefix import Scope, common_prefix

__all__ = ["ContextSnapshot", "HostPromptCache", "SavedPrefix"]


@dataclass(frozen=True, slots=True)
class SavedPrefix:
    model: str
    scope: Scope
    tokens: tuple[int, ...]
    state: bytes


@dataclass(frozen=True, slots=True)
class ContextSnapshot:
    """Every slot's KV cells at once (llama.cpp's state of every sequence, sliding-window cells included) and,
    per slot, whose they are and the tokens they hold: the slots as they were, for a context of the same shape.

    A one-sequence state keeps only the cells of the last window on a sliding-window model, so a prefix saved
    that way resumes only where it ended; the whole memory resumes anywhere, as the live slots do."""

    model: str
    slots: tuple[tuple[Scope, tuple[int, ...]], ...]
    state: bytes

    @property
    def tokens(self) -> int:
        return sum(len(tokens) for _, tokens in self.slots)


class HostPromptCache:
    def __init__(self, capacity_bytes: int, model: str) -> None:
        self.capacity = capacity_bytes
        self.model = model
        self.used = 0
        self._entries: OrderedDict[int, SavedPrefix] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, scope: Scope, tokens: Sequence[int], state: bytes) -> bool:
        """Keep a slot's state; False when it is larger than the whole cache."""
        if not state or len(state) > self.capacity:
            return False
        key = tuple(tokens)
        for entry_id, entry in list(self._entries.items()):  # a saved prefix of this one is now redundant
            if entry.scope == scope and len(entry.tokens) <= len(key) and key[: len(entry.tokens)] == entry.tokens:
                self._drop(entry_id)
        while self.used + len(state) > self.capacity and self._entries:
            self._drop(next(iter(self._entries)))
        self._entries[self._next] = SavedPrefix(self.model, scope, key, state)
        self._next += 1
        self.used += len(state)
        return True

    def best(self, scope: Scope, prompt: Sequence[int]) -> tuple[int, int]:
        """(entry id, prompt tokens it covers) of the entry sharing the longest prefix with ``prompt``."""
        best_id, best = -1, 0
        for entry_id, entry in self._entries.items():
            if entry.scope != scope or entry.model != self.model:
                continue
            match = common_prefix(entry.tokens, prompt)
            if match > best:
                best_id, best = entry_id, match
        return best_id, best

    def newest_first(self) -> list[SavedPrefix]:
        """Every entry, the most recently kept first (what a save to disk writes while it has room)."""
        return list(reversed(self._entries.values()))

    def take(self, entry_id: int) -> SavedPrefix:
        """Remove and return an entry (it goes back into a slot, which will save it again if evicted)."""
        entry = self._entries[entry_id]
        self._drop(entry_id)
        return entry

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.used -= len(entry.state)
