"""What the worker answers: one JSON body, or the chunks of an SSE stream; the handler only writes them.

A request becomes one or more sequences (``n`` choices per prompt, and a
list of prompts on ``/v1/completions``: choice ``prompt_index * n + i``),
all decoded together. :func:`whole` waits for all of them; :func:`stream`
interleaves their chunks as they come, each choice with its own ``index``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from appliance.core.errors import APIError
from appliance.core.wire import PromptTokensDetails, Usage
from inference.logprobs import TokenLogprob
from inference.replies import Emitter
from inference.sequence import GenerationFailed, SequenceHandle

__all__ = ["Answer", "Streamed", "Whole", "stream", "usage", "whole"]

Chunk = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Whole:
    """A non-streamed answer: the JSON body to send."""

    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Streamed:
    """A streamed answer: chunks to send as SSE data (the iterator raises :class:`APIError` on a failure)."""

    chunks: AsyncGenerator[Chunk, None]
    handles: tuple[SequenceHandle, ...]

    async def aclose(self) -> None:
        """The client is gone or the stream ended: free every slot still held (no-op when finished)."""
        for handle in self.handles:
            handle.cancel()
        await self.chunks.aclose()


Answer = Whole | Streamed


def _failed(exc: GenerationFailed) -> APIError:
    return APIError(500, f"Generation failed: {exc}", type_="server_error", code="generation_failed")


def usage(handles: list[SequenceHandle], n: int = 1) -> Usage:
    """A request's usage; ``handles`` are its prompts' ``n`` choices each, prompt by prompt. As OpenAI counts
    it, a prompt counts once however many choices it has; completion tokens are every choice's. A prompt's
    cached tokens are those every one of its choices took from cached cells (the first choice prefills what
    was not cached; the others copy its cells)."""
    groups = [handles[i : i + n] for i in range(0, len(handles), n)]
    prompt = sum(group[0].prompt_tokens for group in groups)
    completion = sum(h.completion_tokens for h in handles)
    cached = PromptTokensDetails(cached_tokens=sum(min(h.cached_tokens for h in group) for group in groups))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=cached)


async def whole(handles: list[SequenceHandle]) -> list[tuple[str, list[TokenLogprob]]]:
    """Every sequence's text and logprobs, in order; slots are freed whatever happens."""
    try:
        return list(await asyncio.gather(*(h.whole() for h in handles)))
    except GenerationFailed as exc:
        raise _failed(exc) from None
    finally:
        for handle in handles:
            handle.cancel()  # no-op when finished; frees the slot when the client went away or one failed


async def stream(pairs: list[tuple[SequenceHandle, Emitter]], usage_chunk: Chunk | None, n: int = 1
                 ) -> AsyncGenerator[Chunk, None]:
    """Every choice's chunks as its text arrives; the usage chunk (when asked) last."""
    for _, emitter in pairs:
        for item in emitter.start():
            yield item
    handles = [handle for handle, _ in pairs]
    try:
        async for index, text, logprobs in _merged(handles):
            handle, emitter = pairs[index]
            items = emitter.piece(text, logprobs) if text is not None else emitter.end(handle.finish_reason or "stop")
            for item in items:
                yield item
    except GenerationFailed as exc:
        raise _failed(exc) from None
    if usage_chunk is not None:
        yield {**usage_chunk, "usage": usage(handles, n).model_dump()}


async def _merged(handles: list[SequenceHandle]) -> AsyncIterator[tuple[int, str | None, list[TokenLogprob]]]:
    """(choice, text, logprobs) as each sequence produces them; text None once a sequence has ended."""
    if len(handles) == 1:
        async for text, logprobs in handles[0].pieces():
            yield 0, text, logprobs
        yield 0, None, []
        return
    queue: asyncio.Queue[tuple[int, str | None, list[TokenLogprob], GenerationFailed | None]] = asyncio.Queue()

    async def pump(index: int, handle: SequenceHandle) -> None:
        try:
            async for text, logprobs in handle.pieces():
                queue.put_nowait((index, text, logprobs, None))
        except GenerationFailed as exc:
            queue.put_nowait((index, None, [], exc))
            return
        queue.put_nowait((index, None, [], None))

    tasks = [asyncio.create_task(pump(index, handle)) for index, handle in enumerate(handles)]
    try:
        for _ in range(len(handles)):
            while True:
                choice, piece, items, error = await queue.get()
                if error is not None:
                    raise error
                yield choice, piece, items
                if piece is None:
                    break
    finally:
        for task in tasks:
            task.cancel()
