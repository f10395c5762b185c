"""``appliance bench batch``: a batch running on idle capacity beside a person chatting, in one run.

One real worker (``--slots``, the bundled model unless ``--model``), a balancer and a gateway (its response
cache off) over a throwaway Redis; one interactive key and one key whose lines run at batch priority:

* **A**, alone: the interactive key chats in a loop (streamed, ``--think-s`` between turns); its time to
  first token, p50;
* **B**, beside a batch: the same loop while ``--lines`` lines sharing a system prompt (``--max-tokens``
  each) run as one batch through the Batch API (``/v1/files`` + ``/v1/batches``; on a gateway without it,
  as chat requests lowered to batch priority, ``--concurrency`` in flight); the loop's TTFT p50 and the
  batch's generated tokens/s (from its creation to its end);
* **C**, the idle stack: the same lines as concurrent chat requests (``--concurrency`` in flight) of the
  interactive key; generated tokens/s.

Reported: ``interactive_slowdown`` = TTFT p50 B / A (target <= 1.3) and ``batch_efficiency`` = batch tok/s
B / C (target >= 0.8), with the worker's lane counters over B (``appliance_worker_preemptions_total``...),
its lane settings (``--batch-lane-busy``, ``--batch-lane-grace-s``; unset: the worker's defaults) and the
host's load average, since every process shares the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.bench import harness

__all__ = ["main"]

NAME = "batch"
_LANE_METRICS = re.compile(
    r"^appliance_worker_(preemptions|resumptions|recomputed_tokens|priority_tokens)_total(\{[^}]*\})? (\S+)$",
    re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Stack:
    gateway: str
    worker: str
    token: str
    model: str
    chat_key: str
    batch_key: str


def _progress(message: str) -> None:
    harness.progress(NAME, message)


def _model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from appliance.core.model_files import prepare_default_model

    return prepare_default_model(Path(args.data_dir))


def _admin_post(url: str, admin: str, body: dict[str, Any]) -> dict[str, Any]:
    import json

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",  # noqa: S310
                                     headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 - loopback
        return dict(json.loads(reply.read()))


@contextmanager
def _stack(tmp: Path, args: argparse.Namespace) -> Iterator[Stack]:
    token = secrets.token_urlsafe(32)
    wport, bport, gport = harness.free_port(), harness.free_port(), harness.free_port()
    worker, balancer, gateway = (f"http://127.0.0.1:{port}" for port in (wport, bport, gport))
    lanes = {name: value for name, value in (("batch_lane_busy", args.batch_lane_busy),
                                              ("batch_lane_grace_s", args.batch_lane_grace_s)) if value is not None}
    worker_env = harness.service_env("worker", tmp / "worker", token, port=wport, model_path=_model_path(args),
                                     slots=args.slots, n_ctx=args.n_ctx, n_threads=args.threads, **lanes)
    balancer_env = harness.service_env("balancer", tmp / "balancer", token, port=bport, workers=[worker],
                                       queue_timeout_s=600, first_byte_timeout_s=600)
    with ExitStack() as stack:
        redis_url = stack.enter_context(harness.redis_server(tmp / "redis"))
        gateway_env = harness.service_env("gateway", tmp / "gateway", token, port=gport, redis_url=redis_url,
                                          balancer_url=balancer, rag_url="http://127.0.0.1:9", cache_enabled="false",
                                          default_rpm=0, batch_concurrency=args.concurrency, batch_poll_s=0.2)
        stack.enter_context(harness.service(harness.python("inference"), worker_env, ready=f"{worker}/health",
                                            log=tmp / "worker.log", timeout=300))
        stack.enter_context(harness.service(harness.python("balancer"), balancer_env, ready=f"{balancer}/health",
                                            log=tmp / "balancer.log"))
        stack.enter_context(harness.service(harness.python("gateway"), gateway_env, ready=f"{gateway}/healthz",
                                            log=tmp / "gateway.log"))
        admin = (tmp / "gateway" / "admin_key").read_text().strip()
        keys = [_admin_post(f"{gateway}/admin/keys", admin, {"name": name, "scopes": ["chat"], "priority": priority,
                                                             "limits": {"rpm": 0}})["key"]
                for name, priority in (("chatter", "interactive"), ("bulk", "batch"))]
        model = harness.get_json(f"{worker}/health", timeout=5)[1]["model"]
        yield Stack(gateway, worker, token, model, keys[0], keys[1])


def _lane_counters(stack: Stack) -> dict[str, float]:
    request = urllib.request.Request(f"{stack.worker}/metrics",  # noqa: S310 - loopback
                                     headers=harness.internal_headers(stack.token))
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - loopback
        text = reply.read().decode()
    counters: dict[str, float] = {}
    for name, labels, value in _LANE_METRICS.findall(text):
        wanted = ",".join(part for part in (labels or "").strip("{}").split(",") if not part.startswith("model="))
        counters[f"{name}{{{wanted}}}" if wanted else name] = float(value)
    return counters


async def _measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from appliance.bench._batch_load import ChatLoop, batch_api_available, batch_lines, run_batch_api, send_lines

    lines = batch_lines(args.lines, stack.model, args.max_tokens)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        def loop() -> ChatLoop:
            return ChatLoop(session, stack.gateway, stack.chat_key, stack.model, args.chat_tokens, args.think_s)

        await loop().run(turns=3)  # warm-up: the worker's first calls, the gateway's model view
        _progress(f"A: the interactive key alone, {args.turns} turns")
        alone = loop()
        await alone.run(turns=args.turns)
        api = await batch_api_available(session, stack.gateway, stack.batch_key)
        _progress(f"B: the same loop beside a {args.lines}-line batch "
                  f"({'Batch API' if api else 'chat requests at batch priority'})")
        before = _lane_counters(stack)
        beside, done = loop(), asyncio.Event()
        chatting = asyncio.create_task(beside.run(until=done))
        try:
            if api:
                batch = await run_batch_api(session, stack.gateway, stack.batch_key, lines)
            else:
                batch = await send_lines(session, stack.gateway, stack.batch_key, lines, args.concurrency,
                                         priority="batch")
        finally:
            done.set()
            await chatting
        after = _lane_counters(stack)
        _progress(f"C: the {args.lines} lines as concurrent chat requests on the idle stack")
        idle = await send_lines(session, stack.gateway, stack.chat_key, lines, args.concurrency,
                                priority="interactive")
    a, b = alone.p50(), beside.p50()
    return {
        "interactive_ttft_p50_s": {"alone": _round(a), "beside_batch": _round(b)},
        "interactive_turns": {"alone": len(alone.ttfts), "beside_batch": len(beside.ttfts),
                              "errors": alone.errors + beside.errors},
        "interactive_slowdown": _round(b / a) if a and b else None,
        "batch": {"via": "batch_api" if api else "chat_requests_at_batch_priority", "lines": args.lines,
                  "done": batch.done, "failed": batch.failed, "completion_tokens": batch.completion_tokens,
                  "wall_s": _round(batch.wall_s), "tok_s": _round(batch.tok_s())},
        "concurrent_chat": {"done": idle.done, "failed": idle.failed, "completion_tokens": idle.completion_tokens,
                            "wall_s": _round(idle.wall_s), "tok_s": _round(idle.tok_s())},
        "batch_efficiency": _round(batch.tok_s() / idle.tok_s()) if idle.tok_s() else None,
        "worker_lanes_during_batch": {name: after[name] - before.get(name, 0.0) for name in after},
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _render(result: Any) -> str:
    ttft = result["interactive_ttft_p50_s"]
    return "\n".join([
        f"interactive TTFT p50: alone {ttft['alone']} s, beside the batch {ttft['beside_batch']} s; "
        f"interactive_slowdown {result['interactive_slowdown']} (target <= 1.3)",
        f"batch ({result['batch']['via']}): {result['batch']['tok_s']} tok/s; concurrent chat on the idle stack: "
        f"{result['concurrent_chat']['tok_s']} tok/s; batch_efficiency {result['batch_efficiency']} (target >= 0.8)",
        f"worker lanes during the batch: {result['worker_lanes_during_batch']}",
        f"settings: {result['settings']}; load average {result['load_average']}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = harness.model_parser(NAME, __doc__)
    parser.add_argument("--lines", type=int, default=200, help="batch lines")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each batch line")
    parser.add_argument("--concurrency", type=int, default=0, help="lines in flight (default: the slots)")
    parser.add_argument("--turns", type=int, default=20, help="interactive turns alone (phase A)")
    parser.add_argument("--chat-tokens", type=int, default=24, help="max_tokens of each interactive turn")
    parser.add_argument("--think-s", type=float, default=0.5, help="pause between interactive turns")
    parser.add_argument("--batch-lane-busy", type=int, default=None, help="[worker] batch_lane_busy")
    parser.add_argument("--batch-lane-grace-s", type=float, default=None, help="[worker] batch_lane_grace_s")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or args.slots
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp, _stack(Path(tmp), args) as stack:
        result = asyncio.run(_measure(stack, args))
    result["settings"] = {"slots": args.slots, "threads": args.threads, "lines": args.lines,
                          "max_tokens": args.max_tokens, "concurrency": args.concurrency, "think_s": args.think_s,
                          "batch_lane_busy": args.batch_lane_busy, "batch_lane_grace_s": args.batch_lane_grace_s}
    result["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    return harness.emit(result, args.json, _render)
