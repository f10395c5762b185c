"""A real inference worker process on loopback, and its clients (the official openai client, raw HTTP)."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from appliance.bench.harness import wait_until
from tests.support.processes import free_port, python_module, run_service

__all__ = ["MODEL", "TOKEN", "Worker", "check_token_logprobs", "spawn_worker", "wait_idle"]

TOKEN = "test-internal-token-padded-to-32-characters"
MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class Worker:
    url: str
    sdk: openai.OpenAI

    def client(self) -> openai.OpenAI:
        return self.sdk

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                                  default_headers={"X-Internal-Token": TOKEN})

    def get(self, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
        return self.call("GET", path, None, token)

    def call(self, method: str, path: str, body: bytes | None, token: str | None = TOKEN) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Internal-Token"] = token
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, payload: Any) -> tuple[int, dict[str, Any]]:
        status, raw = self.call("POST", path, json.dumps(payload).encode())
        return status, json.loads(raw)

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/health", token=None)[1])


@contextmanager
def spawn_worker(model_path: Path, logs: Path, **settings: str) -> Iterator[Worker]:
    """A real worker process on the real model; ``settings`` are APPLIANCE_WORKER_* values by field name."""
    port = free_port()
    env = {
        "APPLIANCE_WORKER_PORT": str(port), "APPLIANCE_WORKER_MODEL_PATH": str(model_path),
        "APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_DATA_DIR": str(logs), "APPLIANCE_LOG_JSON": "false",
        **{f"APPLIANCE_WORKER_{field.upper()}": value for field, value in settings.items()},
    }
    url = f"http://127.0.0.1:{port}"
    with run_service(python_module("inference"), env=env, log_path=logs / "worker.log",
                     ready_url=f"{url}/health") as service:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           default_headers={"X-Internal-Token": TOKEN}) as sdk:
            yield Worker(url, sdk)
        assert service.proc.poll() is None, service.logs()[-3000:]


def wait_idle(worker: Worker, timeout: float = 1.0) -> float:
    """Until every slot of ``worker`` is free; the seconds that took."""
    return wait_until(lambda: worker.health()["slots_busy"] == 0, timeout, "every slot free", interval=0.02)


def check_token_logprobs(content: str, items: list[Any], top_n: int) -> None:
    """OpenAI's logprobs shape: the tokens spell the content, each a finite log-probability with its bytes and
    ``top_n`` alternatives in descending order that form (part of) a distribution."""
    assert "".join(item.token for item in items) == content
    for item in items:
        assert item.logprob <= 0 and math.isfinite(item.logprob)
        assert item.bytes == list(item.token.encode())
        tops = [top.logprob for top in item.top_logprobs]
        assert len(tops) == top_n and tops == sorted(tops, reverse=True)
        assert sum(math.exp(lp) for lp in tops) <= 1.0 + 1e-4  # a distribution, not raw scores
        if top_n:
            assert item.logprob <= tops[0] + 1e-6
    assert 0.0 < math.exp(sum(item.logprob for item in items)) <= 1.0
