"""A one-slot worker: the bounded queue, 503 + Retry-After past it, cancellation while queued or not streaming."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.bench.harness import wait_until
from tests.support.processes import REPO, free_port, python_module, run_service

pytestmark = pytest.mark.integration

TOKEN = "overload-token-padded-to-32-characters"
MODEL = "gemma-3-270m"
# As long as the context allows (N_CTX 512), so that even a GPU host is still generating when the test acts.
LONG = {"model": MODEL, "prompt": "Tell a long story:", "max_tokens": 480, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def url(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    logs = tmp_path_factory.mktemp("worker1")
    env = {
        "APPLIANCE_WORKER_PORT": str(port), "APPLIANCE_WORKER_MODEL_PATH": str(model_path),
        "APPLIANCE_WORKER_SLOTS": "1", "APPLIANCE_WORKER_QUEUE_SIZE": "1", "APPLIANCE_WORKER_N_CTX": "512",
        "APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_DATA_DIR": str(logs),
    }
    with run_service(python_module("inference"), env=env, log_path=logs / "worker.log",
                     ready_url=f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


def health(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def wait_for(url: str, key: str, value: int, timeout: float) -> float:
    return wait_until(lambda: health(url)[key] == value, timeout, f"{key} == {value} on /health", interval=0.02)


def open_stream(url: str, payload: dict[str, object], stream: bool = True) -> socket.socket:
    """A raw HTTP request whose response we never read; closing the socket is the disconnect."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({**payload, "stream": stream}).encode()
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"X-Internal-Token: {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    return sock


def post(url: str, payload: dict[str, object], timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Internal-Token": TOKEN})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_past_slots_and_queue_requests_get_503_with_retry_after_and_queued_ones_can_leave(url: str) -> None:
    running = open_stream(url, LONG)
    wait_for(url, "slots_busy", 1, 5)
    queued = open_stream(url, LONG)
    wait_for(url, "queue_depth", 1, 5)
    status, headers, raw = post(url, LONG)
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert json.loads(raw)["error"]["code"] == "overloaded"
    queued.close()
    running.close()
    # Freed at the next decode step (milliseconds when idle; long only when other processes hog the CPU).
    wait_for(url, "slots_busy", 0, 30)
    wait_for(url, "queue_depth", 0, 30)
    status, _, raw = post(url, {**LONG, "max_tokens": 3})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        assert 'appliance_worker_rejected_total{reason="queue_full"} 1.0' in response.read().decode()


def generated_tokens(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("appliance_worker_generated_tokens_total{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_non_streaming_request_is_cancelled_when_the_client_goes_away(url: str) -> None:
    wait_for(url, "slots_busy", 0, 30)
    before = generated_tokens(url)
    request = open_stream(url, LONG, stream=False)
    wait_for(url, "slots_busy", 1, 30)  # generating: the client goes away now, however fast this host is
    request.close()
    wait_for(url, "slots_busy", 0, 30)
    assert generated_tokens(url) - before < LONG["max_tokens"]  # type: ignore[operator]


def test_a_model_outside_the_sha256_allow_list_is_refused(model_path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "APPLIANCE_WORKER_PORT": str(free_port()), "APPLIANCE_WORKER_MODEL_PATH": str(model_path),
           "APPLIANCE_WORKER_ALLOWED_SHA256": "0" * 64, "APPLIANCE_DATA_DIR": str(tmp_path),
           "APPLIANCE_LOG_JSON": "false"}
    result = subprocess.run([sys.executable, "-m", "inference"], env=env, cwd=REPO, capture_output=True,
                            timeout=60, check=False)
    assert result.returncode == 1
    assert b"not in allowed_sha256" in result.stderr


def test_invalid_settings_exit_2_with_one_message(tmp_path: Path) -> None:
    env = {**os.environ, "APPLIANCE_WORKER_SLOTS": "zero", "APPLIANCE_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "inference"], env=env, cwd=REPO, capture_output=True,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert b"APPLIANCE_WORKER_SLOTS" in result.stderr and b"Traceback" not in result.stderr
