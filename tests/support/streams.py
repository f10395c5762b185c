"""Streamed chat requests whose every byte is accounted for: when data started, how the stream ended."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Outcome:
    index: int
    started_at: float = field(default_factory=time.monotonic)
    status: int = 0
    first_data_at: float | None = None
    chunks: int = 0
    done: bool = False           # saw ``data: [DONE]``
    error_event: bool = False    # saw ``event: error``
    retry_after: str | None = None
    exception: str = ""
    ended_at: float = 0.0
    events: list[str] = field(default_factory=list)

    @property
    def clean_cut(self) -> bool:
        """Ended the way a cut stream must: an error event and no ``[DONE]``."""
        return self.error_event and not self.done

    @property
    def first_byte_s(self) -> float | None:
        """Seconds from sending the request to its first data event (failover included)."""
        return None if self.first_data_at is None else self.first_data_at - self.started_at


async def stream_chat(client: httpx.AsyncClient, index: int, *, model: str, max_tokens: int,
                      drop_after_chunks: int | None = None, prompt: str | None = None) -> Outcome:
    """One streamed chat; with ``drop_after_chunks`` the client hangs up after that many data events."""
    outcome = Outcome(index)
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt or f"Write a long story about the number {index}."}]}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"Cache-Control": "no-store"}) as response:
            outcome.status = response.status_code
            outcome.retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                await response.aread()
                return outcome
            event = "message"
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    if event == "error":
                        outcome.error_event = True
                    elif data == "[DONE]":
                        outcome.done = True
                    else:
                        outcome.chunks += 1
                        if outcome.first_data_at is None:
                            outcome.first_data_at = time.monotonic()
                    outcome.events.append(event)
                    if drop_after_chunks is not None and outcome.chunks >= drop_after_chunks:
                        return outcome  # leaving the context closes the connection mid-stream
                elif not line:
                    event = "message"
    except (TimeoutError, httpx.HTTPError) as exc:
        outcome.exception = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.ended_at = time.monotonic()
    return outcome
