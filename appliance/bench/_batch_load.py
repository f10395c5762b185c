"""The loads of ``appliance bench batch``, against a gateway: an interactive chat loop, a batch of lines through
the Batch API (``/v1/files`` + ``/v1/batches``) or as chat requests, and the lines themselves."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from appliance.core.sse import SSEDecoder

__all__ = ["ChatLoop", "LineRun", "batch_lines", "run_batch_api", "send_lines"]

SYSTEM = (
    "You are the support desk's triage assistant. For each ticket, answer with one short line: the product "
    "area (billing, accounts, shipping, returns, hardware or software), then the urgency (low, normal, high), "
    "then a summary of at most eight words. Never add anything else. "
) * 3
PRODUCTS = ("invoice", "password", "parcel", "refund", "router", "laptop", "licence", "printer", "order", "app")
PROBLEMS = ("was charged twice", "cannot sign in since Monday", "arrived damaged", "is missing a part",
            "keeps restarting", "shows error 0x80070005", "was never delivered", "stopped syncing")
QUESTIONS = ("How do I reset my password?", "What are your opening hours?", "Can I change my delivery address?",
             "How long does a refund take?", "Which printers do you support?", "Is there a student discount?")


def batch_lines(count: int, model: str, max_tokens: int) -> list[dict[str, Any]]:
    """``count`` Batch API lines sharing one system prompt (the worker prefills it once per key)."""
    lines = []
    for index in range(count):
        product, problem = PRODUCTS[index % len(PRODUCTS)], PROBLEMS[(index // len(PRODUCTS)) % len(PROBLEMS)]
        ticket = f"Ticket {index + 1}: my {product} {problem}. Customer number {1000 + index * 7}."
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ticket}]}
        lines.append({"custom_id": f"ticket-{index + 1}", "method": "POST", "url": "/v1/chat/completions",
                      "body": body})
    return lines


def _bearer(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Cache-Control": "no-store", **extra}


@dataclass(slots=True)
class ChatLoop:
    """One interactive key chatting in a loop: a streamed question, its time to first token, a pause, again."""

    session: aiohttp.ClientSession
    url: str
    key: str
    model: str
    max_tokens: int
    think_s: float
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0

    async def turn(self, index: int) -> None:
        question = QUESTIONS[index % len(QUESTIONS)]
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0, "stream": True,
                "messages": [{"role": "system", "content": "You are a friendly shop assistant. Be brief."},
                             {"role": "user", "content": f"{question} (question {index})"}]}
        started = time.perf_counter()
        first = None
        decoder = SSEDecoder()
        async with self.session.post(f"{self.url}/v1/chat/completions", json=body,
                                     headers=_bearer(self.key)) as response:
            if response.status != 200:
                self.errors += 1
                await response.read()
                return
            async for chunk in response.content.iter_any():
                for event in decoder.feed(chunk):
                    if first is None and not event.is_done and not event.is_error and _has_text(event.json()):
                        first = time.perf_counter() - started
        if first is None:
            self.errors += 1
        else:
            self.ttfts.append(first)

    async def run(self, *, turns: int = 0, until: asyncio.Event | None = None) -> None:
        """``turns`` turns, or (with ``until``) turns until it is set."""
        index = 0
        while (until is not None and not until.is_set()) or (until is None and index < turns):
            await self.turn(index)
            index += 1
            await asyncio.sleep(self.think_s)

    def p50(self) -> float | None:
        return statistics.median(self.ttfts) if self.ttfts else None


def _has_text(data: Any) -> bool:
    return any((choice.get("delta") or {}).get("content") for choice in data.get("choices") or [])


@dataclass(slots=True)
class LineRun:
    """How a batch of lines went: lines answered, their generated tokens, and the wall time it took."""

    done: int = 0
    failed: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0

    def tok_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0


async def send_lines(session: aiohttp.ClientSession, url: str, key: str, lines: list[dict[str, Any]],
                     concurrency: int, *, priority: str) -> LineRun:
    """The lines as chat requests, ``concurrency`` in flight, at ``priority`` (``batch`` lowers the key's)."""
    run = LineRun()
    queue = list(reversed(lines))
    headers = _bearer(key, **({"X-Priority": "batch"} if priority == "batch" else {}))

    async def sender() -> None:
        while queue:
            line = queue.pop()
            async with session.post(f"{url}{line['url']}", json=line["body"], headers=headers) as response:
                raw = await response.read()
            if response.status != 200:
                run.failed += 1
                continue
            run.done += 1
            run.completion_tokens += int(json.loads(raw)["usage"]["completion_tokens"])

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - started
    return run


async def batch_api_available(session: aiohttp.ClientSession, url: str, key: str) -> bool:
    """Whether the gateway serves the Batch API (it answers ``GET /v1/batches`` with a list)."""
    async with session.get(f"{url}/v1/batches", headers=_bearer(key)) as response:
        await response.read()
        return response.status == 200


async def run_batch_api(session: aiohttp.ClientSession, url: str, key: str, lines: list[dict[str, Any]],
                        *, poll_s: float = 0.2, limit_s: float = 1800.0) -> LineRun:
    """Upload the lines, create a batch, poll until it ends, read its output file: its figures."""
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", "".join(json.dumps(line) + "\n" for line in lines).encode(),
                   filename="bench-batch.jsonl", content_type="application/jsonl")
    async with session.post(f"{url}/v1/files", data=form, headers=_bearer(key)) as response:
        uploaded = await _json(response, "upload")
    body = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    started = time.perf_counter()
    async with session.post(f"{url}/v1/batches", json=body, headers=_bearer(key)) as response:
        batch = await _json(response, "create")
    while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
        if time.perf_counter() - started > limit_s:
            raise RuntimeError(f"the batch did not end within {limit_s:g} s: {batch['status']}")
        await asyncio.sleep(poll_s)
        async with session.get(f"{url}/v1/batches/{batch['id']}", headers=_bearer(key)) as response:
            batch = await _json(response, "retrieve")
    run = LineRun(wall_s=time.perf_counter() - started)
    counts = batch.get("request_counts") or {}
    run.done, run.failed = int(counts.get("completed", 0)), int(counts.get("failed", 0))
    if batch.get("output_file_id"):
        async with session.get(f"{url}/v1/files/{batch['output_file_id']}/content",
                               headers=_bearer(key)) as response:
            text = (await response.read()).decode()
        for row in text.splitlines():
            answer = (json.loads(row).get("response") or {}).get("body") or {}
            run.completion_tokens += int((answer.get("usage") or {}).get("completion_tokens", 0))
    return run


async def _json(response: aiohttp.ClientResponse, what: str) -> dict[str, Any]:
    raw = await response.read()
    if response.status != 200:
        raise RuntimeError(f"batch API {what}: {response.status} {raw[:300]!r}")
    return dict(json.loads(raw))
