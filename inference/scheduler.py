"""Continuous batching: one thread owns the llama.cpp context and decodes all slots together.

Every step packs the token of each generating sequence (and its draft, when
it speculates: inference.speculative) plus up to ``prefill_chunk`` prompt
tokens of sequences still prefilling, calls ``llama_decode``, samples each
sequence with its own sampler chain, and hands the step's text to the event
loop in a single ``call_soon_threadsafe``. Sequences join and leave only at
step boundaries, so a short request never waits for a long one and a long
prompt never stalls the others for long.

With prefix reuse on, a slot keeps its KV cells, prompt and answer, when its
sequence ends; a new prompt starts from the longest prefix a slot or host RAM
holds (inference.prefix decides, inference.placement carries it out) and
prefills only the rest.

Two modes (the model's ``exact``, ``[worker] deterministic``). The default
uses llama.cpp's fastest kernels and one unified KV cache; prefix reuse and
speculation may move a greedy answer where two tokens are near-tied, never
its sense. The deterministic mode is batch-invariant: a reused cell holds the
very numbers a fresh prefill computes, so an answer is the same bit for bit
with reuse or speculation on or off. On llama.cpp's CPU backend (one KV stream
per slot, inference.model) a chunk's numbers do not depend on its size or on
the other slots, except that a single token runs other attention kernels than
two or more. So in this mode every call decodes chunks of equal length (each
prompt chunk alone; generating sequences grouped by how many tokens they
decode, since llama.cpp would otherwise split a chunk to pair it with the
others), a chunk is never one token (the prefill budget bends by one, at
least two prompt tokens are decoded again after a reused prefix, and a
generating sequence without a draft decodes its previous token again with its
new one), so every cell, an answer's included, is what a prefill computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from appliance.core.priority import Priority
from inference.constrained import ConstrainedSampler
from inference.lanes import LaneBook, LaneCounter, LanePolicy, Runner, victims
from inference.logprobs import LogprobReader, TokenLogprob
from inference.model import LoadedModel
from inference.placement import KvPlacement, PromptCounter
from inference.sampling import build_grammar, build_sampler_chain
from inference.sequence import ActiveSequence, GenerationRequest, SequenceHandle
from inference.speculative import DraftPolicy, PromptLookup, StepCost

__all__ = ["DraftCounter", "Event", "QueueFull", "Scheduler", "SpeculationSettings", "StepReport"]

log = logging.getLogger(__name__)

# One step's output for one sequence: (handle, text, new tokens, finish reason, error, logprobs of the text).
Event = tuple[SequenceHandle, str, int, str | None, str | None, list[TokenLogprob] | None]
# Called on the event loop after every step: (events, sequences in the batch, slots busy, queue depth).
StepReport = Callable[[list[Event], int, int, int], None]
# Called on the decode thread after a draft is checked: (draft tokens decoded, draft tokens accepted).
DraftCounter = Callable[[int, int], None]

IDLE_WAIT_S = 0.5
PAUSE_WAIT_S = 0.001
# One step's work for one sequence: (sequence, prompt tokens to prefill; 0 = decode its last sampled token
# and its draft).
Work = tuple[ActiveSequence, int]


@dataclasses.dataclass(frozen=True, slots=True)
class SpeculationSettings:
    """Prompt-lookup drafting: off, or up to ``draft_max`` tokens when :class:`DraftPolicy` says it pays."""

    enabled: bool = False
    draft_max: int = 8
    probe_every: int = 48  # steps a sequence whose drafts do not pay waits before it tries one again
    token_cost: float = 0.15  # one more output row's share of a one-row call until calls are measured (StepCost)


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
        speculation: SpeculationSettings | None = None,
        count_draft: DraftCounter | None = None,
        lanes: LanePolicy | None = None,
        count_lane: LaneCounter | None = None,
    ) -> None:
        self.model = model
        self.reuse = reuse
        self.exact = bool(getattr(model, "exact", False))
        self.kv = KvPlacement(model, reuse=reuse, exact=self.exact, host_cache_bytes=host_cache_bytes,
                              count_prompt=count_prompt)
        self.share_across_keys = share_across_keys
        self._count_prompt = count_prompt
        self._count_draft = count_draft
        self.speculation = speculation or SpeculationSettings()
        self._cost = StepCost(prior=self.speculation.token_cost)
        self.slots_total = model.shape.slots
        self.n_ctx = model.shape.n_ctx_per_slot
        self.n_batch = model.shape.n_batch
        self.queue_size = queue_size
        self.prefill_chunk = prefill_chunk
        self._slots: list[ActiveSequence | None] = [None] * self.slots_total
        self._waiting: deque[SequenceHandle] = deque()
        # Batch sequences evicted for interactive ones (inference.lanes), resumed before any new batch request.
        self._parked: deque[ActiveSequence] = deque()
        self.lanes = LaneBook(self.slots_total, lanes or LanePolicy(batch_busy=self.slots_total, grace_s=0.0),
                              count_lane)
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
        return len(self._waiting) + len(self._parked)

    def start(self, loop: asyncio.AbstractEventLoop, report: StepReport) -> None:
        self._loop, self._report = loop, report
        llama = self.model.llama
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)
        batch = self._batch  # the arrays never move: look the pointers up once
        self._arrays = (batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> SequenceHandle:
        """Queue a request (its ``scope``: whose cached prefixes it may use); raises QueueFull past slots +
        queue_size, ValueError on a bad grammar."""
        with self._lock:
            if self._active + len(self._waiting) + len(self._parked) >= self.slots_total + self.queue_size:
                raise QueueFull
        if self.share_across_keys and request.scope is not None:
            request = dataclasses.replace(request, scope=None)
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
            leftovers = list(self._waiting) + [seq.handle for seq in self._parked]
            self._waiting.clear()
            self._parked.clear()
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
                if not self._step():  # every sequence held out (the batch lane paused): until the grace ends
                    self._wakeup.wait(max(PAUSE_WAIT_S, min(self.lanes.grace_left(), IDLE_WAIT_S)))
                    self._wakeup.clear()
        except Exception:  # the thread must not die silently: fail everything it holds
            log.exception("decode thread crashed")
            self._fail_all("the inference engine failed")
            raise
        finally:
            self._fail_all("the worker is shutting down")

    def _admit(self) -> bool:
        """Drop cancelled sequences, move waiting requests into free slots (interactive ones first, taking a batch
        sequence's slot when none is free; then evicted batch sequences, then the rest in order); True if any
        slot is busy."""
        for seq in self._slots:
            if seq is not None and seq.handle.cancelled:
                self._release(seq)
        for seq in [seq for seq in self._parked if seq.handle.cancelled]:
            self._parked.remove(seq)
            self._free_samplers(seq.handle)
        with self._lock:
            if any(handle.cancelled for handle in self._waiting):  # gone while queued: free their places now
                for handle in [h for h in self._waiting if h.cancelled]:
                    self._waiting.remove(handle)
                    self._free_samplers(handle)
            self._admit_interactive()
            while self._parked and self._active < self.slots_total:
                self._resume(self._parked.popleft())
            while self._waiting and self._active < self.slots_total:
                self._place(self._waiting.popleft())
            return self._active > 0

    def _admit_interactive(self) -> None:
        """Waiting interactive requests go first; with no free slot, a batch sequence gives its slot up."""
        interactive = [h for h in self._waiting if h.request.priority is Priority.INTERACTIVE]
        if not interactive:
            return
        self.lanes.note_interactive()
        for handle in interactive:
            if self._active >= self.slots_total:
                victim = victims(self._runners(), 1)
                if not victim:
                    return
                seq = self._slots[victim[0]]
                assert seq is not None
                self._evict(seq)
            self._waiting.remove(handle)
            self._place(handle)

    def _place(self, handle: SequenceHandle) -> None:
        seq = self.kv.place(handle, [i for i, seq in enumerate(self._slots) if seq is None])
        self._slots[seq.seq_id] = seq
        self._active += 1
        self.lanes.admitted(seq.seq_id)

    def _evict(self, seq: ActiveSequence) -> None:
        """A batch sequence leaves its slot for an interactive one. Nothing it generated is lost or sent twice:
        its sampler, text stream and counts stay with it, and it resumes from its history (prompt and generated
        tokens), whose cells stay behind as a cached prefix (with prefix reuse) or are prefilled again."""
        slot = seq.seq_id
        fresh = seq.history is None and seq.generated == 0
        if not seq.prefilling:
            seq.history = [*self.kv.held[slot].tokens[: seq.n_past], seq.last_token]
        seq.draft, seq.batch_index, seq.follow = [], -1, -1
        self.kv.release(slot)
        self.lanes.left(slot)
        self._slots[slot] = None
        self._active -= 1
        self.lanes.counter.evicted(1)
        if fresh and seq.prefilling:  # nothing generated yet: it starts again as the request it was
            self._waiting.appendleft(seq.handle)
        else:
            self._parked.append(seq)

    def _resume(self, seq: ActiveSequence) -> None:
        self.kv.resume(seq, [i for i, slot in enumerate(self._slots) if slot is None])
        self._slots[seq.seq_id] = seq
        self._active += 1
        self.lanes.admitted(seq.seq_id)
        self.lanes.counter.resumed(1)

    def _runners(self) -> list[Runner]:
        return [Runner(seq.seq_id, seq.priority, seq.prefilling, seq.n_past) for seq in self._slots if seq is not None]

    def _free_samplers(self, handle: SequenceHandle) -> None:
        llama = self.model.llama
        llama.llama_sampler_free(handle.sampler)
        if handle.grammar is not None:
            llama.llama_sampler_free(handle.grammar)

    def _release(self, seq: ActiveSequence) -> None:
        self.kv.release(seq.seq_id)
        self.lanes.left(seq.seq_id)
        self._free_samplers(seq.handle)
        with self._lock:
            self._slots[seq.seq_id] = None
            self._active -= 1

    def _plan_step(self) -> list[Work]:
        """The sequences the lanes let step (inference.lanes): generating ones (one token each, and their
        drafts), then prompt chunks within the prefill budget, interactive prompts first."""
        slots = self._slots
        for seq in slots:
            if seq is not None and seq.follow >= 0:
                source = slots[seq.follow]
                if seq.priority is Priority.INTERACTIVE and source is not None and source.priority is Priority.BATCH:
                    seq.follow = -1  # an interactive prompt never waits on a batch prefill the lanes may hold back
                else:
                    self.kv.resolve_follow(seq)
        stepping = [seq for slot in self.lanes.stepping(self._runners()) if (seq := slots[slot]) is not None]
        work: list[Work] = [(seq, 0) for seq in stepping if not seq.prefilling]
        budget = self.prefill_chunk
        batch_budget = self.lanes.policy.batch_prefill if self.lanes.shrunk else budget
        for seq in sorted(stepping, key=lambda seq: seq.priority):
            batch = seq.priority is Priority.BATCH
            if budget <= 0 or (batch and batch_budget <= 0):
                break
            if not seq.prefilling or seq.follow >= 0:
                continue
            take = self._chunk(len(seq.prompt) - seq.prefilled, min(budget, batch_budget) if batch else budget)
            work.append((seq, take))
            budget -= take
            if batch:
                batch_budget -= take
        self._plan_drafts(work)
        return work

    def _chunk(self, left: int, budget: int) -> int:
        """Prompt tokens to prefill now out of ``left``; in exact mode never one alone, now or next time."""
        take = min(budget, left)
        if self.exact and take < left:
            take = max(take, 2)
            if left - take == 1:
                take = take - 1 if take > 2 else left
        return take

    def _plan_drafts(self, work: list[Work]) -> None:
        """Each generating sequence's draft for this step (inference.speculative), within the batch's room."""
        spec = self.speculation
        generating = [seq for seq, take in work if take == 0]
        for seq in generating:
            seq.draft = []
        # Deterministic mode: chunks of different lengths go in separate calls, so a draft beside other generating
        # sequences would split the step's one call in two; there, drafts are for a sequence decoding alone.
        if not spec.enabled or not generating or (self.exact and len(generating) > 1):
            return
        tokens = sum(take for _, take in work) + len(generating) * (2 if self.exact else 1)
        outputs = len(generating)  # rows with logits before any draft (each finished prompt adds one: ignored)
        room = self.n_batch - tokens
        most = spec.draft_max
        if self.exact:  # a group of equal chunks must fit one ubatch, or llama.cpp splits the chunks
            most = min(most, self.n_batch // len(generating) - 1)
        for seq in generating:
            request = seq.handle.request
            if seq.handle.grammar is not None:
                continue
            if seq.lookup is None:
                seq.lookup = PromptLookup([*seq.prompt, seq.last_token])  # the first generating step
                seq.policy = DraftPolicy(most=spec.draft_max, probe_every=spec.probe_every)
            assert seq.policy is not None
            limit = min(most, room, request.max_tokens - seq.generated - 1, self.n_ctx - seq.n_past - 2)
            candidates = seq.lookup.draft(limit) if limit > 0 else []
            length = seq.policy.length(len(candidates), outputs, self._cost)
            if length:
                seq.draft = candidates[:length]
                room -= length - (1 if self.exact else 0)  # a draft replaces the exact mode's repeated token

    def _rows(self, seq: ActiveSequence) -> tuple[list[int], int]:
        """A generating sequence's tokens to decode now and the position of the first."""
        if seq.draft or not self.exact:
            return [seq.last_token, *seq.draft], seq.n_past
        # Exact mode, no draft: decode the previous token again with the new one (never a chunk of one).
        previous = seq.n_past - 1
        token = self.kv.held[seq.seq_id].tokens[previous]
        self.kv.trim(seq.seq_id, previous)
        return [token, seq.last_token], previous

    def _fill(self, call: list[Work]) -> None:
        token, pos, n_seq_id, seq_ids, logits = self._arrays
        n = 0
        for seq, take in call:
            held = self.kv.held[seq.seq_id]
            if take == 0:
                rows, first = self._rows(seq)
                held.tokens.extend(rows)
                logit_from = n + len(rows) - 1 - len(seq.draft)  # the last token's row, then the draft's
                for offset, value in enumerate(rows):
                    token[n], pos[n], n_seq_id[n], logits[n] = value, first + offset, 1, int(n >= logit_from)
                    seq_ids[n][0] = seq.seq_id
                    n += 1
                seq.batch_index = logit_from
                continue
            prompt, start = seq.prompt, seq.prefilled
            held.tokens.extend(prompt[start : start + take])
            if seq.history is not None:  # a resumed sequence's cells again, not prompt work
                self.lanes.counter.recomputed(take)
            else:
                self.lanes.counter.tokens(seq.priority, take, 0)
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

    def _calls(self, work: list[Work]) -> list[list[Work]]:
        """The ``llama_decode`` calls of one step: one, or in exact mode one per chunk length."""
        if not self.exact:
            return [work]
        groups: dict[int, list[Work]] = {}
        for item in work:
            if item[1] == 0:
                groups.setdefault(1 + max(1, len(item[0].draft)), []).append(item)
        return [*groups.values(), *([item] for item in work if item[1] > 0)]

    def _step(self) -> bool:
        """One decode step; False when no sequence could step (held out by the lanes, or waiting for another
        slot's prefill)."""
        work = self._plan_step()
        if not work:
            return False
        events: list[Event] = []
        for call in self._calls(work):
            if call and not self._decode(call, events):
                return True
        self._deliver(events, len(work))
        return True

    def _decode(self, call: list[Work], events: list[Event]) -> bool:
        """One ``llama_decode`` of ``call``, then sample the sequences that have logits in it."""
        self._fill(call)
        generation = all(take == 0 for _, take in call)  # a prompt chunk's time says nothing about drafts
        rows = sum(1 + len(seq.draft) for seq, _ in call)
        started = time.perf_counter()
        rc = self.model.llama.llama_decode(self.model.ctx, self._batch)
        if rc != 0:
            log.error("llama_decode failed", extra={"rc": rc, "tokens": self._batch.n_tokens})
            self._deliver(events, 0)
            self._fail_all(f"llama_decode failed ({rc})")
            return False
        for seq, take in call:
            if seq.batch_index >= 0:
                event = self._advance(seq) if take == 0 else self._sample(seq, seq.batch_index)
                seq.batch_index = -1
                events.append(event)
                if event[2]:
                    self.lanes.counter.tokens(seq.priority, 0, event[2])
                if event[3] is not None:
                    self._release(seq)
        if generation:  # the call and its sampling: what a draft row costs the step
            self._cost.add(rows, time.perf_counter() - started)
        return True

    def _advance(self, seq: ActiveSequence) -> Event:
        """Sample a generating sequence at its token's row and along its draft while the draft holds; drop the
        cells of what it did not accept."""
        draft, first = seq.draft, seq.n_past
        texts: list[str] = []
        new_tokens, finish = 0, None
        row = 0
        while True:
            seq.n_past = first + row + 1
            text, new, finish = self._take(seq, seq.batch_index + row)
            texts.append(text)
            new_tokens += new
            if finish is not None or row >= len(draft) or seq.last_token != draft[row]:
                break
            row += 1
        self.kv.trim(seq.seq_id, seq.n_past)
        if draft:
            assert seq.policy is not None
            seq.policy.update(len(draft), row)
            if self._count_draft is not None:
                self._count_draft(len(draft), row)
            seq.draft = []
        return self._event(seq, "".join(texts), new_tokens, finish)

    def _sample(self, seq: ActiveSequence, index: int) -> Event:
        text, new_tokens, finish = self._take(seq, index)
        return self._event(seq, text, new_tokens, finish)

    def _take(self, seq: ActiveSequence, index: int) -> tuple[str, int, str | None]:
        """Sample one token at batch row ``index``: (text to send, new tokens, finish reason)."""
        model = self.model
        handle = seq.handle
        request = handle.request
        if handle.grammar is None:
            token = model.llama.llama_sampler_sample(handle.sampler, model.ctx, index)
        else:
            token = self._constrained.sample(
                handle.sampler, handle.grammar, index, request.sampling, first=seq.generated == 0
            )
        if not request.ignore_eos and model.is_eog(token):
            return seq.stream.finish(), 0, "stop"
        seq.generated += 1
        seq.last_token = token
        if seq.lookup is not None:
            seq.lookup.append(token)
        piece = model.piece(token)
        if request.logprobs is not None:  # only sequences that ask pay for a pass over the vocabulary
            seq.held_logprobs.append((seq.token_bytes, self._logprobs.read(index, token, request.logprobs)))
            seq.token_bytes += len(piece)
        text = seq.stream.feed(piece)
        if seq.stream.stopped:
            return text, 1, "stop"
        if seq.generated >= request.max_tokens or seq.n_past >= self.n_ctx:
            return text + seq.stream.finish(), 1, "length"
        return text, 1, None

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
                waiting = list(self._waiting) + [seq.handle for seq in self._parked]
                self._waiting.clear()
                self._parked.clear()
            for handle in waiting:
                self._free_samplers(handle)
                events.append((handle, "", 0, None, message, None))
        self.kv.clear()
        self._deliver(events, 0)
