"""Several models on the local runtime, as an admin lives it (issue 29): two aliases of the bundled GGUF from
``[[models.entry]]``, both listed with their state and both answering (official openai client); a model that
does not fit the memory budget refused at `models add` with the arithmetic; `models add` of a third on the
running stack while streams run (0 failed, gateway and balancer keep their processes); `models remove` drains
(a stream running on the removed model completes); `status` shows each model's workers, state and memory.
Real processes throughout (supervisord, Redis, real workers on the real model, balancer, gateway); no RAG and
no Prometheus, which this test does not look at."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from appliance.bench.harness import wait_until
from tests.support.chat_load import ClientThreads
from tests.support.supervised import SupervisedAppliance

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

NO_CACHE: dict[str, Any] = {"temperature": 0.7, "extra_headers": {"Cache-Control": "no-cache"}}


class StreamLoad(ClientThreads):
    """Clients streaming chats to ``model`` in a loop; a stream counts when it ends with a finish reason."""

    def __init__(self, make_client: Any, clients: int, model: str) -> None:
        self.model, self.ok, self.failures = model, 0, []  # type: list[str]
        self._lock = threading.Lock()
        super().__init__(make_client, clients)

    def _run(self, client: openai.OpenAI) -> None:
        with client:
            while not self._stop.is_set():
                try:
                    finish = None
                    stream = client.chat.completions.create(
                        model=self.model, messages=[{"role": "user", "content": "Tell me about bees."}],
                        max_tokens=24, stream=True, **NO_CACHE)
                    for chunk in stream:
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
                    assert finish in {"stop", "length"}, finish
                    with self._lock:
                        self.ok += 1
                except Exception as exc:
                    with self._lock:
                        self.failures.append(repr(exc)[:300])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[SupervisedAppliance]:
    root = tmp_path_factory.mktemp("models")
    models = root / "data" / "models"
    models.mkdir(parents=True)
    for name in ("first.gguf", "second.gguf", "third.gguf"):
        shutil.copy(model_path, models / name)
    (root / "appliance.toml").write_text(f"""
[models]
memory_budget = "3GiB"

[[models.entry]]
alias = "chat-a"
path = "{models / 'first.gguf'}"
slots = 2
context = 1024

[[models.entry]]
alias = "chat-b"
path = "{models / 'second.gguf'}"
slots = 2
context = 1024
""")
    stack = SupervisedAppliance(root / "data", cwd=root, env={
        "APPLIANCE_RUNTIME_WITH_RAG": "false", "APPLIANCE_RUNTIME_WITH_PROMETHEUS": "false"})
    try:
        yield stack
    finally:
        stack.cli("down", check=False, timeout=180)


def _listed(client: openai.OpenAI) -> dict[str, dict[str, Any]]:
    return {m.id: m.model_dump() for m in client.models.list().data}


def _answers(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=4, **NO_CACHE)
    assert reply.model == model and reply.usage is not None and reply.usage.completion_tokens > 0
    return reply.model


def _pid(stack: SupervisedAppliance, name: str) -> int:
    return int(next(s["pid"] for s in stack.status()[1]["services"] if s["name"] == name))


def test_several_models_on_a_running_stack(stack: SupervisedAppliance) -> None:
    stack.cli("up", "--json")
    admin = stack.openai(stack.admin_key())
    listed = _listed(admin)
    assert {"chat-a", "chat-b"} <= set(listed), listed
    assert {listed[m]["state"] for m in ("chat-a", "chat-b")} == {"loaded"}, listed
    assert [_answers(admin, m) for m in ("chat-a", "chat-b")] == ["chat-a", "chat-b"]
    code, report = stack.status()
    assert code == 0, report
    models = {m["model"]: m for m in report["models"]}
    assert models["chat-a"]["workers"] == ["inference-1"] and models["chat-b"]["workers"] == ["inference-2"]
    assert models["chat-a"]["state"] == "loaded" and models["chat-a"]["memory_bytes"] > 250 << 20
    table = stack.cli("status").stdout
    assert "model chat-a: always, state=loaded, workers=inference-1, memory per worker=" in table, table

    # A model that does not fit is refused at add, with the arithmetic; nothing changes.
    data = stack.data_dir / "models"
    refused = stack.cli("models", "add", str(data / "third.gguf"), "--alias", "huge", "--slots", "64",
                        "--context", "65536", check=False)
    assert refused.returncode == 1, refused
    message = " ".join(refused.stderr.split())
    print(refused.stderr)
    for term in ("does not fit the memory budget of 3.0 GiB ([models] memory_budget)", "1 worker x (huge:",
                 "241.4 MiB weights + 64 slots x 65536 tokens x 18.0 KiB KV = 72.2 GiB", "1 worker x (chat-a:",
                 "total 72.8 GiB of 3.0 GiB"):
        assert term in message, (term, message)
    assert "huge" not in _listed(admin)

    # A third model added while streams run on the first two: none fails; gateway and balancer keep running.
    gateway_pid, balancer_pid = _pid(stack, "gateway"), _pid(stack, "balancer")
    with StreamLoad(lambda: stack.openai(stack.admin_key()), 1, "chat-a") as load_a, \
            StreamLoad(lambda: stack.openai(stack.admin_key()), 1, "chat-b") as load_b:
        wait_until(lambda: load_a.ok > 0 and load_b.ok > 0, 120, "streams flowing", interval=0.2)
        added = stack.cli("models", "add", str(data / "third.gguf"), "--alias", "chat-c", "--slots", "2",
                          "--context", "1024", "--json")
        wait_until(lambda: load_a.ok > 2, 60, "streams after the add", interval=0.2)
    change = json.loads(added.stdout)
    assert change["action"] == "added" and change["started"] == ["inference-3"], change
    print(f"models add under streams: {load_a.ok + load_b.ok} ok, {len(load_a.failures + load_b.failures)} failed")
    assert load_a.failures == [] and load_b.failures == []
    assert (_pid(stack, "gateway"), _pid(stack, "balancer")) == (gateway_pid, balancer_pid)
    assert _answers(admin, "chat-c") == "chat-c"
    (targets,) = json.loads((stack.data_dir / "run" / "prometheus-workers.json").read_text())
    assert len(targets["targets"]) == 3  # Prometheus scrapes the new worker too
    listed = {row["alias"]: row for row in json.loads(stack.cli("models", "list", "--json").stdout)["data"]}
    assert sorted(listed) == ["chat-a", "chat-b", "chat-c"] and listed["chat-c"]["state"] == "loaded"

    # Remove drains: a stream running on chat-b when it is removed ends normally; then chat-b is gone.
    done: dict[str, Any] = {}
    started = threading.Event()

    def long_stream() -> None:
        try:
            stream = stack.openai(stack.admin_key()).chat.completions.create(
                model="chat-b", messages=[{"role": "user", "content": "Count from one to two hundred in words."}],
                max_tokens=160, stream=True, **NO_CACHE)
            pieces = []
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    done["finish"] = chunk.choices[0].finish_reason
            done["text"] = "".join(pieces)
        except Exception as exc:
            done["error"] = repr(exc)
        finally:
            started.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(120)
    removed = json.loads(stack.cli("models", "remove", "chat-b", "--json").stdout)
    thread.join(180)
    assert "error" not in done and done.get("finish") in {"stop", "length"}, done
    # chat-c moves onto inference-2 (drained, restarted) while inference-3 serves it, then inference-3 stops.
    assert (removed["started"], removed["stopped"]) == (["inference-2"], ["inference-3"]), removed
    wait_until(lambda: "chat-b" not in _listed(admin), 30, "chat-b unlisted", interval=0.5)
    with pytest.raises(openai.NotFoundError):
        admin.chat.completions.create(model="chat-b", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert [_answers(admin, m) for m in ("chat-a", "chat-c")] == ["chat-a", "chat-c"]
    # An on_demand model gets a swap host (W's worker, M1's balancer), which starts with it loaded; pin it live.
    added = json.loads(stack.cli("models", "add", str(data / "third.gguf"), "--alias", "chat-od", "--on-demand",
                                 "--slots", "2", "--context", "1024", "--json").stdout)
    assert added["started"] == ["inference-3"], added
    assert _answers(admin, "chat-od") == "chat-od"
    stack.cli("models", "pin", "chat-od")
    listed = {row["alias"]: row for row in json.loads(stack.cli("models", "list", "--json").stdout)["data"]}
    assert (listed["chat-od"]["resident"], listed["chat-od"]["pinned"], listed["chat-od"]["workers"]) == (
        "on_demand", True, 0), listed
    wait_until(lambda: _listed(admin)["chat-od"].get("pinned") is True, 30, "the balancer sees the pin", interval=0.5)
    audit = "".join(path.read_text() for path in (stack.data_dir / "audit").glob("*.jsonl"))
    assert all(f'"{action}"' in audit for action in ("model.add", "model.remove", "model.pin", "refused"))
