"""``appliance bench speculative``: prompt-lookup speculative decoding in the worker, off against on, in one run.

Two real workers on the same model run side by side, one with
``speculative=true`` and one with it off, and every measurement alternates
between them (A, B, A, B), so a shared machine's load moves both alike:

* ``rag``: single stream, a document in the prompt and an answer that quotes
  it (what retrieval answers, code edits and JSON extraction do): generated
  tok/s with speculation over without (``rag_speedup``);
* ``free``: single stream, free chat whose answer quotes nothing, sampled
  as chat UIs do (temperature 0.8, a fixed seed) (``free_ratio``: it must
  not lose);
* ``c8``: eight concurrent streams, half of each kind, aggregate tok/s
  (``c8_ratio``);
* in the deterministic mode (``[worker] deterministic``), the same prompts
  with speculation on and off: ``deterministic_identical`` says whether every
  text was the same, and the acceptance each workload saw is printed from the
  worker's ``appliance_worker_draft_*`` counters.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from appliance.bench import harness
from appliance.bench.batching import worker

NAME = "speculative"

DOCUMENT = (
    "Maintenance notice for building C. The pump room is on level two, behind the blue door next to the "
    "freight lift. Staff must sign the logbook before entering and wear ear protection at all times. "
    "The backup generator is tested every first Monday of the month between seven and nine in the morning; "
    "during the test the lifts in the east wing are out of service. Report leaks to the facilities desk on "
    "extension 4410, and never switch off the main valve without a supervisor present."
)
RAG_QUESTIONS = (
    "Repeat this text exactly:",
    "Copy this notice word for word:",
)
FREE_QUESTIONS = (
    "Write a short poem about the sea at night.",
    "Tell me a story about a fox who learns to sing.",
)


def _progress(message: str) -> None:
    harness.progress(NAME, message)


def _messages(kind: str, index: int) -> list[dict[str, str]]:
    """Conversation ``index`` of a workload (each its own prompt: no two share their cells)."""
    if kind == "rag":  # the bundled 270M model quotes a document when asked to repeat it
        question = RAG_QUESTIONS[index % len(RAG_QUESTIONS)]
        return [{"role": "user", "content": f"{question}\n\nNotice {index + 1}. {DOCUMENT}"}]
    return [{"role": "user", "content": f"{FREE_QUESTIONS[index % len(FREE_QUESTIONS)]} Call it number {index + 1}."}]


async def _one(session: Any, url: str, token: str, alias: str, messages: list[dict[str, str]], *, tokens: int
               ) -> tuple[str, int]:
    # Greedy quoting; free chat sampled (at temperature 0 the bundled model soon repeats itself, which drafts
    # predict). The seed keeps each side's text comparable.
    # Free chat runs to max_tokens (ignore_eos): the two sides' samples differ in the fast mode, and an answer
    # that ends early would be a shorter run, not a slower one.
    quoting = messages[0]["content"].startswith(RAG_QUESTIONS)
    body = {"model": alias, "messages": messages, "max_tokens": tokens, "temperature": 0 if quoting else 0.8,
            "seed": 7, "ignore_eos": not quoting}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=harness.internal_headers(token)) as r:
        r.raise_for_status()
        data = await r.json()
    return data["choices"][0]["message"]["content"] or "", int(data["usage"]["completion_tokens"])


async def _rate(url: str, token: str, alias: str, kinds: list[str], *, tokens: int, rounds: int
                ) -> tuple[float, list[str]]:
    """Aggregate generated tok/s of ``len(kinds)`` concurrent conversations, ``rounds`` requests each."""
    import aiohttp

    texts: list[str] = []
    done = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600)) as session:
        start = time.perf_counter()
        for _ in range(rounds):
            results = await asyncio.gather(*(_one(session, url, token, alias, _messages(kind, i), tokens=tokens)
                                             for i, kind in enumerate(kinds)))
            texts += [text for text, _ in results]
            done += sum(count for _, count in results)
        return done / (time.perf_counter() - start), texts


def _drafts(url: str, token: str) -> tuple[float, float]:
    """The worker's (drafted, accepted) draft-token counters."""
    import urllib.request

    request = urllib.request.Request(f"{url}/metrics", headers=harness.internal_headers(token))  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    found = {"appliance_worker_draft_tokens_total": 0.0, "appliance_worker_draft_accepted_tokens_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in found:
            found[name] += float(line.rsplit(" ", 1)[1])
    return found["appliance_worker_draft_tokens_total"], found["appliance_worker_draft_accepted_tokens_total"]


def _side_by_side(args: argparse.Namespace, path: Path, *, deterministic: bool) -> dict[str, Any]:
    mode = "deterministic" if deterministic else "fast"
    workloads = {"rag": ["rag"], "free": ["free"], "c8": ["rag", "free"] * (args.concurrency // 2)}
    rates: dict[str, dict[str, list[float]]] = {name: {"on": [], "off": []} for name in workloads}
    texts: dict[str, dict[str, list[str]]] = {name: {"on": [], "off": []} for name in workloads}
    accepted: dict[str, tuple[float, float]] = {}
    with ExitStack() as stack:
        urls = {}
        for side in ("on", "off"):
            port, token = stack.enter_context(worker(args, path, speculative="true" if side == "on" else "false",
                                                     deterministic="true" if deterministic else "false"))
            urls[side] = (f"http://127.0.0.1:{port}", token)
        alias = harness.get_json(f"{urls['on'][0]}/health", timeout=5)[1]["model"]
        for name, kinds in workloads.items():
            before = _drafts(*urls["on"])
            for repeat in range(args.repeats):
                for side in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                    url, token = urls[side]
                    rate, got = asyncio.run(_rate(url, token, alias, kinds, tokens=args.tokens, rounds=1))
                    rates[name][side].append(rate)
                    texts[name][side] += got
            after = _drafts(*urls["on"])
            accepted[name] = (after[0] - before[0], after[1] - before[1])
            _progress(f"{mode} {name}: on {rates[name]['on']} off {rates[name]['off']} tok/s, "
                      f"drafted/accepted {accepted[name]}")
    out: dict[str, Any] = {}
    for name in workloads:
        on, off = statistics.median(rates[name]["on"]), statistics.median(rates[name]["off"])
        drafted, took = accepted[name]
        out[name] = {"on_tok_s": round(on, 1), "off_tok_s": round(off, 1), "ratio": round(on / off, 3),
                     "drafted": int(drafted), "accepted": int(took),
                     "acceptance": round(took / drafted, 3) if drafted else None}
    out["identical_text"] = all(texts[name]["on"] == texts[name]["off"] for name in workloads)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = harness.model_parser(NAME, __doc__)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96, help="answer tokens per request")
    parser.add_argument("--repeats", type=int, default=2, help="alternating on/off runs per workload (median)")
    parser.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                        help="skip the deterministic-mode identical-text check")
    return parser


def _model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from appliance.core.model_files import prepare_default_model

    return prepare_default_model(Path(args.data_dir))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = _model_path(args)
    result: dict[str, Any] = {"model": path.name, "threads": args.threads, "tokens_per_request": args.tokens}
    fast = _side_by_side(args, path, deterministic=False)
    result["fast"] = fast
    result["rag_speedup"] = fast["rag"]["ratio"]
    result["free_ratio"] = fast["free"]["ratio"]
    result[f"c{args.concurrency}_ratio"] = fast["c8"]["ratio"]
    if args.deterministic:
        exact = _side_by_side(args, path, deterministic=True)
        result["deterministic"] = exact
        result["deterministic_identical"] = exact["identical_text"]
        result["deterministic_rag_speedup"] = exact["rag"]["ratio"]
    return harness.emit(result, args.json, _render)


def _render(result: Mapping[str, Any]) -> str:
    lines = [f"model {result['model']}, {result['threads']} threads, {result['tokens_per_request']} tokens"]
    for mode in ("fast", "deterministic"):
        if mode not in result:
            continue
        for name, row in result[mode].items():
            if isinstance(row, dict):
                lines.append(f"{mode:>13} {name:>5}: on {row['on_tok_s']:>7.1f} off {row['off_tok_s']:>7.1f} tok/s "
                             f"ratio {row['ratio']:.3f}, accepted {row['accepted']}/{row['drafted']}")
    lines += [f"{key} = {value}" for key, value in result.items() if key.endswith(("speedup", "ratio", "identical"))]
    return "\n".join(lines)
