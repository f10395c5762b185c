"""A bounded background chat load: N threads, each with its own official OpenAI client, until stopped."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import openai

__all__ = ["ChatLoad", "ClientThreads"]


class ClientThreads:
    """``clients`` threads, each running :meth:`_run` with its own client from the ``with`` block's start
    until its end (then joined, at most ``join_s`` each)."""

    join_s = 180.0

    def __init__(self, make_client: Callable[[], openai.OpenAI], clients: int) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(make_client(),)) for _ in range(clients)]

    def _run(self, client: openai.OpenAI) -> None:
        raise NotImplementedError

    def __enter__(self) -> ClientThreads:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.join_s)


class ChatLoad(ClientThreads):
    """Clients chatting in a loop until the ``with`` block ends; counts successes, keeps every failure."""

    def __init__(self, make_client: Callable[[], openai.OpenAI], clients: int, **request: Any) -> None:
        self._request = {
            "model": "gemma-3-270m",
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 8,
            **request,
        }
        self._lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        super().__init__(make_client, clients)

    def _run(self, client: openai.OpenAI) -> None:
        with client:
            while not self._stop.is_set():
                try:
                    reply = client.chat.completions.create(**self._request)
                    assert reply.choices[0].finish_reason in {"stop", "length"}
                    with self._lock:
                        self.ok += 1
                except Exception as exc:
                    with self._lock:
                        self.failures.append(repr(exc)[:300])

    def __enter__(self) -> ChatLoad:
        super().__enter__()
        return self
