"""How a Responses request presents the chat answer it asked for (``gateway.generation.Output``).

A whole answer becomes the Response object; a chat SSE stream (already relayed: usage chunk included,
a cut stream ending with ``event: error``) becomes the Responses event sequence. Either way, the
finished response is stored (unless ``store`` is false) before this process reads another request (a whole
answer: by a task that runs at the loop's next turn; a stream: before its last event), so that a client
reading it back, or continuing from it, finds it.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from appliance.core.sse import SSEDecoder, json_object
from gateway.generation import Job
from gateway.responses.events import ResponseEvents, encode_json, encode_sse, whole_answer
from gateway.responses.shape import Draft
from gateway.responses.store import ResponseStore, StoredResponse
from gateway.responses.translate import Turn

__all__ = ["ResponsesOutput"]

_log = logging.getLogger("gateway.responses")
_CUT = {"error": {"message": "The model stream ended unexpectedly.", "type": "server_error",
                  "code": "stream_interrupted"}}


@dataclass(frozen=True, slots=True)
class ResponsesOutput:
    """The Responses presentation of one request's chat answer; ``store`` is None when nothing is stored."""

    draft: Draft
    turn: Turn
    key_id: str
    store: ResponseStore | None
    max_tool_calls: int | None = None

    def _events(self) -> ResponseEvents:
        return ResponseEvents(self.draft, self.max_tool_calls)

    async def complete(self, job: Job, document: dict[str, Any], body: bytes) -> bytes:
        final = whole_answer(self._events(), document)
        if self.store is not None:
            # Stored right after the answer is handed over, off its latency: the task runs at the loop's next
            # turn, before this process reads any later request (a retrieve or the next turn of a chain).
            job.svc.tasks.spawn(self._save_soon(final))
        return encode_json(final)

    async def _save_soon(self, final: dict[str, Any]) -> None:
        self._save(final)

    async def stream(self, job: Job, chat: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        events = self._events()
        for event in events.start():
            yield encode_sse(event)
        decoder = SSEDecoder()
        try:
            async for raw in chat:
                if raw.startswith(b":"):  # the balancer's "queued" notes: comments, which SDKs skip
                    yield raw
                for sse in decoder.feed(raw):
                    if sse.is_error or sse.is_done:
                        for event in self._end(events, (json_object(sse.data) or _CUT) if sse.is_error else None):
                            yield encode_sse(event)
                        return
                    chunk = json_object(sse.data)
                    for event in events.chunk(chunk) if chunk is not None else ():
                        yield encode_sse(event)
            for event in self._end(events, _CUT):
                yield encode_sse(event)
        finally:  # a client that hangs up ends the chat stream now (its slot is settled), not at collection
            close = getattr(chat, "aclose", None)
            if close is not None:
                await close()

    def _end(self, events: ResponseEvents, error: dict[str, Any] | None) -> list[dict[str, Any]]:
        closing = events.finish(error)
        assert events.final is not None
        self._save(events.final)
        return closing

    def _save(self, final: dict[str, Any]) -> None:
        if self.store is None:
            return
        produced = [item for item in final["output"] if item.get("type") in ("message", "function_call")]
        stored = StoredResponse(final, self.turn.items, [*self.turn.history, *produced])
        try:
            self.store.put(self.key_id, stored)
        except sqlite3.Error as exc:  # the answer still goes out; only reading it back will fail
            _log.error("storing a response failed", extra={"response_id": final["id"], "error": str(exc)})
