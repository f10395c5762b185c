"""``appliance bench responses [--json]``: what the Responses API costs beside chat, and its prefix reuse.

- **overhead** (fake worker): a ``POST /v1/responses`` request and the equivalent ``POST
  /v1/chat/completions`` (same message, same ``max_tokens``), one at a time through the same gateway in
  front of the fake upstream (``appliance.bench.fake_worker``: worker and balancer in one, answering at
  once), rounds alternated, each round a closed loop in its own process (``_gateway_loadgen``). Reported:
  p50 of each and ``responses_minus_chat_p50_ms`` (target ≤ 1 ms). The Responses requests are stored
  (``store`` defaults to true), as a client's would be.
- **chain** (real worker, real model, real balancer): a ``previous_response_id`` chain of ``--turns`` turns
  with fixed instructions and short answers: per turn ``input_tokens``, ``cached_tokens`` and their ratio
  (target ≥ 0.8 on turns 2 and later: each turn re-renders the same prompt bytes, so the worker reuses it).
  ``--no-chain`` skips it.
"""

from __future__ import annotations

import json
import secrets
import statistics
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from appliance.bench import harness

__all__ = ["main"]

NAME = "responses"
MODEL = "fake-model"
INSTRUCTIONS = "You are a terse assistant for a ship's crew. " + " ".join(
    f"Rule {n}: answer in at most five words, never use lists, and keep numbers as digits." for n in range(1, 13))
QUESTIONS = ("Where is the ship?", "And the captain?", "What time is it?", "Is the sea calm?", "Any ports near?",
             "Shall we anchor?", "Who is on watch?", "How much fuel?")


def _post(url: str, body: dict[str, Any], key: str, timeout: float = 600) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",  # noqa: S310
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                              "Cache-Control": "no-store"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
        return dict(json.loads(reply.read()))


@contextmanager
def _gateway(tmp: Path, token: str, redis_url: str, balancer: str) -> Iterator[tuple[str, str]]:
    """A gateway in front of ``balancer``; yields (its URL, a chat key without limits)."""
    port = harness.free_port()
    env = {**harness.service_env("gateway", tmp / "gateway", token, port=port, redis_url=redis_url,
                                 balancer_url=balancer, rag_url="http://127.0.0.1:9")}
    url = f"http://127.0.0.1:{port}"
    with harness.service(harness.python("gateway"), env, ready=f"{url}/healthz", log=tmp / "gateway.log"):
        admin = (tmp / "gateway" / "admin_key").read_text().strip()
        created = _post(f"{url}/admin/keys", {"name": "bench", "scopes": ["chat"], "limits": {"rpm": 0}}, admin)
        yield url, str(created["key"])


def _loadgen(url: str, key: str, body: dict[str, Any], duration: float) -> dict[str, Any]:
    argv = harness.python("appliance.bench._gateway_loadgen", "--url", url, "--concurrency", "1",
                          "--duration", str(duration), "--body", json.dumps(body),
                          "--headers", json.dumps({"Authorization": f"Bearer {key}"}))
    done = subprocess.run(argv, capture_output=True, check=True, timeout=duration + 120)  # noqa: S603
    return dict(json.loads(done.stdout))


def overhead(tmp: Path, rounds: int, duration: float) -> dict[str, Any]:
    token = secrets.token_urlsafe(32)
    fport = harness.free_port()
    fake = f"http://127.0.0.1:{fport}"
    fake_argv = harness.python("appliance.bench.fake_worker", "--port", str(fport), "--token", token,
                               "--slots", "64")
    bodies = {"chat": ("/v1/chat/completions", {"model": MODEL, "max_tokens": 16,
                                                 "messages": [{"role": "user", "content": "bench {n}"}]}),
              "responses": ("/v1/responses", {"model": MODEL, "max_output_tokens": 16, "input": "bench {n}"})}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in bodies}
    with ExitStack() as stack:
        redis_url = stack.enter_context(harness.redis_server(tmp / "redis"))
        stack.enter_context(harness.service(fake_argv, ready=f"{fake}/health", log=tmp / "fake.log"))
        gateway, key = stack.enter_context(_gateway(tmp, token, redis_url, fake))
        for path, body in bodies.values():  # warm-up
            _loadgen(gateway + path, key, body, 1.0)
        for index in range(rounds):
            for name in ("chat", "responses") if index % 2 == 0 else ("responses", "chat"):
                path, body = bodies[name]
                runs[name].append(_loadgen(gateway + path, key, body, duration))
                harness.progress(NAME, f"round {index + 1}/{rounds} {name}: {runs[name][-1]}")
    p50 = {name: statistics.median(run["p50_ms"] or 0.0 for run in done) for name, done in runs.items()}
    return {"chat_p50_ms": p50["chat"], "responses_p50_ms": p50["responses"],
            "responses_minus_chat_p50_ms": round(p50["responses"] - p50["chat"], 3),
            "requests": {name: sum(run["requests"] for run in done) for name, done in runs.items()},
            "errors": {name: sum(run["errors"] for run in done) for name, done in runs.items()}, "rounds": rounds}


def chain(tmp: Path, turns: int, model: Path | None) -> dict[str, Any]:
    from appliance.core.model_files import prepare_default_model

    path = model or prepare_default_model(Path("data"))
    token = secrets.token_urlsafe(32)
    wport, bport = harness.free_port(), harness.free_port()
    worker, balancer = f"http://127.0.0.1:{wport}", f"http://127.0.0.1:{bport}"
    worker_env = harness.service_env("worker", tmp / "worker", token, port=wport, model_path=path, slots=2,
                                     n_ctx=2048, n_threads=2)
    balancer_env = harness.service_env("balancer", tmp / "balancer", token, port=bport, workers=worker)
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        redis_url = stack.enter_context(harness.redis_server(tmp / "redis-chain"))
        stack.enter_context(harness.service(harness.python("inference"), worker_env, ready=f"{worker}/health",
                                            log=tmp / "worker.log", timeout=300))
        stack.enter_context(harness.service(harness.python("balancer"), balancer_env, ready=f"{balancer}/health",
                                            log=tmp / "balancer.log"))
        gateway, key = stack.enter_context(_gateway(tmp / "chain", token, redis_url, balancer))
        alias = harness.get_json(f"{worker}/health", timeout=5)[1]["model"]
        previous = None
        for turn in range(turns):
            body = {"model": alias, "instructions": INSTRUCTIONS, "input": QUESTIONS[turn % len(QUESTIONS)],
                    "max_output_tokens": 8, "temperature": 0, "previous_response_id": previous}
            reply = _post(f"{gateway}/v1/responses", body, key)
            usage = reply["usage"]
            cached, prompt = usage["input_tokens_details"]["cached_tokens"], usage["input_tokens"]
            rows.append({"turn": turn + 1, "input_tokens": prompt, "cached_tokens": cached,
                         "cached_share": round(cached / prompt, 3) if prompt else 0.0})
            harness.progress(NAME, f"turn {turn + 1}: {rows[-1]}")
            previous = reply["id"]
    later = [row["cached_share"] for row in rows[1:]]
    return {"turns": rows, "min_cached_share_later_turns": min(later) if later else None}


def _render(result: Any) -> str:
    lines = []
    if "overhead" in result:
        o = result["overhead"]
        lines.append(f"fake worker, one at a time: chat p50 {o['chat_p50_ms']} ms, responses p50 "
                     f"{o['responses_p50_ms']} ms, difference {o['responses_minus_chat_p50_ms']} ms (target <= 1)")
    if "chain" in result:
        shares = [row["cached_share"] for row in result["chain"]["turns"]]
        lines.append(f"previous_response_id chain, cached share per turn: {shares} (target >= 0.8 from turn 2)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(NAME, __doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per round and kind")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--model", type=Path, default=None, help="GGUF for the chain (default: the bundled model)")
    parser.add_argument("--no-chain", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-responses-") as tmp:
        result["overhead"] = overhead(Path(tmp) / "overhead", args.rounds, args.duration)
        if not args.no_chain:
            result["chain"] = chain(Path(tmp) / "chain", args.turns, args.model)
    return harness.emit(result, args.json, _render)
