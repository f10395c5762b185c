"""One generation request as both sides of the scheduler see it.

:class:`SequenceHandle` lives on the event loop: the HTTP handler awaits its
text, and cancels it when the client goes away. :class:`ActiveSequence` is
the decode thread's private state for a request that holds a slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from appliance.core.priority import Priority
from inference.logprobs import TokenLogprob
from inference.prefix import Scope
from inference.sampling import SamplingParams
from inference.speculative import DraftPolicy, PromptLookup
from inference.textstream import TextStream

__all__ = ["ActiveSequence", "GenerationFailed", "GenerationRequest", "SequenceHandle"]


class GenerationFailed(Exception):
    """The decode thread could not finish this sequence (llama.cpp error, shutdown)."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n: each token's logprob and its n likeliest alternatives
    scope: Scope = None  # whose cached prefixes this prompt may reuse (an API key's id; None: shared by all)
    # Sequences submitted together for one prompt (the n choices of a request): they may copy each other's KV
    # cells even with prefix reuse off ("": none; with reuse on, the scope alone decides what is shared).
    group: str = ""
    # Interactive work goes first; batch work takes the compute interactive work leaves (inference.lanes).
    priority: Priority = Priority.INTERACTIVE


class SequenceHandle:
    """The event-loop end of a sequence: text arrives here once per decode step."""

    def __init__(self, request: GenerationRequest, sampler: Any, grammar: Any = None) -> None:
        self.request = request
        self.sampler = sampler  # built on submit; owned by the decode thread from then on
        self.grammar = grammar  # grammar sampler for structured output, or None
        self.prompt_tokens = len(request.prompt_tokens)
        self.cached_tokens = 0  # prompt tokens whose KV cells were reused, not prefilled (set on admission)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False  # set on the loop, read by the decode thread
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._buffer: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._wake = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def cancel(self) -> None:
        """Client went away: the decode thread drops the sequence at its next step."""
        if not self.done:
            self.cancelled = True

    def push(
        self,
        text: str,
        new_tokens: int,
        finish_reason: str | None,
        error: str | None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        """Called on the event loop with one decode step's output."""
        if text:
            self._buffer.append(text)
        if logprobs:
            self._logprobs.extend(logprobs)
        self.completion_tokens += new_tokens
        if finish_reason is not None:
            self.finish_reason = finish_reason
        if error is not None:
            self.error = error
        self._wake.set()

    async def pieces(self) -> AsyncIterator[tuple[str, list[TokenLogprob]]]:
        """Text as it is produced, with the logprobs of the tokens that text is made of (when asked).

        Raises :class:`GenerationFailed` if the sequence failed.
        """
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._buffer or self._logprobs:
                text = "".join(self._buffer)
                logprobs = self._logprobs
                self._buffer, self._logprobs = [], []
                yield text, logprobs
            if self.error is not None:
                raise GenerationFailed(self.error)
            if self.finish_reason is not None:
                return

    async def chunks(self) -> AsyncIterator[str]:
        async for text, _ in self.pieces():
            if text:
                yield text

    async def whole(self) -> tuple[str, list[TokenLogprob]]:
        texts: list[str] = []
        logprobs: list[TokenLogprob] = []
        async for text, items in self.pieces():
            texts.append(text)
            logprobs.extend(items)
        return "".join(texts), logprobs

    async def text(self) -> str:
        return (await self.whole())[0]


@dataclass(slots=True)
class ActiveSequence:
    """Decode-thread state of a sequence that holds a slot (its seq id)."""

    handle: SequenceHandle
    seq_id: int
    stream: TextStream
    prefilled: int = 0  # prompt tokens already in the KV cache
    n_past: int = 0  # tokens in the KV cache for this sequence
    last_token: int = -1  # sampled, not yet decoded
    generated: int = 0
    batch_index: int = -1  # where this step's logits are, -1 = none
    follow: int = -1  # slot prefilling this prompt's prefix right now: wait, then copy its cells (-1: none)
    wait: int = 0  # how many of that slot's cells to copy
    # Logprobs wait here until the text of their token is sent (text is held back at stop-sequence prefixes).
    held_logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)  # (start byte, logprob)
    token_bytes: int = 0  # bytes of all generated tokens
    sent_bytes: int = 0  # bytes of the text handed to the client so far
    # Speculative decoding (inference.speculative): the history's n-gram index, when to draft, this step's draft.
    lookup: PromptLookup | None = None
    policy: DraftPolicy | None = None
    draft: list[int] = field(default_factory=list)
    # A batch sequence that left its slot for an interactive one (inference.lanes) resumes from its whole history,
    # prompt and generated tokens, as its prompt: what is not cached is prefilled again, the sampler state kept.
    history: list[int] | None = None

    def release_logprobs(self, text: str, *, final: bool) -> list[TokenLogprob]:
        """The logprobs of tokens now wholly sent (at the end: of every token that began in sent text)."""
        self.sent_bytes += len(text.encode("utf-8"))
        held, sent = self.held_logprobs, self.sent_bytes
        count = 0
        for start, item in held:
            if (start >= sent) if final else (start + len(item.piece) > sent):
                break
            count += 1
        released = [item for _, item in held[:count]]
        self.held_logprobs = [] if final else held[count:]
        return released

    @property
    def prompt(self) -> list[int]:
        """The tokens to prefill: the request's prompt, or after an eviction the whole history."""
        return self.handle.request.prompt_tokens if self.history is None else self.history

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def priority(self) -> Priority:
        return self.handle.request.priority
