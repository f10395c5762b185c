"""``appliance bench choices [--json]``: one request with n=4 against 4 concurrent and 4 sequential n=1 requests,
on one real worker, with prefix reuse on and off, side by side in one run.

Each mode sends the same ~600-token prompt (``/v1/completions``: no template stop strings, so ``ignore_eos``
makes every answer exactly ``max_tokens`` long) under a key id of its own (no prefix left by another mode),
and reads the worker's own prefill counter (``prompt_tokens_prefilled``); each mode runs ``--rounds`` times,
alternating, and the fastest wall time is kept. The load average is reported beside the figures.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from appliance.bench import harness
from appliance.core.hop import KEY_ID_HEADER
from appliance.core.model_files import prepare_default_model

__all__ = ["main"]

SYSTEM = "You are the hardware store's assistant. Be brief, friendly and precise about tools. " * 36


def _prefilled(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("appliance_worker_prompt_tokens_prefilled_total"))


async def _mode(url: str, headers: dict[str, str], model: str, mode: str, *, n: int, max_tokens: int
                ) -> dict[str, Any]:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 1.0, "seed": 1, "ignore_eos": True,
            "prompt": SYSTEM + "\nCustomer: Which saw for oak?\nAssistant:"}
    scoped = {**headers, KEY_ID_HEADER: f"key_bench{mode}{secrets.token_hex(4)}"}  # a key id as the gateway makes
    async with httpx.AsyncClient(base_url=url, headers=scoped, timeout=600) as client:

        async def one(extra: dict[str, Any]) -> dict[str, Any]:
            reply = await client.post("/v1/completions", json={**body, **extra})
            reply.raise_for_status()
            return dict(reply.json())

        before = _prefilled(url)
        started = time.perf_counter()
        if mode == "n":
            replies = [await one({"n": n})]
        elif mode == "concurrent":
            replies = list(await asyncio.gather(*(one({"seed": i}) for i in range(n))))
        else:
            replies = [await one({"seed": i}) for i in range(n)]
        wall = time.perf_counter() - started
    return {"wall_s": round(wall, 3), "prompt_tokens_prefilled": _prefilled(url) - before,
            "choices": sum(len(r["choices"]) for r in replies),
            "usage_prompt_tokens": sum(r["usage"]["prompt_tokens"] for r in replies),
            "completion_tokens": sum(r["usage"]["completion_tokens"] for r in replies)}


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser("choices", __doc__)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="each mode this often, alternating; best wall kept")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("APPLIANCE_DATA_DIR", "data")))
    args = parser.parse_args(argv)
    model_path = prepare_default_model(args.data_dir)
    token = secrets.token_urlsafe(32)
    headers = harness.internal_headers(token)
    result: dict[str, Any] = {"n": args.n, "max_tokens": args.max_tokens, "slots": args.slots}
    with tempfile.TemporaryDirectory() as tmp:
        for reuse in ("true", "false"):
            port = harness.free_port()
            url = f"http://127.0.0.1:{port}"
            env = harness.service_env("worker", Path(tmp) / reuse, token, port=port, model_path=model_path,
                                      slots=args.slots, n_ctx=2048, prefix_reuse=reuse)
            with harness.service(harness.python("inference"), env, ready=f"{url}/health", timeout=180):
                model = harness.get_json(f"{url}/health", timeout=5)[1]["model"]
                harness.progress("choices", f"prefix reuse {reuse}: {args.rounds} rounds of n, concurrent, sequential")
                asyncio.run(_mode(url, headers, model, "sequential", n=1, max_tokens=4))  # warm-up
                runs: dict[str, list[dict[str, Any]]] = {"n": [], "concurrent": [], "sequential": []}
                for _ in range(args.rounds):
                    for mode, found in runs.items():
                        run = _mode(url, headers, model, mode, n=args.n, max_tokens=args.max_tokens)
                        found.append(asyncio.run(run))
                result[f"reuse_{reuse}"] = {mode: min(found, key=lambda r: r["wall_s"]) | {
                    "wall_s_all": [r["wall_s"] for r in found]} for mode, found in runs.items()}
    result["loadavg_1m_after"] = os.getloadavg()[0]
    return harness.emit(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
