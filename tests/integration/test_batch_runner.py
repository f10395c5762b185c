"""The batch runner and the Batch API's caps, on two gateways over the fake upstream (real Redis).

A file over ``files_max_bytes`` or past a key's ``files_max_bytes_per_key`` is a 413 naming the limit; a
batch past ``batch_max_lines`` is a 400. A batch whose upstream answers 503 for a while waits and
completes (no line lands in the error file for a stack that was busy). A gateway SIGKILLed while it runs a
batch loses it to the other gateway once its lease expires, and every custom_id ends up exactly once in
the output.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from appliance.bench.harness import wait_until
from tests.support.stack import LoopbackAppliance, appliance_stack, metric_value, restart_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CHAT = "/v1/chat/completions"
SETTINGS = {"files_max_bytes": "16384", "files_max_bytes_per_key": "40000", "batch_max_lines": "80",
            "batch_lease_s": "2", "batch_poll_s": "0.3", "batch_concurrency": "4"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("batches"), upstream="fake", gateways=2,
                         gateway_settings=SETTINGS) as running:
        yield running


def _client(stack: LoopbackAppliance, name: str, gateway: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateways[gateway]}/v1", api_key=stack.create_key(name), max_retries=0,
                         timeout=30)


def _jsonl(stack: LoopbackAppliance, count: int) -> bytes:
    return "\n".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {
        "model": stack.model, "max_tokens": 4, "messages": [{"role": "user", "content": f"line {i}"}]}})
        for i in range(count)).encode()


def _upstream(stack: LoopbackAppliance, **mode: Any) -> None:
    httpx.post(f"{stack.balancer}/_mode", json=mode, headers=stack.internal_headers(), timeout=5).raise_for_status()


def _ended(client: openai.OpenAI, batch_id: str) -> Any:
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    return batch


def _custom_ids(client: openai.OpenAI, batch: Any) -> list[str]:
    ids = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            ids += [json.loads(text)["custom_id"] for text in client.files.content(file_id).text.splitlines()]
    return ids


def test_upload_caps_are_413s_naming_the_limit(stack: LoopbackAppliance) -> None:
    client = _client(stack, "caps")
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", b"x" * 20000), purpose="batch")
    assert too_big.value.status_code == 413 and "at most 16384 bytes" in too_big.value.message
    for _ in range(2):
        client.files.create(file=("part.jsonl", b"y" * 15000), purpose="batch")
    with pytest.raises(openai.APIStatusError) as full:
        client.files.create(file=("part.jsonl", b"y" * 15000), purpose="batch")
    assert full.value.status_code == 413 and "may hold 40000 bytes; 10000 are left" in full.value.message
    assert len(client.files.list().data) == 2  # the refused upload left nothing behind
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", b"{}"), purpose="fine-tune")


def test_a_batch_past_the_line_cap_is_refused(stack: LoopbackAppliance) -> None:
    client = _client(stack, "lines")
    file_id = client.files.create(file=("many.jsonl", _jsonl(stack, 81)), purpose="batch").id
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert "line 81: is past the limit of 80 requests per batch" in refused.value.message


def test_a_busy_upstream_delays_lines_it_does_not_fail_them(stack: LoopbackAppliance) -> None:
    client = _client(stack, "busy")
    _upstream(stack, mode="503")
    try:
        file_id = client.files.create(file=("busy.jsonl", _jsonl(stack, 12)), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        wait_until(lambda: client.batches.retrieve(batch.id).status == "in_progress", 30, "batch started")
        time.sleep(1.5)  # lines are refused (503) meanwhile and wait to be sent again
        assert client.batches.retrieve(batch.id).request_counts.failed == 0  # type: ignore[union-attr]
    finally:
        _upstream(stack, mode="ok")
    ended = _ended(client, batch.id)
    assert ended.status == "completed" and ended.error_file_id is None
    assert sorted(_custom_ids(client, ended)) == sorted(f"r{i}" for i in range(12))


def _lines_run(stack: LoopbackAppliance) -> list[float]:
    return [metric_value(url, "appliance_gateway_batch_lines_total") for url in stack.gateways]


def test_a_killed_gateways_batch_is_taken_over_and_each_line_written_once(stack: LoopbackAppliance) -> None:
    client = _client(stack, "takeover")
    before = _lines_run(stack)
    _upstream(stack, service_s=0.1)
    try:
        file_id = client.files.create(file=("takeover.jsonl", _jsonl(stack, 80)), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        wait_until(lambda: sum(_lines_run(stack)) - sum(before) >= 8, 60, "some lines done")
        holder = max(range(2), key=lambda i: _lines_run(stack)[i] - before[i])  # the gateway running it
        name = "gateway" if holder == 0 else "gateway1"
        stack.services[name].signal(signal.SIGKILL)
        survivor = openai.OpenAI(base_url=f"{stack.gateways[1 - holder]}/v1", api_key=client.api_key, max_retries=0)
        ended = _ended(survivor, batch.id)
        survived = metric_value(stack.gateways[1 - holder], "appliance_gateway_batch_lines_total")
        assert survived > before[1 - holder]  # the survivor ran the rest
    finally:
        _upstream(stack, service_s=0)
        stack.restart(name, ready_path="/healthz")
    assert ended.status == "completed"
    assert ended.request_counts.completed == 80 and ended.request_counts.failed == 0
    assert sorted(_custom_ids(survivor, ended)) == sorted(f"r{i}" for i in range(80))  # none lost, none twice


def test_prometheus_counts_batch_lines_and_tokens(stack: LoopbackAppliance) -> None:
    client = _client(stack, "metrics")

    def tokens() -> float:
        return sum(metric_value(url, "appliance_gateway_batch_tokens_total") for url in stack.gateways)

    before, lines = tokens(), sum(_lines_run(stack))
    file_id = client.files.create(file=("m.jsonl", _jsonl(stack, 3)), purpose="batch").id
    _ended(client, client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id)
    assert tokens() > before and sum(_lines_run(stack)) == lines + 3


def test_lines_run_as_their_key_at_batch_priority_and_stop_with_its_revocation(stack: LoopbackAppliance) -> None:
    secret = stack.create_key("revoked-later")
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=secret, max_retries=0, timeout=30)
    key_id = next(k["id"] for k in httpx.get(f"{stack.gateway}/admin/keys", timeout=10, headers={
        "Authorization": f"Bearer {stack.admin_key}"}).json()["data"] if k["name"] == "revoked-later")
    _upstream(stack, service_s=0.2)
    try:
        file_id = client.files.create(file=("r.jsonl", _jsonl(stack, 40)), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        wait_until(lambda: (client.batches.retrieve(batch.id).request_counts.completed or 0) >= 4, 60,  # type: ignore[union-attr]
                   "some lines done")
        seen = httpx.get(f"{stack.balancer}/_stats", headers=stack.internal_headers(), timeout=5).json()["headers"]
        mine = [h for h in seen if h.get("X-Appliance-Key-Id") == key_id]
        assert mine and all(h.get("X-Appliance-Priority") == "batch" for h in mine)  # the key's id, lowered
        revoked = httpx.delete(f"{stack.gateway}/admin/keys/{key_id}", timeout=10,
                               headers={"Authorization": f"Bearer {stack.admin_key}"})
        assert revoked.status_code == 200
        admin = httpx.Client(base_url=stack.gateway, headers={"Authorization": f"Bearer {stack.admin_key}"})
        with admin:
            deadline = time.monotonic() + 60
            while (ended := admin.get(f"/admin/batches/{batch.id}").json())["status"] != "completed":
                assert time.monotonic() < deadline, ended
                time.sleep(0.2)
    finally:
        _upstream(stack, service_s=0)
    counts = ended["request_counts"]
    assert counts["failed"] > 0 and counts["completed"] + counts["failed"] == 40  # each line once
    assert ended["key_name"] == "revoked-later"
    errors = stack.tmp / "data" / "files" / key_id / ended["error_file_id"]  # the key may not read it any more
    statuses = {json.loads(text)["response"]["status_code"] for text in errors.read_text().splitlines()}
    assert statuses == {401}


def test_an_embeddings_batch_needs_the_embeddings_scope_and_runs(stack: LoopbackAppliance) -> None:
    chat_only = _client(stack, "chat-only")
    lines = "\n".join(json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                                  "body": {"model": "all-MiniLM-L6-v2", "input": f"text {i}"}}) for i in range(3))
    refused_file = chat_only.files.create(file=("e.jsonl", lines.encode()), purpose="batch").id
    with pytest.raises(openai.PermissionDeniedError):
        chat_only.batches.create(input_file_id=refused_file, endpoint="/v1/embeddings", completion_window="24h")
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.create_key("embedder", ("chat", "embeddings")),
                           max_retries=0, timeout=30)
    file_id = client.files.create(file=("e.jsonl", lines.encode()), purpose="batch").id
    ended = _ended(client, client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                                                 completion_window="24h").id)
    assert ended.status == "completed" and ended.request_counts.completed == 3  # type: ignore[union-attr]
    rows = [json.loads(text) for text in client.files.content(ended.output_file_id or "").text.splitlines()]
    assert sorted(row["custom_id"] for row in rows) == ["e0", "e1", "e2"]
    assert all(row["response"]["body"]["data"][0]["object"] == "embedding" for row in rows)


def test_the_whole_stack_stopped_and_started_mid_batch_resumes_it(stack: LoopbackAppliance) -> None:
    """What `appliance down` / `up` does to a batch: every gateway stops (SIGTERM, drained), Redis stops and
    replays its AOF, the gateways start again; the batch resumes from what its files hold."""
    client = _client(stack, "down-up")
    _upstream(stack, service_s=0.1)
    try:
        file_id = client.files.create(file=("d.jsonl", _jsonl(stack, 60)), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        wait_until(lambda: (client.batches.retrieve(batch.id).request_counts.completed or 0) >= 6, 60,  # type: ignore[union-attr]
                   "some lines done")
        for name in ("gateway", "gateway1"):
            stack.services[name].stop(timeout=60)
        restart_redis(stack)
        for name in ("gateway", "gateway1"):
            stack.restart(name, ready_path="/healthz")
        ended = _ended(client, batch.id)
    finally:
        _upstream(stack, service_s=0)
    assert ended.status == "completed" and ended.request_counts.completed == 60  # type: ignore[union-attr]
    assert sorted(_custom_ids(client, ended)) == sorted(f"r{i}" for i in range(60))  # none lost, none twice
