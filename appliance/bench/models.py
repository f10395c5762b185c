"""``appliance bench models``: does a conversation's prompt cache come back when its model is swapped back in?

One swap host (docs/CONTRACTS.md C2) serves the GGUF under two on_demand catalogue aliases, A and B, from a
real Redis. Each round builds a 6-turn conversation on A (a long system prompt, every turn resending the whole
history), then times the first token of its next turn three ways, each a different last question after the
same history (so no measured prompt is cached whole):

* ``noswap``: A stayed loaded;
* ``swapped``: A was swapped out (B loaded and answered) and back, its saved prompt cache restored;
* ``dropped``: the same swap out and back on a host that keeps no prompt cache across swaps
  (``prompt_cache_disk_bytes = 0``): the turn prefills its whole history.

Reported, medians over ``--rounds``: ``swapped_over_noswap`` (target <= 1.5: the cache came back) and
``dropped_over_noswap`` (target >= 3), each with its own no-swap baseline from the same host, the prompt and
cached tokens of the measured turns, and the swaps' load and restore figures from the host's answers.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.bench import harness

NAME = "models"
A, B = "bench-model-a", "bench-model-b"
TURNS = 6
SUBJECTS = ("lamps", "kettles", "ladders", "hinges", "paint", "rope", "glue", "saws", "nails", "tape")


def _progress(message: str) -> None:
    harness.progress(NAME, message)


def system_prompt(words: int, salt: str) -> str:
    """A deterministic system prompt of roughly ``words`` tokens; ``salt`` makes each round's its own."""
    rules = [f"Rule {i + 1} ({salt}): questions about {SUBJECTS[i % len(SUBJECTS)]} get one short, plain answer."
             for i in range(words // 14)]
    return "You are the hardware store's assistant. Follow the store's rules.\n" + "\n".join(rules)


def _post(url: str, body: Mapping[str, Any], headers: Mapping[str, str], timeout: float) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",  # noqa: S310 - loopback
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()[:300]


def turn(url: str, headers: Mapping[str, str], model: str, messages: list[dict[str, str]],
         max_tokens: int) -> tuple[float, str, dict[str, Any]]:
    """One greedy streamed turn: (seconds to the first token, the answer, its usage)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),  # noqa: S310
                                     method="POST", headers={"Content-Type": "application/json", **headers})
    started, first = time.perf_counter(), 0.0
    parts: list[str] = []
    usage: dict[str, Any] = {}
    with urllib.request.urlopen(request, timeout=600) as response:  # noqa: S310 - loopback
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the worker failed the turn: {chunk['error']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter() - started
                    parts.append(text)
    return first or time.perf_counter() - started, "".join(parts), usage


def swap(url: str, headers: Mapping[str, str], model: str) -> dict[str, Any]:
    status, answer = _post(f"{url}/admin/model", {"model": model}, headers, timeout=600)
    if status != 200 or not isinstance(answer, dict):
        raise RuntimeError(f"the swap host refused to load {model}: {status} {answer!r}")
    return answer


@contextmanager
def swap_host(args: argparse.Namespace, path: Path, redis_url: str, token: str, workdir: Path,
              **extra: str) -> Iterator[str]:
    """A swap host holding A, the catalogue read from ``redis_url``."""
    port = harness.free_port()
    env = harness.service_env("worker", workdir, token, port=port, model_path=path, swap_host="true",
                              initial_model=A, redis_url=redis_url, n_threads=args.threads, speculative="false",
                              prefix_reuse="true", **extra)
    url = f"http://127.0.0.1:{port}"
    with harness.service(harness.python("inference"), env, log=workdir / "worker.log", ready=f"{url}/health",
                         timeout=300):
        yield url


def write_catalogue(redis_url: str, token: str, path: Path, slots: int, n_ctx: int) -> None:
    import asyncio

    from redis.asyncio import Redis

    from appliance.core.gguf_header import kv_shape
    from appliance.core.model_catalogue import CatalogueEntry, put_entry
    from appliance.core.model_files import sha256_file

    digest, kv, size = sha256_file(path), kv_shape(path).bytes_per_token, path.stat().st_size

    async def write() -> None:
        client = Redis.from_url(redis_url)
        try:
            for alias in (A, B):
                await put_entry(client, token, CatalogueEntry(
                    alias=alias, path=str(path), sha256=digest, size_bytes=size, slots=slots,
                    n_ctx=n_ctx, resident="on_demand", kv_bytes_per_token=kv))
        finally:
            await client.aclose()

    asyncio.run(write())


def one_round(url: str, headers: Mapping[str, str], args: argparse.Namespace, salt: str) -> dict[str, Any]:
    """A 6-turn conversation on A; its next turn timed before and after A is swapped out and back."""
    messages = [{"role": "system", "content": system_prompt(args.system_tokens, salt)}]
    for index in range(TURNS):
        messages.append({"role": "user", "content": f"Question {index + 1}: how do I pick good "
                                                    f"{SUBJECTS[index % len(SUBJECTS)]}?"})
        _, answer, _ = turn(url, headers, A, messages, args.max_tokens)
        messages.append({"role": "assistant", "content": answer})

    def next_turn(question: str) -> tuple[float, dict[str, Any]]:
        ttft, _, usage = turn(url, headers, A, [*messages, {"role": "user", "content": question}], 1)
        return ttft, usage

    before, before_usage = next_turn("Question 7: which of those lasts longest?")
    out_answer = swap(url, headers, B)
    turn(url, headers, B, [{"role": "user", "content": "Say hello."}], 4)  # B serves while A is out
    back_answer = swap(url, headers, A)
    after, after_usage = next_turn("Question 7: which of those costs least?")
    return {"noswap_ttft_s": before, "swapped_ttft_s": after,
            "prompt_tokens": int(after_usage.get("prompt_tokens", 0)),
            "noswap_cached_tokens": _cached(before_usage), "swapped_cached_tokens": _cached(after_usage),
            "swap_out_load_s": out_answer.get("load_s"), "swap_back_load_s": back_answer.get("load_s"),
            "restored_tokens": back_answer.get("restored_tokens", 0)}


def _cached(usage: Mapping[str, Any]) -> int:
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def run_host(args: argparse.Namespace, path: Path, redis_url: str, token: str, workdir: Path, *, label: str,
             **extra: str) -> list[dict[str, Any]]:
    rounds = []
    with swap_host(args, path, redis_url, token, workdir, **extra) as url:
        headers = harness.internal_headers(token)
        for index in range(args.rounds):
            _progress(f"{label}: round {index + 1} of {args.rounds}")
            rounds.append(one_round(url, headers, args, f"{label}-{index}-{secrets.token_hex(3)}"))
    return rounds


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(float(r[key] or 0) for r in rounds), 4)


def measure(args: argparse.Namespace, path: Path, workdir: Path) -> dict[str, Any]:
    token = secrets.token_urlsafe(32)
    with harness.redis_process(workdir / "redis", user="admin") as (_, redis_url):
        write_catalogue(redis_url, token, path, args.slots, args.n_ctx)
        kept = run_host(args, path, redis_url, token, workdir / "kept", label="cache kept")
        dropped = run_host(args, path, redis_url, token, workdir / "dropped", label="cache dropped",
                           prompt_cache_disk_bytes="0")
    result: dict[str, Any] = {"model": path.name, "turns": TURNS, "rounds": args.rounds, "threads": args.threads,
                              "slots": args.slots, "n_ctx": args.n_ctx}
    for label, rounds in (("kept", kept), ("dropped", dropped)):
        result[label] = {key: _median(rounds, key) for key in rounds[0]}
    result["swapped_over_noswap"] = round(result["kept"]["swapped_ttft_s"] / max(result["kept"]["noswap_ttft_s"],
                                                                                    1e-9), 3)
    result["dropped_over_noswap"] = round(result["dropped"]["swapped_ttft_s"] / max(
        result["dropped"]["noswap_ttft_s"], 1e-9), 3)
    result["targets"] = {"swapped_over_noswap": "<= 1.5", "dropped_over_noswap": ">= 3"}
    return result


def _parser() -> argparse.ArgumentParser:
    parser = harness.model_parser(NAME, __doc__)
    parser.set_defaults(slots=2, n_ctx=4096)
    parser.add_argument("--rounds", type=int, default=3, help="conversations per host (medians reported)")
    parser.add_argument("--system-tokens", type=int, default=1000, help="about this many tokens of system prompt")
    parser.add_argument("--max-tokens", type=int, default=24, help="answer length of the 6 turns")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.model:
        path = Path(args.model)
    else:
        from appliance.core.model_files import prepare_default_model

        path = prepare_default_model(Path(args.data_dir))
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        result = measure(args, path.resolve(), Path(tmp))
    return harness.emit(result, args.json)
