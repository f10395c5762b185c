"""A model's prompt cache kept across the life of its context: saved before the context goes (a swap, a graceful
stop), read back when the same weights load again (inference.diskcache on disk).

What is kept: the slots as they were (inference.kvsnapshot: every cell, so a conversation resumes from its slot
wherever its next prompt departs from the last one), the slots' cells again as host-cache prefixes (for a
context of another shape, where the snapshot does not fit), and the host-RAM cache of prefixes evicted
earlier. Blocking methods: the service runs them off the event loop, while no decode thread runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from inference.diskcache import CacheReport, DiskPromptCache
from inference.kvsnapshot import restore_snapshot, take_snapshot
from inference.kvstore import ContextSnapshot, SavedPrefix
from inference.model import LoadedModel
from inference.prefix import common_prefix
from inference.scheduler import Scheduler
from inference.settings import WorkerSettings

__all__ = ["PromptCacheKeeper", "SavedCache", "cache_layout"]

log = logging.getLogger(__name__)


def cache_layout(model: LoadedModel) -> str:
    """What a saved prefix must have been written from to be restored into ``model``'s context."""
    return f"v1;exact={int(model.exact)};swa_full={int(model.swa_full)}"


def snapshot_layout(model: LoadedModel) -> str:
    """What the slots' snapshot must have been taken from: the same layout and the same slots and n_ctx."""
    return f"{cache_layout(model)};slots={model.shape.slots};n_ctx={model.shape.n_ctx_per_slot}"


@dataclass(frozen=True, slots=True)
class SavedCache:
    prefixes: list[SavedPrefix]
    snapshot: ContextSnapshot | None
    report: CacheReport


class PromptCacheKeeper:
    def __init__(self, disk: DiskPromptCache) -> None:
        self.disk = disk

    def read(self, model: LoadedModel, settings: WorkerSettings) -> SavedCache:
        """What was saved for ``model``'s weights and fits its context (nothing when prefix reuse is off)."""
        if not settings.prefix_reuse:
            return SavedCache([], None, CacheReport())
        try:
            snapshot = self.disk.load_snapshot(model.sha256, snapshot_layout(model), max_tokens=settings.n_ctx)
            prefixes: list[SavedPrefix] = []
            report = CacheReport()
            if settings.prompt_cache_bytes:
                prefixes, report = self.disk.load(model.sha256, cache_layout(model),
                                                  capacity=settings.prompt_cache_bytes, max_tokens=settings.n_ctx - 1)
        except OSError as exc:  # an unreadable cache directory costs the saved cache, never the model
            log.warning("could not read the saved prompt cache", extra={"error": f"{type(exc).__name__}"})
            return SavedCache([], None, CacheReport())
        return SavedCache(prefixes, snapshot, report)

    @staticmethod
    def refill(scheduler: Scheduler, saved: SavedCache) -> CacheReport:
        """Put ``saved`` into a scheduler that has not started: the slots, then the host cache; what came back."""
        slots = restore_snapshot(scheduler.kv, saved.snapshot) if saved.snapshot is not None else 0
        held = [(slot.scope, slot.tokens) for slot in scheduler.kv.held if slot.tokens]
        host = scheduler.kv.host_cache
        prefixes, tokens = slots, sum(len(slot_tokens) for _, slot_tokens in held)
        for entry in reversed(saved.prefixes):  # oldest first: the newest are the last to go
            if host is None or any(scope == entry.scope and len(entry.tokens) <= len(slot_tokens)
                                   and common_prefix(entry.tokens, slot_tokens) == len(entry.tokens)
                                   for scope, slot_tokens in held):
                continue  # a slot holds it already (the same cells, saved twice for a context of another shape)
            host.put(entry.scope, entry.tokens, entry.state)
            prefixes, tokens = prefixes + 1, tokens + len(entry.tokens)
        return CacheReport(prefixes=prefixes, tokens=tokens, bytes=saved.report.bytes, ignored=saved.report.ignored)

    def keep_and_stop(self, model: LoadedModel, scheduler: Scheduler) -> CacheReport:
        """Stop the scheduler, saving its slots (when idle: their cells are then ours to read) and host cache."""
        snapshot = None
        if scheduler.slots_busy + scheduler.queue_depth == 0:
            snapshot = take_snapshot(scheduler.kv)
            scheduler.kv.save_slots()
        scheduler.stop()
        host = scheduler.kv.host_cache
        try:
            written = self.disk.save_snapshot(snapshot, snapshot_layout(model)) if snapshot is not None else 0
            report = (self.disk.save(model.sha256, cache_layout(model), host.newest_first())
                      if host is not None else CacheReport())
        except OSError as exc:  # a full or read-only disk costs the saved cache, never the unload
            log.warning("could not save the prompt cache", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            return CacheReport()
        slots = sum(1 for _, tokens in snapshot.slots if tokens) if snapshot is not None and written else 0
        return CacheReport(prefixes=report.prefixes + slots, tokens=report.tokens, bytes=report.bytes + written)
