"""The local runtime end to end, as an admin lives it: up, status, a crash, a rolling restart under
load, backup under load, disaster (wipe), restore, tamper refusal, down. Real processes throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.bench.harness import wait_until
from tests.support.chat_load import ChatLoad
from tests.support.file_modes import loose_paths
from tests.support.supervised import SupervisedAppliance

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[SupervisedAppliance]:
    # The most permissive umask for everything this module starts (the CLI, supervisord, the services): what
    # lands under data/ must still be the user's alone, and the model copied in below (0666) is made so by `up`.
    umask = os.umask(0)
    data_dir = tmp_path_factory.mktemp("appliance") / "data"
    (data_dir / "models").mkdir(parents=True)
    shutil.copy(model_path, data_dir / "models" / model_path.name)
    stack = SupervisedAppliance(data_dir)
    try:
        yield stack
    finally:
        stack.cli("down", check=False, timeout=120)
        os.umask(umask)


# the load must reach the workers: a non-zero temperature and no response cache
NO_CACHE: dict[str, Any] = {"temperature": 0.7, "extra_headers": {"Cache-Control": "no-cache"}}


def _pid(stack: SupervisedAppliance, name: str) -> int:
    return int(next(s["pid"] for s in stack.status()[1]["services"] if s["name"] == name))


def _workers_in_balancer(stack: SupervisedAppliance) -> int:
    """Workers the balancer routes to, from its admin API (internal token)."""
    port = stack.env["APPLIANCE_RUNTIME_BALANCER_PORT"]
    token = (stack.data_dir / "run" / "internal_token").read_text().strip()
    body = httpx.get(f"http://127.0.0.1:{port}/workers", headers={"X-Internal-Token": token}, timeout=10).json()
    return sum(1 for w in body["workers"] if w["state"] == "healthy")


def _prometheus_worker_targets(stack: SupervisedAppliance, expected: int, wait_s: float = 20) -> list[str]:
    """Worker scrape targets Prometheus knows of (file-based discovery), waiting for ``expected`` of them."""
    port = stack.env["APPLIANCE_RUNTIME_PROMETHEUS_PORT"]
    deadline = time.monotonic() + wait_s
    while True:
        body = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=10).json()
        targets = body["data"]["activeTargets"]
        found = sorted(t["labels"]["instance"] for t in targets if t["labels"]["job"] == "inference")
        if len(found) == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _search(stack: SupervisedAppliance, key: str) -> list[str]:
    response = httpx.post(
        f"{stack.gateway}/v1/collections/handbook/search",
        timeout=30,
        headers={"Authorization": f"Bearer {key}"},
        json={"query": "How many days of paid leave do employees get?", "top_k": 3},
    )
    response.raise_for_status()
    return [hit["document_id"] for hit in response.json()["results"]]


def test_lifecycle(stack: SupervisedAppliance) -> None:
    up = stack.cli("up", "--workers", "2", "--json")
    assert json.loads(up.stdout)["openai_base_url"].endswith("/v1")
    assert stack.cli("up").returncode == 0  # idempotent on a running stack

    code, report = stack.status()
    assert code == 0, report
    assert {s["name"] for s in report["services"]} >= {
        "redis",
        "rag",
        "inference-1",
        "inference-2",
        "balancer",
        "gateway",
    }
    assert all(s["healthy"] for s in report["services"]), report["services"]
    # The GPU report follows the host: none here; on a GPU host NVML lists the devices.
    assert report["gpu"]["present"] is _nvidia_gpu_present(), report["gpu"]

    admin = stack.admin_key()
    created = json.loads(stack.cli("keys", "create", "alice", "--scopes", "chat,collections", "--json").stdout)
    alice = created["key"]
    headers = {"Authorization": f"Bearer {alice}"}
    httpx.post(f"{stack.gateway}/v1/collections", json={"name": "handbook"}, headers=headers, timeout=30)
    for title, text in [
        ("Leave policy", "Employees get 27 days of paid leave per year, plus public holidays."),
        ("Expenses", "Travel expenses are reimbursed within 30 days on presentation of receipts."),
    ]:
        doc = httpx.post(
            f"{stack.gateway}/v1/collections/handbook/documents",
            headers=headers,
            timeout=60,
            json={"title": title, "text": text},
        )
        assert doc.status_code in (200, 201), doc.text
    folder = stack.data_dir.parent / "to-ingest"
    folder.mkdir()
    (folder / "security.md").write_text("# Security\n\n## Badges\nVisitors must wear a red badge at all times.\n")
    (folder / "notes.bin").write_bytes(b"\x00\x01")
    ingested = json.loads(stack.cli("ingest", str(folder), "--collection", "handbook", "--json").stdout)
    assert sorted(row["state"] for row in ingested) == ["done", "skipped"]
    before = _search(stack, alice)
    assert before
    # Another key does not read alice's collection until an admin shares it (ingest --shared, or collections share).
    bob = json.loads(stack.cli("keys", "create", "bob", "--scopes", "chat,collections", "--json").stdout)["key"]
    with pytest.raises(httpx.HTTPStatusError):
        _search(stack, bob)
    stack.cli("ingest", str(folder), "--collection", "handbook", "--shared", "--json")
    assert _search(stack, bob) == before
    stack.cli("collections", "share", "handbook", "--off")
    with pytest.raises(httpx.HTTPStatusError):
        _search(stack, bob)
    # Redis AOF, the RAG store and indexes, logs, the admin key, run/, Prometheus: 0700/0600 (sockets 0700).
    assert loose_paths(stack.data_dir) == []

    # A worker killed with SIGKILL comes back by itself.
    worker = next(s for s in report["services"] if s["name"] == "inference-1")
    os.kill(worker["pid"], signal.SIGKILL)

    def replaced() -> bool:
        return any(
            s["name"] == "inference-1" and s["healthy"] and s["pid"] != worker["pid"]
            for s in stack.status()[1]["services"]
        )

    back = wait_until(replaced, 30, "worker restart", interval=0.5)
    print(f"killed worker healthy again after {back:.1f}s")

    # Rolling restart while 8 clients chat: no request fails.
    with ChatLoad(lambda: stack.openai(admin), clients=8, **NO_CACHE) as load:
        time.sleep(2)
        stack.cli("restart", "inference")
        time.sleep(1)
    print(f"rolling restart under load: {load.ok} ok, {len(load.failures)} failed")
    assert load.failures == [] and load.ok > 0

    # Live scaling while 4 clients chat: workers join and leave through the Redis registry, so the
    # balancer keeps its process (no restart, no cut stream) and no request fails.
    balancer_pid = _pid(stack, "balancer")
    with ChatLoad(lambda: stack.openai(admin), clients=4, **NO_CACHE) as load:
        time.sleep(2)
        started = time.monotonic()
        stack.cli("scale", "inference=3")
        grew = time.monotonic() - started
        assert _workers_in_balancer(stack) == 3
        # Prometheus picks the new worker up from its targets file, without a restart or reload
        assert len(_prometheus_worker_targets(stack, 3)) == 3
        started = time.monotonic()
        stack.cli("scale", "inference=1")
        shrank = time.monotonic() - started
        time.sleep(2)
    print(
        f"scale 2→3 in {grew:.1f}s, 3→1 in {shrank:.1f}s under load: {load.ok} ok, {len(load.failures)} failed; "
        f"balancer pid {balancer_pid} → {_pid(stack, 'balancer')}; load average {os.getloadavg()[0]:.1f}"
    )
    assert load.failures == [] and load.ok > 0
    assert _pid(stack, "balancer") == balancer_pid
    assert _prometheus_worker_targets(stack, 1) == [f"127.0.0.1:{stack.env['APPLIANCE_RUNTIME_WORKER_BASE_PORT']}"]
    assert sorted(s["name"] for s in stack.status()[1]["services"] if s["name"].startswith("inference-")) == [
        "inference-1"
    ]
    assert _workers_in_balancer(stack) == 1

    # Backup while clients chat.
    with ChatLoad(lambda: stack.openai(admin), clients=4, **NO_CACHE) as load:
        backup = json.loads(stack.cli("backup", "--json").stdout)
    assert load.failures == []
    archive = Path(backup["archive"])
    assert archive.is_file() and backup["redis_keys"] > 0
    assert loose_paths(stack.data_dir) == []  # backups/ and the archive too

    # Disaster: the data directory is lost. Restore brings keys and documents back.
    stack.cli("down")
    saved = stack.data_dir.parent / archive.name
    shutil.copy(archive, saved)
    key = stack.data_dir.parent / "backup_key"  # kept apart from the data and the backups, as the README says
    shutil.copy(stack.data_dir / "run" / "backup_key", key)
    shutil.rmtree(stack.data_dir)
    without_key = stack.cli("restore", str(saved), check=False)
    assert without_key.returncode != 0 and "no backup key" in without_key.stderr
    restored = json.loads(stack.cli("restore", str(saved), "--key", str(key), "--json").stdout)
    assert {"redis", "rag"} <= set(restored["restored"])
    stack.cli("up")
    assert stack.admin_key() == admin
    reply = stack.openai(alice).chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert _search(stack, alice) == before
    assert loose_paths(stack.data_dir) == []  # what the restore wrote

    # One flipped byte: restore refuses and says why.
    tampered = saved.with_name("tampered.tar.gz")
    raw = bytearray(saved.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    tampered.write_bytes(bytes(raw))
    refused = stack.cli("restore", str(tampered), "--key", str(key), check=False)
    assert refused.returncode != 0 and "refusing to restore" in refused.stderr

    # Down leaves no process behind.
    pids = [s["pid"] for s in stack.status()[1]["services"] if s["pid"]]
    supervisord_pid = int((stack.data_dir / "run" / "supervisord.pid").read_text())
    stack.cli("down")
    time.sleep(0.5)
    alive = [pid for pid in [*pids, supervisord_pid] if _alive(pid)]
    assert alive == []
    assert stack.status()[0] == 2


def _nvidia_gpu_present() -> bool:
    from appliance.runtime.local.status import gpu_summary

    return bool(gpu_summary()["present"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
