"""``appliance bench prefix``: prompt-prefix reuse in the worker, off against on, in one run.

Chat clients resend the whole conversation every turn. Each phase runs the
same load against a real worker on the same model, once with
``prefix_reuse=false`` and once with it on:

* **conversations**: C concurrent conversations x T turns, one ~600-token
  system prompt, streamed chat completions, each turn resending the whole
  history (what chat UIs do). Reported: p50 time to first token of turn 1
  and of later turns, ``ttft_later_over_turn1`` (reuse on),
  ``reuse_speedup`` (p50 TTFT of later turns, off / on) and
  ``workload_speedup`` (wall time of the whole load, off / on);
* **burst**: C new conversations sharing one system prompt the worker has
  not seen, arriving together: prompt tokens prefilled (the worker's
  ``appliance_worker_prompt_tokens_prefilled`` counter) over one prompt's
  tokens (``burst_prefilled_over_one_prompt``, 1.0 = the shared part
  prefilled once).

``prefilled_per_later_turn``: prompt tokens a later turn prefilled (its
prompt minus ``cached_tokens``), on average, with reuse on; beside it
``new_message_tokens_per_later_turn``, what each later turn added after the
last answer (the new user message and its template). The answers' cells stay
with their slot, so the two are close.

With ``--balancer``, the conversation load also runs through a balancer in
front of 3 workers (reuse on), with ``APPLIANCE_BALANCER_ROUTING=prefix``
against ``least_connections``: ``prefix_hit_ratio`` (reused / prompt tokens
from the workers' counters), generated tok/s, and requests per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.bench import harness

NAME = "prefix"
TOPICS = (
    "tides",
    "volcanoes",
    "bread",
    "bridges",
    "owls",
    "glaciers",
    "comets",
    "bees",
    "rivers",
    "clocks",
    "deserts",
    "maps",
)


def _progress(message: str) -> None:
    harness.progress(NAME, message)


def system_prompt(words: int, salt: str) -> str:
    """A deterministic system prompt of roughly ``words`` tokens (numbered house rules)."""
    rules = []
    for i in range(words // 12):
        topic = TOPICS[i % len(TOPICS)]
        rules.append(f"Rule {i + 1} ({salt}): when asked about {topic}, answer briefly and plainly.")
    return "You are the appliance's helpful assistant. Follow the house rules.\n" + "\n".join(rules)


@dataclass
class LoadResult:
    ttft_turn1: list[float] = field(default_factory=list)
    ttft_later: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_later: list[int] = field(default_factory=list)  # prompt tokens prefilled by each later turn
    new_later: list[int] = field(default_factory=list)  # prompt tokens each later turn added after the last answer
    wall_s: float = 0.0


async def _turn(
    session: Any, url: str, headers: Mapping[str, str], alias: str, messages: list[dict[str, str]], *, max_tokens: int
) -> tuple[float, str, dict[str, Any]]:
    """One streamed chat turn: (time to first token, answer text, usage)."""
    from appliance.core.sse import SSEDecoder

    body = {
        "model": alias,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    decoder, parts, usage = SSEDecoder(), [], {}
    start, first = time.perf_counter(), 0.0
    async with session.post(url, json=body, headers=dict(headers)) as response:
        response.raise_for_status()
        async for chunk in response.content.iter_any():
            for event in decoder.feed(chunk):
                if event.is_error:
                    raise RuntimeError(event.data)
                if event.is_done:
                    continue
                data = event.json()
                if data.get("usage"):
                    usage = data["usage"]
                for choice in data.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        first = first or time.perf_counter() - start
                        parts.append(text)
    return first or time.perf_counter() - start, "".join(parts), usage


async def conversations(
    base: str, headers: Mapping[str, str], alias: str, *, count: int, turns: int, system: str, max_tokens: int
) -> LoadResult:
    """``count`` concurrent conversations of ``turns`` turns each, whole history resent every turn."""
    import aiohttp

    result = LoadResult()
    url = f"{base}/v1/chat/completions"

    async def one(index: int, session: Any) -> None:
        messages = [{"role": "system", "content": system}]
        last_prompt = last_answer = 0
        for turn in range(turns):
            topic = TOPICS[(index + turn) % len(TOPICS)]
            messages.append(
                {
                    "role": "user",
                    "content": f"Conversation {index}, question {turn + 1}: tell me one fact about {topic}.",
                }
            )
            ttft, text, usage = await _turn(session, url, headers, alias, messages, max_tokens=max_tokens)
            (result.ttft_turn1 if turn == 0 else result.ttft_later).append(ttft)
            result.completion_tokens += int(usage.get("completion_tokens", 0))
            result.prompt_tokens += int(usage.get("prompt_tokens", 0))
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
            result.cached_tokens += cached
            prompt = int(usage.get("prompt_tokens", 0))
            if turn:
                result.prefilled_later.append(prompt - cached)
                result.new_later.append(prompt - last_prompt - last_answer)
            last_prompt, last_answer = prompt, int(usage.get("completion_tokens", 0))
            messages.append({"role": "assistant", "content": text})

    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(i, session) for i in range(count)))
    result.wall_s = time.perf_counter() - start
    return result


async def burst(base: str, headers: Mapping[str, str], alias: str, *, count: int, system: str) -> list[int]:
    """``count`` new conversations with one shared system prompt, sent together; their prompt token counts."""
    import aiohttp

    url = f"{base}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600)) as session:

        async def one(index: int) -> int:
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Newcomer {index}: what is rule {index + 1} about?"},
            ]
            _, _, usage = await _turn(session, url, headers, alias, messages, max_tokens=4)
            return int(usage.get("prompt_tokens", 0))

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def counters(url: str, headers: Mapping[str, str]) -> dict[str, float]:
    """The worker's prompt counters from its /metrics (summed over labels)."""
    import urllib.request

    wanted = {
        "appliance_worker_prompt_tokens_total": "prompt",
        "appliance_worker_prompt_tokens_prefilled_total": "prefilled",
        "appliance_worker_prompt_tokens_reused_total": "reused",
        "appliance_worker_requests_total": "requests",
    }
    found = dict.fromkeys(wanted.values(), 0.0)
    request = urllib.request.Request(f"{url}/metrics", headers=dict(headers))  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted and not line.startswith("#"):
            if name == "appliance_worker_requests_total" and "/v1/chat/completions" not in line:
                continue
            found[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return found


@contextmanager
def worker(args: argparse.Namespace, path: Path, token: str, log: Path | None = None, **extra: str) -> Iterator[str]:
    port = harness.free_port()
    env = {
        "APPLIANCE_WORKER_PORT": str(port),
        "APPLIANCE_WORKER_MODEL_PATH": str(path),
        "APPLIANCE_WORKER_SLOTS": str(args.slots),
        "APPLIANCE_WORKER_N_THREADS": str(args.threads),
        "APPLIANCE_WORKER_N_CTX": str(args.n_ctx),
        "APPLIANCE_INTERNAL_TOKEN": token,
        "APPLIANCE_DATA_DIR": str(args.data_dir),
        "APPLIANCE_LOG_LEVEL": "WARNING",
        **{f"APPLIANCE_WORKER_{key.upper()}": value for key, value in extra.items()},
    }
    url = f"http://127.0.0.1:{port}"
    with harness.service(harness.python("inference"), env, log=log, ready=f"{url}/health", timeout=180):
        yield url


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from appliance.core.model_files import prepare_default_model

    return prepare_default_model(Path(args.data_dir))


def single_worker(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    token = secrets.token_urlsafe(32)
    headers = harness.internal_headers(token)
    out: dict[str, Any] = {}
    system = system_prompt(args.system_tokens, "house")
    for mode in ("off", "on"):
        with worker(args, path, token, prefix_reuse="true" if mode == "on" else "false") as url:
            alias = harness.get_json(f"{url}/health", timeout=5)[1]["model"]
            _progress(f"reuse {mode}: {args.conversations} conversations x {args.turns} turns")
            load = asyncio.run(
                conversations(
                    url,
                    headers,
                    alias,
                    count=args.conversations,
                    turns=args.turns,
                    system=system,
                    max_tokens=args.max_tokens,
                )
            )
            before = counters(url, headers)
            prompts = asyncio.run(
                burst(url, headers, alias, count=args.conversations, system=system_prompt(args.system_tokens, "burst"))
            )
            after = counters(url, headers)
        prefilled = after["prefilled"] - before["prefilled"]
        out[mode] = {
            "ttft_turn1_p50_s": round(_p50(load.ttft_turn1), 3),
            "ttft_later_p50_s": round(_p50(load.ttft_later), 3),
            "wall_s": round(load.wall_s, 2),
            "generated_tok_s": round(load.completion_tokens / load.wall_s, 2),
            "prompt_tokens": load.prompt_tokens,
            "cached_tokens": load.cached_tokens,
            "prefilled_per_later_turn": round(statistics.mean(load.prefilled_later), 1) if load.prefilled_later
            else 0.0,
            "prefilled_later_turn_max": max(load.prefilled_later, default=0),
            "new_message_tokens_per_later_turn": round(statistics.mean(load.new_later), 1) if load.new_later
            else 0.0,
            "burst_prompt_tokens_each": max(prompts),
            "burst_prefilled": int(prefilled),
            "burst_prefilled_over_one_prompt": round(prefilled / max(1, *prompts), 3),
        }
        _progress(f"reuse {mode}: {out[mode]}")
    on, off = out["on"], out["off"]
    out["ttft_later_over_turn1"] = round(on["ttft_later_p50_s"] / max(on["ttft_turn1_p50_s"], 1e-9), 3)
    out["ttft_later_over_turn1_without_reuse"] = round(off["ttft_later_p50_s"] / max(off["ttft_turn1_p50_s"], 1e-9), 3)
    out["reuse_speedup"] = round(off["ttft_later_p50_s"] / max(on["ttft_later_p50_s"], 1e-9), 2)
    out["workload_speedup"] = round(off["wall_s"] / max(on["wall_s"], 1e-9), 2)
    out["burst_prefilled_over_one_prompt"] = on["burst_prefilled_over_one_prompt"]
    out["prefilled_per_later_turn"] = on["prefilled_per_later_turn"]
    out["new_message_tokens_per_later_turn"] = on["new_message_tokens_per_later_turn"]
    return out


@contextmanager
def balanced(
    args: argparse.Namespace, path: Path, token: str, routing: str, workdir: Path
) -> Iterator[tuple[str, list[str]]]:
    with ExitStack() as stack:
        # The workers share this machine's cores: each gets its share, not all of them (no oversubscription).
        threads = str(max(1, args.threads // args.balancer_workers))
        urls = [
            stack.enter_context(
                worker(args, path, token, log=workdir / f"worker-{routing}-{i}.log", n_threads=threads)
            )
            for i in range(args.balancer_workers)
        ]
        port = harness.free_port()
        env = {
            "APPLIANCE_BALANCER_PORT": str(port),
            "APPLIANCE_BALANCER_WORKERS": ",".join(urls),
            "APPLIANCE_BALANCER_ROUTING": routing,
            # Throughput, not admission: a request that waits for a slot waits (the default 30 s would
            # turn a slow turn on a loaded machine into an error and end the run).
            "APPLIANCE_BALANCER_QUEUE_TIMEOUT_S": "600",
            "APPLIANCE_INTERNAL_TOKEN": token,
            "APPLIANCE_DATA_DIR": str(args.data_dir),
            "APPLIANCE_LOG_LEVEL": "WARNING",
        }
        base = f"http://127.0.0.1:{port}"
        stack.enter_context(
            harness.service(
                harness.python("balancer"),
                env,
                log=workdir / f"balancer-{routing}.log",
                ready=f"{base}/health",
                timeout=60,
            )
        )
        yield base, urls


def through_balancer(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    import tempfile

    token = secrets.token_urlsafe(32)
    headers = harness.internal_headers(token)
    out: dict[str, Any] = {}
    system = system_prompt(args.system_tokens, "house")
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        for routing in ("least_connections", "prefix"):
            with balanced(args, path, token, routing, Path(tmp)) as (base, urls):
                alias = harness.get_json(f"{urls[0]}/health", timeout=5)[1]["model"]
                _progress(f"balancer routing={routing}: {args.balancer_conversations} conversations")
                load = asyncio.run(
                    conversations(
                        base,
                        headers,
                        alias,
                        count=args.balancer_conversations,
                        turns=args.turns,
                        system=system,
                        max_tokens=args.max_tokens,
                    )
                )
                seen = [counters(url, headers) for url in urls]
            requests = [int(item["requests"]) for item in seen]
            prompt = sum(item["prompt"] for item in seen)
            out[routing] = {
                "generated_tok_s": round(load.completion_tokens / load.wall_s, 2),
                "wall_s": round(load.wall_s, 2),
                "prefix_hit_ratio": round(sum(item["reused"] for item in seen) / max(prompt, 1), 3),
                "requests_per_worker": requests,
                "max_over_min_requests": round(max(requests) / max(min(requests), 1), 2),
                "ttft_later_p50_s": round(_p50(load.ttft_later), 3),
            }
            _progress(f"balancer routing={routing}: {out[routing]}")
    out["prefix_hit_ratio"] = out["prefix"]["prefix_hit_ratio"]
    out["tok_s_prefix_over_least_connections"] = round(
        out["prefix"]["generated_tok_s"] / max(out["least_connections"]["generated_tok_s"], 1e-9), 3
    )
    out["max_over_min_requests"] = out["prefix"]["max_over_min_requests"]
    return out


def _parser() -> argparse.ArgumentParser:
    parser = harness.model_parser(NAME, __doc__)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16, help="answer tokens per turn")
    parser.add_argument("--system-tokens", type=int, default=600, help="rough size of the system prompt")
    parser.add_argument("--balancer", action="store_true", help="also run the 3-worker balancer phase")
    parser.add_argument("--balancer-only", action="store_true", help="only the balancer phase (implies --balancer)")
    parser.add_argument("--balancer-workers", type=int, default=3)
    parser.add_argument("--balancer-conversations", type=int, default=24)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = _model_path(args)
    result: dict[str, Any] = {
        "model": path.name,
        "threads": args.threads,
        "conversations": args.conversations,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
    }
    if not args.balancer_only:
        result["worker"] = single_worker(args, path)
        for key in ("ttft_later_over_turn1", "reuse_speedup", "workload_speedup", "burst_prefilled_over_one_prompt",
                    "prefilled_per_later_turn", "new_message_tokens_per_later_turn"):
            result[key] = result["worker"][key]
    if args.balancer or args.balancer_only:
        result["balancer"] = through_balancer(args, path)
    return harness.emit(result, args.json)
