"""A 200-line batch survives `appliance restart gateway` and a SIGKILLed worker while it runs: every
custom_id is exactly once in the output (a worker crash is not the line's fault: no line fails), on the
local runtime under supervisord with one real worker (the bundled model). The gateway restarts while the
killed worker reloads, so both faults land mid-batch on a fast machine too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from appliance.bench.harness import wait_until
from tests.support.supervised import SupervisedAppliance

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(1200)]

LINES = 200
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[SupervisedAppliance]:
    data_dir = tmp_path_factory.mktemp("batch-faults") / "data"
    (data_dir / "models").mkdir(parents=True)
    shutil.copy(model_path, data_dir / "models" / model_path.name)
    stack = SupervisedAppliance(data_dir, env={"APPLIANCE_RUNTIME_WITH_PROMETHEUS": "false",
                                               "APPLIANCE_RUNTIME_WITH_RAG": "false",
                                               "APPLIANCE_GATEWAY_BATCH_POLL_S": "0.5",
                                               "APPLIANCE_GATEWAY_BATCH_DRAIN_S": "5"})
    try:
        stack.cli("up", "--workers", "1", "--slots", "4")
        yield stack
    finally:
        stack.cli("down", check=False, timeout=400)


def _completed(client: openai.OpenAI, batch_id: str) -> int:
    try:
        counts = client.batches.retrieve(batch_id).request_counts
    except (openai.APIConnectionError, openai.InternalServerError):
        return 0  # the gateway is restarting
    return (counts.completed + counts.failed) if counts else 0


def test_a_batch_survives_a_gateway_restart_and_a_killed_worker(stack: SupervisedAppliance) -> None:
    created = json.loads(stack.cli("keys", "create", "nightly", "--scopes", "chat", "--json").stdout)
    client = stack.openai(created["key"])
    lines = [{"custom_id": f"ticket-{i}", "method": "POST", "url": CHAT,
              "body": {"model": "gemma-3-270m", "max_tokens": 4, "ignore_eos": True, "messages": [
                  {"role": "system", "content": "Tag the ticket with one word."},
                  {"role": "user", "content": f"Ticket {i}: the printer on floor {i % 7} is jammed."}]}}
             for i in range(LINES)]
    upload = client.files.create(file=("tickets.jsonl", "\n".join(map(json.dumps, lines)).encode()),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    started = time.monotonic()

    wait_until(lambda: _completed(client, batch.id) >= 10, 300, "10 lines done", interval=0.3)
    # The worker dies with lines in it, and the gateway restarts while the worker reloads: nothing can finish
    # the batch in between, whatever this machine's speed. `restart gateway` starts the gateway again once
    # the worker is ready (the runtime's start order); lines in flight meanwhile are retried or cut off by
    # the old gateway's drain, and sent again.
    _, worker_pid = stack.process("inference-1")
    os.kill(worker_pid, signal.SIGKILL)
    killed_at = _completed(client, batch.id)
    print(f"worker SIGKILLed at {killed_at} lines, {time.monotonic() - started:.0f} s in")
    assert killed_at < LINES, "the batch ended before the faults: make the lines longer"
    stack.cli("restart", "gateway", timeout=400)
    print(f"gateway restarted at {_completed(client, batch.id)} lines, {time.monotonic() - started:.0f} s in")

    def ended() -> bool:
        return client.batches.retrieve(batch.id).status in ("completed", "failed", "expired", "cancelled")

    wait_until(ended, 600, "the batch ended", interval=0.5)
    final = client.batches.retrieve(batch.id)
    print(f"batch {final.status} after {time.monotonic() - started:.0f} s (load average {os.getloadavg()[0]:.1f})")
    assert final.status == "completed", final
    written: list[Any] = []
    for file_id in (final.output_file_id, final.error_file_id):
        if file_id:
            written += [json.loads(text) for text in client.files.content(file_id).text.splitlines()]
    ids = [row["custom_id"] for row in written]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # none lost, none twice
    assert final.request_counts is not None
    assert (final.request_counts.completed, final.request_counts.failed) == (LINES, 0)
    assert all(row["response"]["status_code"] == 200 for row in written)

    # The admins' view of it: `appliance batches list | show | cancel` over the admin API.
    listed = json.loads(stack.cli("batches", "list", "--json").stdout)["data"]
    row = next(item for item in listed if item["id"] == batch.id)
    assert row["key_name"] == "nightly" and row["status"] == "completed"
    assert row["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0} and row["tokens"] > 0
    shown = json.loads(stack.cli("batches", "show", batch.id, "--json").stdout)
    assert shown["output_file_id"] == final.output_file_id and shown["key_id"] == created["id"]
    assert "nightly" in stack.cli("batches", "list").stdout
    refused = stack.cli("batches", "cancel", batch.id, check=False)
    assert refused.returncode == 1 and "409" in refused.stderr and "completed" in refused.stderr, refused.stderr
