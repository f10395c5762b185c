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

from inference.sampling import SamplingParams
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


class SequenceHandle:
    """The event-loop end of a sequence: text arrives here once per decode step."""

    def __init__(self, request: GenerationRequest, sampler: Any, grammar: Any = None) -> None:
        self.request = request
        self.sampler = sampler  # built on submit; owned by the decode thread from then on
        self.grammar = grammar  # grammar sampler for structured output, or None
        self.prompt_tokens = len(request.prompt_tokens)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False  # set on the loop, read by the decode thread
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._buffer: list[str] = []
        self._wake = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def cancel(self) -> None:
        """Client went away: the decode thread drops the sequence at its next step."""
        if not self.done:
            self.cancelled = True

    def push(self, text: str, new_tokens: int, finish_reason: str | None, error: str | None) -> None:
        """Called on the event loop with one decode step's output."""
        if text:
            self._buffer.append(text)
        self.completion_tokens += new_tokens
        if finish_reason is not None:
            self.finish_reason = finish_reason
        if error is not None:
            self.error = error
        self._wake.set()

    async def chunks(self) -> AsyncIterator[str]:
        """Text as it is produced; raises :class:`GenerationFailed` if the sequence failed."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._buffer:
                text = "".join(self._buffer)
                self._buffer.clear()
                yield text
            if self.error is not None:
                raise GenerationFailed(self.error)
            if self.finish_reason is not None:
                return

    async def text(self) -> str:
        return "".join([piece async for piece in self.chunks()])


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

    @property
    def prompt(self) -> list[int]:
        return self.handle.request.prompt_tokens

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.handle.request.prompt_tokens)
