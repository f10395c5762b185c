"""Continuous batching: one thread owns the llama.cpp context and decodes all slots together.

Every step packs one token for each generating sequence plus up to
``prefill_chunk`` prompt tokens of sequences still prefilling, calls
``llama_decode`` once, samples each sequence with its own sampler chain, and
hands the step's text to the event loop in a single ``call_soon_threadsafe``.
Sequences join and leave only at step boundaries, so a short request never
waits for a long one and a long prompt never stalls the others for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from inference.constrained import ConstrainedSampler
from inference.logprobs import LogprobReader, TokenLogprob
from inference.model import LoadedModel
from inference.sampling import build_grammar, build_sampler_chain
from inference.sequence import ActiveSequence, GenerationRequest, SequenceHandle
from inference.textstream import TextStream

__all__ = ["QueueFull", "Scheduler", "StepReport"]

log = logging.getLogger(__name__)

# One step's output for one sequence: (handle, text, new tokens, finish reason, error, logprobs of the text).
Event = tuple[SequenceHandle, str, int, str | None, str | None, list[TokenLogprob] | None]
# Called on the event loop after every step: (events, sequences in the batch, slots busy, queue depth).
StepReport = Callable[[list[Event], int, int, int], None]

IDLE_WAIT_S = 0.5


class QueueFull(Exception):
    """Every slot is busy and the wait queue is full."""


class Scheduler:
    def __init__(self, model: LoadedModel, *, queue_size: int, prefill_chunk: int) -> None:
        self.model = model
        self.slots_total = model.shape.slots
        self.n_ctx = model.shape.n_ctx_per_slot
        self.queue_size = queue_size
        self.prefill_chunk = prefill_chunk
        self._slots: list[ActiveSequence | None] = [None] * self.slots_total
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
            for index, seq in enumerate(self._slots):
                if seq is not None:
                    continue
                while self._waiting:
                    handle = self._waiting.popleft()
                    if handle.cancelled:
                        self._free_samplers(handle)
                        continue
                    self._slots[index] = ActiveSequence(handle, index, TextStream(handle.request.stops))
                    self._active += 1
                    break
            return self._active > 0

    def _free_samplers(self, handle: SequenceHandle) -> None:
        llama = self.model.llama
        llama.llama_sampler_free(handle.sampler)
        if handle.grammar is not None:
            llama.llama_sampler_free(handle.grammar)

    def _release(self, seq: ActiveSequence) -> None:
        llama = self.model.llama
        llama.llama_memory_seq_rm(self.model.memory, seq.seq_id, -1, -1)
        self._free_samplers(seq.handle)
        with self._lock:
            self._slots[seq.seq_id] = None
            self._active -= 1

    def _fill_batch(self) -> int:
        """Generating sequences first (one token each), then prompt chunks within the prefill budget."""
        token, pos, n_seq_id, seq_ids, logits = self._arrays
        n = 0
        for seq in self._slots:
            if seq is None or seq.prefilling:
                continue
            token[n], pos[n], n_seq_id[n], logits[n] = seq.last_token, seq.n_past, 1, 1
            seq_ids[n][0] = seq.seq_id
            seq.batch_index = n
            seq.n_past += 1
            n += 1
        sequences = n
        budget = self.prefill_chunk
        for seq in self._slots:
            if budget <= 0:
                break
            if seq is None or not seq.prefilling:
                continue
            prompt, start = seq.prompt, seq.prefilled
            take = min(budget, len(prompt) - start)
            for offset in range(take):
                token[n], pos[n], n_seq_id[n], logits[n] = prompt[start + offset], start + offset, 1, 0
                seq_ids[n][0] = seq.seq_id
                n += 1
            seq.prefilled = seq.n_past = start + take
            budget -= take
            sequences += 1
            if not seq.prefilling:
                logits[n - 1] = 1
                seq.batch_index = n - 1
        self._batch.n_tokens = n
        return sequences

    def _step(self) -> None:
        sequences = self._fill_batch()
        rc = self.model.llama.llama_decode(self.model.ctx, self._batch)
        if rc != 0:
            log.error("llama_decode failed", extra={"rc": rc, "tokens": self._batch.n_tokens})
            self._fail_all(f"llama_decode failed ({rc})")
            return
        events: list[Event] = []
        for seq in self._slots:
            if seq is not None and seq.batch_index >= 0:
                event = self._sample(seq)
                seq.batch_index = -1
                events.append(event)
                if event[3] is not None:
                    self._release(seq)
        self._deliver(events, sequences)

    def _sample(self, seq: ActiveSequence) -> Event:
        model = self.model
        handle = seq.handle
        request = handle.request
        if handle.grammar is None:
            token = model.llama.llama_sampler_sample(handle.sampler, model.ctx, seq.batch_index)
        else:
            token = self._constrained.sample(handle.sampler, handle.grammar, seq.batch_index, request.sampling,
                                             first=seq.generated == 0)
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
        self._deliver(events, 0)
