"""Prefix-aware routing: where each prefix of a conversation was sent last.

A request's route is a chain of hashes, one per message (chat) or per 256-byte block of
the prompt (legacy completions), each hash covering everything before it and seeded with
the caller's key id and the model: a worker reuses cached prompt prefixes only within one
key, so routing never mixes keys either. The table remembers, per hash, the few workers
most recently sent that prefix (LRU-bounded); the pool sends a request to the least busy
holder of its longest known prefix unless that worker is much busier than the least busy
worker (bounded-load affinity).

Hashes are Python's own (salted per process): the table lives and dies with the process.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from balancer.worker import Worker

__all__ = ["PrefixTable", "prefix_chain"]

BLOCK = 256  # prompt bytes per hash for legacy completions
MAX_CHAIN = 512
_HOLDERS = 4


def prefix_chain(key_id: str, model: str, parts: Iterable[bytes]) -> tuple[int, ...]:
    """One hash per part, each over every part up to it (and the key id and model)."""
    chain: list[int] = []
    running = hash((key_id, model))
    for part in parts:
        running = hash((running, part))
        chain.append(running)
        if len(chain) >= MAX_CHAIN:
            break
    return tuple(chain)


def prompt_blocks(prompt: bytes) -> Iterator[bytes]:
    for start in range(0, len(prompt), BLOCK):
        yield prompt[start : start + BLOCK]


class PrefixTable:
    """Prefix hash → the workers most recently sent it (newest first), least recently used evicted."""

    __slots__ = ("_size", "_table")

    def __init__(self, size: int = 65536) -> None:
        self._size = size
        self._table: OrderedDict[int, tuple[Worker, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def holders(self, route: tuple[int, ...]) -> Iterator[tuple[Worker, ...]]:
        """Holders of each known prefix of ``route``, longest prefix first."""
        table = self._table
        for digest in reversed(route):
            found = table.get(digest)
            if found:
                yield found

    def record(self, route: tuple[int, ...], worker: Worker) -> None:
        table = self._table
        for digest in route:
            found = table.get(digest)
            if found is None:
                table[digest] = (worker,)
            else:
                if found[0] is not worker:
                    table[digest] = (worker, *(w for w in found if w is not worker))[:_HOLDERS]
                table.move_to_end(digest)
        while len(table) > self._size:
            table.popitem(last=False)

    def forget(self, worker: Worker) -> None:
        """Drop a removed worker from every entry."""
        for digest, found in list(self._table.items()):
            if worker in found:
                kept = tuple(w for w in found if w is not worker)
                if kept:
                    self._table[digest] = kept
                else:
                    del self._table[digest]
