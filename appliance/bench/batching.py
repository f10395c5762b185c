"""``appliance bench batching``: the worker's continuous batching against a raw llama.cpp batch loop.

In one run, on the same model and threads:

* ``raw_cN``: a direct llama-cpp-python loop decoding N sequences together
  (one ``llama_decode`` per step, greedy sampling per sequence) — the ceiling;
* ``worker_cN``: aggregate generated tokens/s through the worker's HTTP API
  (streamed ``/v1/completions``) with N concurrent clients;
* ``grammar_cN/free_cN``: N json_schema-constrained chat requests against N
  free ones, the median ratio of back-to-back pairs (grammar cost).

It prints both and the ratios ``c8/c1`` (what batching buys) and
``worker_c8/raw_c8`` (what the worker's HTTP and scheduling cost) for the
default (fast) decode mode, and beside them the same figures of a worker in
the deterministic mode (``deterministic.*``: ``[worker] deterministic =
true``, batch-invariant). Both workers run without speculative decoding
(``--speculative`` turns it on), so they decode what the raw loop decodes;
``appliance bench speculative`` measures that. Each worker's ``decode``
object from ``/health`` is printed with its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.bench import harness

PROMPT = "The history of the printing press begins"


def _progress(message: str) -> None:
    harness.progress("batching", message)


def _model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from appliance.core.model_files import prepare_default_model

    return prepare_default_model(Path(args.data_dir))


class RawLoop:
    """The ceiling: llama-cpp-python's batch API with no server around it."""

    def __init__(self, path: Path, threads: int, slots: int, n_ctx: int) -> None:
        import logging

        import llama_cpp as ll

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.ll = ll
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 999 if ll.llama_supports_gpu_offload() else 0
        self.model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        cparams = ll.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = slots * n_ctx, 512, 512
        cparams.n_seq_max, cparams.kv_unified, cparams.no_perf = slots, True, True
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.batch = ll.llama_batch_init(512, 0, 1)
        data = PROMPT.encode()
        buf = (ll.llama_token * 256)()
        count = ll.llama_tokenize(self.vocab, data, len(data), buf, 256, True, False)
        self.prompt = list(buf[:count])

    def _add(self, n: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, int(logits)
        b.seq_id[n][0] = seq

    def rate(self, n_seq: int, tokens: int) -> float:
        ll = self.ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        samplers = []
        for _ in range(n_seq):
            chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            samplers.append(chain)
        start = time.perf_counter()
        n = 0
        for seq in range(n_seq):
            for pos, token in enumerate(self.prompt):
                self._add(n, token, pos, seq, pos == len(self.prompt) - 1)
                n += 1
        self.batch.n_tokens = n
        ll.llama_decode(self.ctx, self.batch)
        index = [(seq + 1) * len(self.prompt) - 1 for seq in range(n_seq)]
        pos = len(self.prompt)
        for _ in range(tokens):
            for seq in range(n_seq):
                token = ll.llama_sampler_sample(samplers[seq], self.ctx, index[seq])
                self._add(seq, token, pos, seq, True)
                index[seq] = seq
            self.batch.n_tokens = n_seq
            ll.llama_decode(self.ctx, self.batch)
            pos += 1
        elapsed = time.perf_counter() - start
        for chain in samplers:
            ll.llama_sampler_free(chain)
        return n_seq * tokens / elapsed

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


@contextmanager
def worker(args: argparse.Namespace, path: Path, **extra: str) -> Iterator[tuple[int, str]]:
    """A real worker on ``path`` (``APPLIANCE_WORKER_<KEY>`` overrides in ``extra``); yields (port, token)."""
    port, token = harness.free_port(), secrets.token_urlsafe(32)
    env = {
        "APPLIANCE_WORKER_PORT": str(port), "APPLIANCE_WORKER_MODEL_PATH": str(path),
        "APPLIANCE_WORKER_SLOTS": str(args.slots), "APPLIANCE_WORKER_N_THREADS": str(args.threads),
        "APPLIANCE_WORKER_N_CTX": str(args.n_ctx), "APPLIANCE_INTERNAL_TOKEN": token,
        "APPLIANCE_DATA_DIR": str(args.data_dir), "APPLIANCE_LOG_LEVEL": "WARNING",
        **{f"APPLIANCE_WORKER_{key.upper()}": value for key, value in extra.items()},
    }
    with harness.service(harness.python("inference"), env, ready=f"http://127.0.0.1:{port}/health", timeout=120):
        yield port, token


async def _one_stream(session: Any, url: str, token: str, alias: str, tokens: int) -> int:
    from appliance.core.sse import SSEDecoder

    body = {"model": alias, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    decoder, completion = SSEDecoder(), 0
    async with session.post(url, json=body, headers=harness.internal_headers(token)) as response:
        response.raise_for_status()
        async for chunk in response.content.iter_any():
            for event in decoder.feed(chunk):
                if event.is_error:
                    raise RuntimeError(event.data)
                if not event.is_done and event.json().get("usage"):
                    completion = int(event.json()["usage"]["completion_tokens"])
    return completion


GRAMMAR_SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
                  "required": ["notes"]}


async def _one_grammar(session: Any, url: str, token: str, alias: str, tokens: int) -> int:
    body = {"model": alias, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0.7, "seed": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "notes", "schema": GRAMMAR_SCHEMA}}}
    async with session.post(url, json=body, headers=harness.internal_headers(token)) as response:
        response.raise_for_status()
        return int((await response.json())["usage"]["completion_tokens"])


async def _grammar_pairs(port: int, token: str, alias: str, level: int, *, tokens: int, pairs: int
                         ) -> list[tuple[float, float]]:
    """(free, grammar) aggregate tokens/s of ``level`` concurrent requests, measured back to back ``pairs`` times.

    On a shared machine the load moves between runs; a ratio of two runs made
    seconds apart, repeated, says more than two rates taken minutes apart.
    """
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    results: list[tuple[float, float]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600)) as session:
        for _ in range(pairs):
            start = time.perf_counter()
            counts = await asyncio.gather(
                *(_one_stream(session, f"{base}/v1/completions", token, alias, tokens) for _ in range(level)))
            free = sum(counts) / (time.perf_counter() - start)
            start = time.perf_counter()
            counts = await asyncio.gather(
                *(_one_grammar(session, f"{base}/v1/chat/completions", token, alias, tokens) for _ in range(level)))
            grammar = sum(counts) / (time.perf_counter() - start)
            _progress(f"worker c{level} free {free:.1f} tok/s, grammar {grammar:.1f} tok/s ({grammar / free:.3f})")
            results.append((free, grammar))
    return results


async def _worker_rates(port: int, token: str, alias: str, levels: list[int], *, tokens: int, rounds: int
                        ) -> dict[int, float]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    rates: dict[int, float] = {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _one_stream(session, url, token, alias, 4)  # warm-up
        for level in levels:
            start = time.perf_counter()
            done = 0
            for _ in range(rounds):
                counts = await asyncio.gather(*(_one_stream(session, url, token, alias, tokens) for _ in range(level)))
                done += sum(counts)
            rates[level] = done / (time.perf_counter() - start)
            _progress(f"worker c{level}: {rates[level]:.1f} tok/s")
    return rates



def _parser() -> argparse.ArgumentParser:
    parser = harness.model_parser("batching", __doc__)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each concurrency")
    parser.add_argument("--levels", default="1,4,8", help="concurrency levels")
    parser.add_argument("--no-grammar", dest="grammar", action="store_false",
                        help="skip the grammar-constrained (json_schema) runs at the highest concurrency")
    parser.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                        help="skip the deterministic-mode worker")
    parser.add_argument("--speculative", action="store_true", help="run the workers with speculative decoding on")
    parser.add_argument("--grammar-pairs", type=int, default=3,
                        help="back-to-back free/grammar run pairs; the ratio reported is their median")
    return parser


def measure(args: argparse.Namespace) -> dict[str, Any]:
    path = _model_path(args)
    levels = [int(level) for level in args.levels.split(",")]
    raw = RawLoop(path, args.threads, args.slots, args.n_ctx)
    raw_rates: dict[int, float] = {}
    try:
        raw.rate(1, 8)  # warm-up
        for level in levels:
            raw_rates[level] = raw.rate(level, args.tokens * args.rounds)
            _progress(f"raw c{level}: {raw_rates[level]:.1f} tok/s")
    finally:
        raw.close()
    speculative = "true" if args.speculative else "false"
    with worker(args, path, deterministic="false", speculative=speculative) as (port, token):
        health = harness.get_json(f"http://127.0.0.1:{port}/health", timeout=5)[1]
        alias, decode = health["model"], health.get("decode")
        worker_rates = asyncio.run(_worker_rates(port, token, alias, levels, tokens=args.tokens, rounds=args.rounds))
        pairs = asyncio.run(_grammar_pairs(port, token, alias, max(levels), tokens=args.tokens,
                                            pairs=args.grammar_pairs)) \
            if args.grammar else []
    exact: dict[str, Any] = {}
    if args.deterministic:
        with worker(args, path, deterministic="true", speculative=speculative) as (port, token):
            exact["decode"] = harness.get_json(f"http://127.0.0.1:{port}/health", timeout=5)[1].get("decode")
            exact_rates = asyncio.run(_worker_rates(port, token, alias, levels, tokens=args.tokens,
                                                    rounds=args.rounds))
        low, high = min(levels), max(levels)
        for level in levels:
            exact[f"worker_c{level}_tok_s"] = round(exact_rates[level], 1)
        exact[f"c{high}/c{low}"] = round(exact_rates[high] / exact_rates[low], 3)
        exact[f"worker_c{high}/raw_c{high}"] = round(exact_rates[high] / raw_rates[high], 3)
        exact[f"worker_c{low}/raw_c{low}"] = round(exact_rates[low] / raw_rates[low], 3)
        exact[f"fast_c{high}/deterministic_c{high}"] = round(worker_rates[high] / exact_rates[high], 3)
    result: dict[str, Any] = {"model": path.name, "threads": args.threads, "tokens_per_request": args.tokens,
                              "decode": decode}
    for level in levels:
        result[f"raw_c{level}_tok_s"] = round(raw_rates[level], 1)
        result[f"worker_c{level}_tok_s"] = round(worker_rates[level], 1)
    low, high = min(levels), max(levels)
    result[f"c{high}/c{low}"] = round(worker_rates[high] / worker_rates[low], 3)
    result[f"raw_c{high}/raw_c{low}"] = round(raw_rates[high] / raw_rates[low], 3)
    result[f"worker_c{high}/raw_c{high}"] = round(worker_rates[high] / raw_rates[high], 3)
    result[f"worker_c{low}/raw_c{low}"] = round(worker_rates[low] / raw_rates[low], 3)
    if pairs:
        ratios = sorted(grammar / free for free, grammar in pairs)
        result[f"worker_c{high}_grammar_tok_s"] = round(statistics.median(g for _, g in pairs), 1)
        result[f"grammar_c{high}/free_c{high}"] = round(statistics.median(ratios), 3)
        result["grammar_pair_ratios"] = [round(r, 3) for r in ratios]
    if exact:
        result["deterministic"] = exact
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = measure(args)
    return harness.emit(result, args.json, _render)


def _render(result: Mapping[str, Any]) -> str:
    lines = [f"model {result['model']}, {result['threads']} threads, {result['tokens_per_request']} tokens per "
             f"request", f"{'concurrency':>12} {'raw tok/s':>10} {'worker tok/s':>13} {'worker/raw':>11}"]
    for key in result:
        if key.startswith("raw_c") and key.endswith("_tok_s"):
            level = key.removeprefix("raw_c").removesuffix("_tok_s")
            raw_rate, worker_rate = result[key], result[f"worker_c{level}_tok_s"]
            lines.append(f"{level:>12} {raw_rate:>10.1f} {worker_rate:>13.1f} {worker_rate / raw_rate:>11.3f}")
    lines += [f"{key} = {value}" for key, value in result.items() if "/" in key or key == "grammar_pair_ratios"]
    lines += [f"deterministic {key} = {value}" for key, value in result.get("deterministic", {}).items()]
    return "\n".join(lines)
