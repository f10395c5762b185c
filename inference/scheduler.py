"""Continuous batching: one thread owns the llama.cpp context and decodes all slots together.

Every step packs one token for each generating sequence plus up to
``prefill_chunk`` prompt tokens of sequences still prefilling, calls
``llama_decode`` once, samples each sequence with its own sampler chain, and
hands the step's text to the event loop in a single ``call_soon_threadsafe``.
Sequences join and leave only at step boundaries, so a short request never
waits for a long one and a long prompt never stalls the others for long.

With prefix reuse on, a slot keeps its KV cells when its sequence ends; a new
prompt goes to the free slot that already holds the longest part of it (see
inference.prefix), copies a prefix another slot holds, or waits for a slot
that is prefilling the same prefix right now, and prefills only the rest.

Exactness (the model's ``exact``, batch-invariant mode): a reused cell must
hold the very numbers a fresh prefill would compute, so greedy answers are
the same with reuse on and off. On llama.cpp's CPU backend a prompt chunk's
numbers do not depend on the chunk's size or on the other slots (one KV
stream each), except that a single token runs other attention kernels than
two or more. So in this mode a step decodes the generating sequences' tokens
in one call and each prompt chunk in a call of its own (llama.cpp would
otherwise split a chunk to pair it with the other sequences' tokens), a chunk
is never one token (the budget bends by one), at least two prompt tokens are
decoded again after a reused prefix, and only prompt cells are reused: the
cells of generated tokens (decoded one at a time) are dropped when the
sequence ends, so the next turn prefills the last answer again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from inference.constrained import ConstrainedSampler
from inference.kvstore import HostPromptCache
from inference.logprobs import LogprobReader, TokenLogprob
from inference.model import LoadedModel
from inference.prefix import Admission, SlotTokens, caller_scope, common_prefix, plan_admission, usable
from inference.sampling import build_grammar, build_sampler_chain
from inference.sequence import ActiveSequence, GenerationRequest, SequenceHandle
from inference.textstream import TextStream

__all__ = ["QueueFull", "Scheduler", "StepReport"]

log = logging.getLogger(__name__)

# One step's output for one sequence: (handle, text, new tokens, finish reason, error, logprobs of the text).
Event = tuple[SequenceHandle, str, int, str | None, str | None, list[TokenLogprob] | None]
# Called on the event loop after every step: (events, sequences in the batch, slots busy, queue depth).
StepReport = Callable[[list[Event], int, int, int], None]
# Called on the decode thread: (prompt tokens prefilled, prompt tokens reused from cached cells).
PromptCounter = Callable[[int, int], None]

IDLE_WAIT_S = 0.5
# One step's work for one sequence: (sequence, prompt tokens to prefill; 0 = decode its last sampled token).
Work = tuple[ActiveSequence, int]
# Prefixes shorter than this are not worth a trip through host RAM (saving, or restoring instead of copying).
MIN_SAVED_TOKENS = 32


class QueueFull(Exception):
    """Every slot is busy and the wait queue is full."""


class Scheduler:
    def __init__(
        self,
        model: LoadedModel,
        *,
        queue_size: int,
        prefill_chunk: int,
        reuse: bool = False,
        share_across_keys: bool = False,
        count_prompt: PromptCounter | None = None,
        host_cache_bytes: int = 0,
    ) -> None:
        self.model = model
        self._host = HostPromptCache(host_cache_bytes, model.sha256) if reuse and host_cache_bytes else None
        self.reuse = reuse
        self.exact = bool(getattr(model, "exact", False))
        self.tail = 2 if self.exact else 1  # prompt tokens always decoded again after a reused prefix
        self.share_across_keys = share_across_keys
        self._count_prompt = count_prompt
        self.slots_total = model.shape.slots
        self.n_ctx = model.shape.n_ctx_per_slot
        self.queue_size = queue_size
        self.prefill_chunk = prefill_chunk
        self._slots: list[ActiveSequence | None] = [None] * self.slots_total
        self._held = [SlotTokens() for _ in range(self.slots_total)]  # what each slot's KV cells hold
        self._tick = 0
        self._waiting: deque[SequenceHandle] = deque()
        self._active = 0
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._running = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._report: StepReport | None = None
        self._batch: Any = None
        self._arrays: tuple[Any, ...] = ()
        self._constrained = ConstrainedSampler(model.llama, model.ctx, model.n_vocab)
        self._logprobs = LogprobReader(model.llama, model.ctx, model.n_vocab, model.piece)

    # -- event loop side --

    @property
    def slots_busy(self) -> int:
        return self._active

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def start(self, loop: asyncio.AbstractEventLoop, report: StepReport) -> None:
        self._loop, self._report = loop, report
        llama = self.model.llama
        self._batch = llama.llama_batch_init(self.model.shape.n_batch, 0, 1)
        batch = self._batch  # the arrays never move: look the pointers up once
        self._arrays = (batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> SequenceHandle:
        """Queue a request; raises QueueFull past slots + queue_size, ValueError on a bad grammar."""
        with self._lock:
            if self._active + len(self._waiting) >= self.slots_total + self.queue_size:
                raise QueueFull
        scope = "" if self.share_across_keys else (request.scope or caller_scope.get())
        if scope != request.scope:
            request = dataclasses.replace(request, scope=scope)
        model = self.model
        grammar = build_grammar(model.llama, model.vocab, request.sampling)
        sampler = build_sampler_chain(model.llama, model.vocab, model.n_vocab, request.sampling)
        handle = SequenceHandle(request, sampler, grammar)
        with self._lock:
            self._waiting.append(handle)
        self._wakeup.set()
        return handle

    def stop(self) -> None:
        self._running = False
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            leftovers = list(self._waiting)
            self._waiting.clear()
        for handle in leftovers:
            self._free_samplers(handle)
        if self._batch is not None:
            self.model.llama.llama_batch_free(self._batch)
            self._batch = None

    # -- decode thread --

    def _run(self) -> None:
        try:
            while self._running:
                if not self._admit():
                    self._wakeup.wait(IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                self._step()
        except Exception:  # the thread must not die silently: fail everything it holds
            log.exception("decode thread crashed")
            self._fail_all("the inference engine failed")
            raise
        finally:
            self._fail_all("the worker is shutting down")

    def _admit(self) -> bool:
        """Drop cancelled sequences, move waiting requests into free slots; True if any slot is busy."""
        for seq in self._slots:
            if seq is not None and seq.handle.cancelled:
                self._release(seq)
        with self._lock:
            if any(handle.cancelled for handle in self._waiting):  # gone while queued: free their places now
                for handle in [h for h in self._waiting if h.cancelled]:
                    self._waiting.remove(handle)
                    self._free_samplers(handle)
            while self._waiting and self._active < self.slots_total:
                handle = self._waiting.popleft()
                if handle.cancelled:
                    self._free_samplers(handle)
                    continue
                self._place(handle, [i for i, seq in enumerate(self._slots) if seq is None])
            return self._active > 0

    def _place(self, handle: SequenceHandle, free: list[int]) -> None:
        """Put a sequence in a free slot, starting from the longest prefix the KV cache holds for it."""
        request = handle.request
        prompt, scope = request.prompt_tokens, request.scope
        self._tick += 1
        if self.reuse:
            plan = plan_admission(self._held, free, prompt, scope, self.tail)
        elif request.group:  # without reuse, the choices of one request share with each other only (the only
            # cells they can find are their running siblings': released slots hold nothing)
            plan = plan_admission(self._held, free, prompt, scope, self.tail, group=request.group)
        else:
            plan = Admission(slot=free[0], keep=0, source=-1, copy=0, follow=-1, wait=0)
        slot, follow = plan.slot, plan.follow
        llama, memory = self.model.llama, self.model.memory
        start = plan.keep if self._holds(slot, plan.keep) else 0
        self._save_evicted(slot, start)
        copy = plan.copy if plan.source >= 0 and self._holds(plan.source, plan.copy) else 0
        restored = self._restore(slot, scope, prompt, max(start, copy, plan.wait if follow >= 0 else 0))
        if restored:
            start, follow = restored, -1
        elif not self._held[slot].tokens:  # a failed restore emptied the slot
            start = 0
        if not restored and copy > start:
            self._copy(plan.source, slot, copy)
            start = copy
        elif not restored and not llama.llama_memory_seq_rm(memory, slot, start, -1):  # may be refused
            llama.llama_memory_seq_rm(memory, slot, -1, -1)
            start = 0
        held = self._held[slot]
        held.tokens, held.scope, held.used, held.planned = prompt[:start], scope, self._tick, prompt
        held.group = request.group
        seq = ActiveSequence(
            handle, slot, TextStream(handle.request.stops), prefilled=start, n_past=start, follow=follow, wait=plan.wait
        )
        handle.cached_tokens = start
        if start and self._count_prompt is not None:
            self._count_prompt(0, start)
        self._slots[slot] = seq
        self._active += 1

    def _save_evicted(self, slot: int, keep: int) -> None:
        """Before a slot's cells past ``keep`` are removed, copy the slot's state to host RAM if worth it."""
        held = self._held[slot]
        if self._host is None or len(held.tokens) - keep < MIN_SAVED_TOKENS or not self._holds(slot, len(held.tokens)):
            return
        llama, ctx = self.model.llama, self.model.ctx
        size = int(llama.llama_state_seq_get_size(ctx, slot))
        if size <= 0 or size > self._host.capacity:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = int(llama.llama_state_seq_get_data(ctx, buffer, size, slot))
        if written > 0:
            self._host.put(held.scope, held.tokens, bytes(buffer)[:written])

    def _restore(self, slot: int, scope: str, prompt: list[int], have: int) -> int:
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
        held = self._held[slot]
        if llama.llama_state_seq_set_data(ctx, data, len(entry.state), slot) == 0:  # no room: prefill instead
            llama.llama_memory_seq_rm(memory, slot, -1, -1)
            held.tokens = []
            return 0
        held.tokens = list(entry.tokens)
        if not self._holds(slot, count) or not llama.llama_memory_seq_rm(memory, slot, count, -1):
            llama.llama_memory_seq_rm(memory, slot, -1, -1)
            held.tokens = []
            return 0
        return count

    def _copy(self, source: int, slot: int, count: int) -> None:
        """Make ``slot`` hold the first ``count`` cells of ``source``."""
        llama, memory = self.model.llama, self.model.memory
        llama.llama_memory_seq_rm(memory, slot, -1, -1)
        if self.exact:  # one KV stream per slot: llama.cpp copies the whole stream (at the next decode), cut back
            llama.llama_memory_seq_cp(memory, source, slot, -1, -1)
            llama.llama_memory_seq_rm(memory, slot, count, -1)
        else:  # one unified cache: the cells are only tagged with the slot too
            llama.llama_memory_seq_cp(memory, source, slot, 0, count)

    def _holds(self, slot: int, count: int) -> bool:
        """Whether the KV cache really still holds what a prompt needs to continue from the slot's first
        ``count`` cells.

        llama.cpp keeps each sequence's positions contiguous, from ``seq_pos_min`` to ``seq_pos_max``. A
        sliding-window cache may drop (and then purge up to) cells that left a sequence's window; the full
        layers keep everything. So the first ``count`` positions can be reused only when the window cells
        that the next position attends to are still there: ``seq_pos_min`` is 0, or at most
        ``count - n_swa`` on a sliding-window model. (In exact mode a running sequence's generated tokens have
        cells past the tracked tokens, which nothing reuses.)
        """
        if count <= 0 or len(self._held[slot].tokens) < count:
            return False
        llama, memory = self.model.llama, self.model.memory
        high = int(llama.llama_memory_seq_pos_max(memory, slot))
        if high < len(self._held[slot].tokens) - 1 or (high != len(self._held[slot].tokens) - 1 and not self.exact):
            return False
        low = int(llama.llama_memory_seq_pos_min(memory, slot))
        return low == 0 or (self.model.n_swa > 0 and low <= count - self.model.n_swa)

    def _resolve_follow(self, seq: ActiveSequence) -> None:
        """A sequence waiting for another slot's prefill: copy those cells once they are there."""
        source, held = self._held[seq.follow], self._held[seq.seq_id]
        prompt, request = seq.prompt, seq.handle.request
        ours = source.scope == request.scope and (self.reuse or source.group == request.group)
        if ours and common_prefix(source.tokens, prompt) >= seq.wait:
            if self._holds(seq.follow, seq.wait):
                self._copy(seq.follow, seq.seq_id, seq.wait)
                if self._count_prompt is not None:
                    self._count_prompt(0, seq.wait - seq.prefilled)
                seq.prefilled = seq.n_past = seq.handle.cached_tokens = seq.wait
                held.tokens = prompt[: seq.wait]
            seq.follow = -1
        elif source.planned is None or not ours or common_prefix(source.planned, prompt) < seq.wait:
            seq.follow = -1  # that slot will not get there (cancelled, reused): prefill it here

    def _free_samplers(self, handle: SequenceHandle) -> None:
        llama = self.model.llama
        llama.llama_sampler_free(handle.sampler)
        if handle.grammar is not None:
            llama.llama_sampler_free(handle.grammar)

    def _release(self, seq: ActiveSequence) -> None:
        held = self._held[seq.seq_id]
        held.planned = None
        if not self.reuse:  # else the cells stay for the next prompt that starts the same way
            self.model.llama.llama_memory_seq_rm(self.model.memory, seq.seq_id, -1, -1)
            held.tokens = []
        elif self.exact:  # generated tokens' cells were decoded one at a time: not what a prefill computes
            self.model.llama.llama_memory_seq_rm(self.model.memory, seq.seq_id, len(held.tokens), -1)
        self._free_samplers(seq.handle)
        with self._lock:
            self._slots[seq.seq_id] = None
            self._active -= 1

    def _plan_step(self) -> list[Work]:
        """Generating sequences first (one token each), then prompt chunks within the prefill budget."""
        for seq in self._slots:
            if seq is not None and seq.follow >= 0:
                self._resolve_follow(seq)
        work: list[Work] = [(seq, 0) for seq in self._slots if seq is not None and not seq.prefilling]
        budget = self.prefill_chunk
        for seq in self._slots:
            if budget <= 0:
                break
            if seq is None or not seq.prefilling or seq.follow >= 0:
                continue
            take = self._chunk(len(seq.prompt) - seq.prefilled, budget)
            work.append((seq, take))
            budget -= take
        return work

    def _chunk(self, left: int, budget: int) -> int:
        """Prompt tokens to prefill now out of ``left``; in exact mode never one alone, now or next time."""
        take = min(budget, left)
        if self.exact and take < left:
            take = max(take, 2)
            if left - take == 1:
                take = take - 1 if take > 2 else left
        return take

    def _fill(self, call: list[Work]) -> None:
        token, pos, n_seq_id, seq_ids, logits = self._arrays
        n = 0
        for seq, take in call:
            held = self._held[seq.seq_id]
            if take == 0:
                token[n], pos[n], n_seq_id[n], logits[n] = seq.last_token, seq.n_past, 1, 1
                seq_ids[n][0] = seq.seq_id
                if not self.exact:  # exact mode keeps (and reuses) prompt cells only
                    held.tokens.append(seq.last_token)
                seq.batch_index = n
                seq.n_past += 1
                n += 1
                continue
            prompt, start = seq.prompt, seq.prefilled
            held.tokens.extend(prompt[start : start + take])
            if self._count_prompt is not None:
                self._count_prompt(take, 0)
            for offset in range(take):
                token[n], pos[n], n_seq_id[n], logits[n] = prompt[start + offset], start + offset, 1, 0
                seq_ids[n][0] = seq.seq_id
                n += 1
            seq.prefilled = seq.n_past = start + take
            if not seq.prefilling:
                logits[n - 1] = 1
                seq.batch_index = n - 1
                held.planned = None
        self._batch.n_tokens = n

    def _step(self) -> None:
        work = self._plan_step()
        if not work:  # only sequences waiting for another slot's prefill (resolved next step)
            return
        if self.exact:  # each prompt chunk alone: llama.cpp would split it to pair it with other sequences
            calls = [[item for item in work if item[1] == 0], *([item] for item in work if item[1] > 0)]
        else:
            calls = [work]
        events: list[Event] = []
        for call in calls:
            if call and not self._decode(call, events):
                return
        self._deliver(events, len(work))

    def _decode(self, call: list[Work], events: list[Event]) -> bool:
        """One ``llama_decode`` of ``call``, then sample the sequences that have logits in it."""
        self._fill(call)
        rc = self.model.llama.llama_decode(self.model.ctx, self._batch)
        if rc != 0:
            log.error("llama_decode failed", extra={"rc": rc, "tokens": self._batch.n_tokens})
            self._deliver(events, 0)
            self._fail_all(f"llama_decode failed ({rc})")
            return False
        for seq, _ in call:
            if seq.batch_index >= 0:
                event = self._sample(seq)
                seq.batch_index = -1
                events.append(event)
                if event[3] is not None:
                    self._release(seq)
        return True

    def _sample(self, seq: ActiveSequence) -> Event:
        model = self.model
        handle = seq.handle
        request = handle.request
        if handle.grammar is None:
            token = model.llama.llama_sampler_sample(handle.sampler, model.ctx, seq.batch_index)
        else:
            token = self._constrained.sample(
                handle.sampler, handle.grammar, seq.batch_index, request.sampling, first=seq.generated == 0
            )
        if not request.ignore_eos and model.is_eog(token):
            return self._event(seq, seq.stream.finish(), 0, "stop")
        seq.generated += 1
        seq.last_token = token
        piece = model.piece(token)
        if request.logprobs is not None:  # only sequences that ask pay for a pass over the vocabulary
            seq.held_logprobs.append((seq.token_bytes, self._logprobs.read(seq.batch_index, token, request.logprobs)))
            seq.token_bytes += len(piece)
        text = seq.stream.feed(piece)
        if seq.stream.stopped:
            return self._event(seq, text, 1, "stop")
        if seq.generated >= request.max_tokens or seq.n_past >= self.n_ctx:
            return self._event(seq, text + seq.stream.finish(), 1, "length")
        return self._event(seq, text, 1, None)

    @staticmethod
    def _event(seq: ActiveSequence, text: str, new_tokens: int, finish_reason: str | None) -> Event:
        logprobs = None
        if seq.handle.request.logprobs is not None:
            logprobs = seq.release_logprobs(text, final=finish_reason is not None)
        return seq.handle, text, new_tokens, finish_reason, None, logprobs

    def _deliver(self, events: list[Event], batch_size: int) -> None:
        if self._loop is None or self._report is None or (not events and not batch_size):
            return
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(self._report, events, batch_size, self._active, len(self._waiting))

    def _fail_all(self, message: str) -> None:
        events: list[Event] = []
        for seq in self._slots:
            if seq is not None:
                events.append((seq.handle, "", 0, None, message, None))
                self._release(seq)
        if not self._running:
            with self._lock:
                waiting = list(self._waiting)
                self._waiting.clear()
            for handle in waiting:
                self._free_samplers(handle)
                events.append((handle, "", 0, None, message, None))
        self.model.llama.llama_memory_clear(self.model.memory, True)
        for held in self._held:
            held.tokens, held.planned = [], None
        self._deliver(events, 0)
