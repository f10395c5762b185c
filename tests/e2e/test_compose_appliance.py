"""The compose appliance for real on this machine's Docker Engine (CPU profile, no registry).

`appliance images build` makes the local Debian base (debootstrap), the wheelhouse and every image;
`appliance up --runtime compose` brings the stack up; then, only through the ports published on
127.0.0.1: chat, a stream, an embedding, a RAG ingest and a cited answer with the official openai SDK;
`appliance status --runtime compose --json` healthy; Prometheus (in its container) reports every scrape
target up; a worker killed during a stream load (SIGKILL of its process, as a crash or the OOM killer does)
loses no request that had not started, and the engine restarts the container, which rejoins the balancer
through the Redis registry and serves again (`docker kill` itself would not do: the engine marks a container
it was told to kill as stopped by hand, and no restart policy brings that one back); a
backup of the running stack restores into an empty data directory (the stack comes back on it with the
same search results and keys); `down` leaves no container or network. Every container and network of the
test's own compose project is removed at the end, even on failure (the fixture's finally).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.bench.harness import wait_until
from tests.support.chat_load import ClientThreads
from tests.support.compose_appliance import ComposeAppliance, docker
from tests.support.compose_services import COMPOSE_SERVICES

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "corpus"
MODEL = "gemma-3-270m"
QUESTION = "How do bees tell each other where the flowers are?"
# Sampled and uncached, so every request of the load reaches a worker.
NO_CACHE: dict[str, Any] = {"temperature": 0.7, "extra_headers": {"Cache-Control": "no-cache"}}
# compose.yaml's worker healthcheck: start_period 180 s, then 3 failures 10 s apart mark it unhealthy.
WORKER_BACK_S = 180 + 3 * 10 + 120


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The Docker daemon: the running one, or one started here (as root) and stopped at the end."""
    if shutil.which("docker") is None:
        pytest.skip("Docker is not installed (./scripts/test installs docker.io on Debian when run as root)")
    if docker("info").returncode == 0:
        yield
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("no Docker daemon answers and this user cannot start one")
    with (tmp_path_factory.mktemp("dockerd") / "dockerd.log").open("wb") as log:
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: docker("info").returncode == 0, 90, "dockerd answering", interval=1.0)
            yield
        finally:
            started.terminate()
            try:
                started.wait(60)
            except subprocess.TimeoutExpired:
                started.kill()
                started.wait(10)


@pytest.fixture(scope="module")
def stack(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeAppliance]:
    stack = ComposeAppliance(tmp_path_factory.mktemp("compose") / "data")
    try:
        started = time.monotonic()
        built = json.loads(stack.cli("images", "build", "--json", timeout=1800).stdout)
        print(f"images built in {time.monotonic() - started:.0f} s: {built}")
        up = json.loads(stack.cli("up", "--runtime", "compose", "--json").stdout)
        print(f"compose stack healthy in {up['healthy_in_s']} s (up returned after {up['ready_in_s']} s)")
        assert up["openai_base_url"] == f"{stack.gateway}/v1"
        yield stack
    finally:
        stack.cli("down", "--runtime", "compose", check=False, timeout=300)
        stack.remove_everything()


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    """What one test leaves for a later one (the stack is shared, in file order)."""
    return {}


def test_chat_stream_and_embedding_through_the_gateway(stack: ComposeAppliance) -> None:
    with stack.sdk(stack.admin_key()) as sdk:
        reply = sdk.chat.completions.create(
            model=MODEL, max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Say hello."}]
        )
        assert reply.choices[0].finish_reason in {"stop", "length"} and reply.usage is not None
        chunks = list(
            sdk.chat.completions.create(
                model=MODEL, max_tokens=8, stream=True, messages=[{"role": "user", "content": "Count to three."}]
            )
        )
        assert chunks and chunks[-1].choices[0].finish_reason in {"stop", "length"}
        embedded = sdk.embeddings.create(model="all-MiniLM-L6-v2", input=["first text", "second text"])
        assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 384


def test_rag_ingest_and_a_cited_answer(stack: ComposeAppliance, shared: dict[str, Any]) -> None:
    admin = stack.admin_key()
    with stack.http(admin) as client:
        assert client.post("/v1/collections", json={"name": "library"}).status_code in (200, 201)
        ids = {}
        for path in sorted(CORPUS.glob("*.*"))[:4]:
            with path.open("rb") as handle:
                created = client.post("/v1/collections/library/documents", files={"file": (path.name, handle)})
            assert created.status_code in (201, 202), created.text
            ids[path.name] = created.json()["id"]
        made = client.post("/admin/keys", json={"name": "alice", "scopes": ["chat", "collections"]})
        assert made.status_code == 201, made.text
    with stack.sdk(admin) as sdk:
        reply = sdk.chat.completions.create(
            model=MODEL,
            max_tokens=4,
            temperature=0,
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"rag": {"collection": "library", "top_k": 3}},
        )
    citations = (reply.model_extra or {})["citations"]
    assert citations[0]["document_id"] == ids["honeybees.md"]
    shared.update(alice=made.json()["key"], search=_search(stack, admin))
    assert shared["search"][0][0] == ids["honeybees.md"]


def _search(stack: ComposeAppliance, key: str) -> list[tuple[str, float]]:
    with stack.http(key) as client:
        found = client.post("/v1/collections/library/search", json={"query": QUESTION, "top_k": 3})
    assert found.status_code == 200, found.text
    return [(hit["document_id"], round(hit["score"], 4)) for hit in found.json()["results"]]


def test_status_json_reports_every_service_healthy(stack: ComposeAppliance) -> None:
    result = stack.cli("status", "--runtime", "compose", "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert report["state"] == "healthy" and report["gateway"]["ready"] is True
    names = {s["name"] for s in report["services"]}
    assert names == COMPOSE_SERVICES
    assert all(s["healthy"] and s["state"] == "running" for s in report["services"]), report["services"]


def test_prometheus_in_its_container_scrapes_every_target(stack: ComposeAppliance) -> None:
    url = f"http://127.0.0.1:{stack.prometheus}/api/v1/targets"
    targets: list[dict[str, Any]] = []

    def all_up() -> bool:
        nonlocal targets
        targets = httpx.get(url, timeout=10).json()["data"]["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    try:
        wait_until(all_up, 120, "every Prometheus target up", interval=1.0)
    except AssertionError:
        raise AssertionError([(t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]) from None
    jobs = {t["labels"]["job"] for t in targets}
    assert jobs == {"prometheus", "gateway", "balancer", "inference", "rag", "redis", "node", "alertmanager"}
    assert sum(t["labels"]["job"] == "inference" for t in targets) == 2


class StreamLoad(ClientThreads):
    """Streaming chats from threads until stopped. A request that fails before its first chunk is lost (the
    balancer retries those on another worker); one cut after its first chunk is allowed when its worker dies."""

    join_s = 300.0

    def __init__(self, stack: ComposeAppliance, key: str, clients: int) -> None:
        self.ok = 0
        self.sent = 0
        self.cut: list[str] = []
        self.lost: list[str] = []
        self.served = threading.Condition()
        super().__init__(lambda: stack.sdk(key), clients)

    def _run(self, sdk: openai.OpenAI) -> None:
        with sdk:
            while not self._stop.is_set():
                chunks = 0
                with self.served:
                    self.sent += 1
                    # A new conversation each time: the balancer's prefix routing would send repeats of one
                    # prompt to the worker that holds it, and the other worker would get no traffic.
                    prompt = f"Request {self.sent}: tell me about lighthouses."
                try:
                    stream = sdk.chat.completions.create(
                        model=MODEL,
                        max_tokens=8,
                        stream=True,
                        messages=[{"role": "user", "content": prompt}],
                        **NO_CACHE,
                    )
                    for _chunk in stream:
                        chunks += 1
                    with self.served:
                        self.ok += 1
                        self.served.notify_all()
                except Exception as exc:  # every failure is recorded and judged by the test
                    with self.served:
                        (self.cut if chunks else self.lost).append(repr(exc)[:300])

    def wait_served(self, count: int, timeout: float, what: str) -> None:
        with self.served:
            if not self.served.wait_for(lambda: self.ok >= count or bool(self.lost), timeout):
                raise AssertionError(f"{what}: {self.ok} streams completed, not {count}, within {timeout:.0f} s")

    def __enter__(self) -> StreamLoad:
        super().__enter__()
        return self


def _worker_requests(stack: ComposeAppliance, service: str) -> float:
    """Requests the worker process in ``service``'s container has answered (its own /metrics, read inside)."""
    probe = (
        "import urllib.request; text = urllib.request.urlopen('http://127.0.0.1:8201/metrics', timeout=5).read()"
        ".decode(); print(sum(float(line.rsplit(' ', 1)[1]) for line in text.splitlines()"
        " if line.startswith('appliance_worker_requests_total{')))"
    )
    result = docker("exec", stack.container(service)["Id"], "python", "-c", probe)
    return float(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else 0.0


def _balancer_view(stack: ComposeAppliance, name: str) -> dict[str, Any]:
    """The balancer's entry for worker ``name`` (through the gateway's /admin/status); {} when it is gone."""
    with stack.http(stack.admin_key()) as client:
        workers = client.get("/admin/status").json()["workers"]
    return next((w for w in workers if w.get("url") == f"http://{name}:8201"), {})


def _balancer_sees(stack: ComposeAppliance, name: str) -> str | None:
    return _balancer_view(stack, name).get("state")


def test_a_killed_worker_loses_no_unstarted_request_and_rejoins(stack: ComposeAppliance) -> None:
    if os.geteuid() != 0:
        pytest.skip("killing a container's process from the host needs root (CI runs this module as root)")
    before = stack.container("inference-1")
    assert _balancer_sees(stack, "inference-1") == "healthy"
    with StreamLoad(stack, stack.admin_key(), clients=3) as load:
        load.wait_served(1, WORKER_BACK_S, "the stream load running")
        wait_until(lambda: _balancer_view(stack, "inference-1").get("inflight", 0) > 0, 120,
                   "inference-1 busy", interval=1.0)
        os.kill(before["State"]["Pid"], signal.SIGKILL)  # the worker process, seen from the host
        wait_until(lambda: _balancer_sees(stack, "inference-1") != "healthy", 60,
                   "the balancer dropping the killed worker", interval=1.0)

        def restarted_and_healthy() -> bool:
            now = stack.container("inference-1")
            return (
                now["RestartCount"] > before["RestartCount"]
                and (now["State"].get("Health") or {}).get("Status") == "healthy"
            )

        back = wait_until(restarted_and_healthy, WORKER_BACK_S,
                          "the killed worker restarted by the engine, healthy", interval=1.0)
        wait_until(lambda: _balancer_sees(stack, "inference-1") == "healthy", 120,
                   "the worker back in the balancer", interval=1.0)
        # The restarted process (its counters began at zero) answers requests of the load: it was routed to.
        wait_until(lambda: _worker_requests(stack, "inference-1") > 0, WORKER_BACK_S,
                   "the restarted worker serving", interval=1.0)
    print(f"worker healthy again {back:.0f} s after the kill; {load.ok} streams completed, {len(load.cut)} cut")
    assert not load.lost, load.lost
    assert stack.container("inference-1")["Id"] == before["Id"]  # the engine restarted it; nothing recreated it


def test_a_backup_restores_into_an_empty_data_dir(
    stack: ComposeAppliance, shared: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    admin = stack.admin_key()
    backups = tmp_path_factory.mktemp("backups")
    made = json.loads(stack.cli("backup", "--runtime", "compose", "--to", str(backups), "--json").stdout)
    archive = Path(made["archive"])
    assert archive.is_file() and made["redis_keys"] > 0
    key = stack.data_dir / "run" / "backup_key"  # the first backup generated it; a fresh host restores with it
    stack.cli("down", "--runtime", "compose")
    assert stack.leftovers() == ([], [])
    stack.use(tmp_path_factory.mktemp("restored") / "data")
    restored = json.loads(
        stack.cli("restore", str(archive), "--runtime", "compose", "--key", str(key), "--json").stdout
    )
    assert {"redis", "rag", "secrets"} <= set(restored["restored"]), restored
    up = json.loads(stack.cli("up", "--runtime", "compose", "--json").stdout)
    print(f"restored stack healthy in {up['healthy_in_s']} s (up returned after {up['ready_in_s']} s)")
    assert stack.admin_key() == admin
    assert _search(stack, admin) == shared["search"]
    with stack.sdk(shared["alice"]) as sdk:
        reply = sdk.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].finish_reason in {"stop", "length"}
    with stack.http("sk-app-not-a-key") as client:
        assert client.get("/v1/models").status_code == 401


def test_models_added_and_removed_live(stack: ComposeAppliance, model_path: Path) -> None:
    """Issue 29 in compose: a second model added while streams run (0 lost, 0 cut: the workers whose model
    changes are recreated one at a time, each drained first), both listed and answering, a model that does not
    fit refused with the numbers, and remove drains (a stream on the removed model completes)."""
    models = stack.data_dir / "models"
    for name in ("second.gguf", "third.gguf"):
        shutil.copy(model_path, models / name)
        (models / name).chmod(0o644)  # the workers' uid reads it
    refused = stack.cli("models", "add", str(models / "third.gguf"), "--alias", "huge", "--slots", "256",
                        "--context", "1048576", "--runtime", "compose", check=False)
    message = " ".join(refused.stderr.split())
    assert refused.returncode == 1 and "does not fit the memory budget" in message, refused.stderr
    assert "256 slots x 1048576 tokens x 18.0 KiB KV" in message and "total" in message, message
    admin = stack.admin_key()
    with StreamLoad(stack, admin, clients=2) as load:
        load.wait_served(2, 300, "streams before the add")
        added = json.loads(stack.cli("models", "add", str(models / "second.gguf"), "--alias", "chat-b",
                                     "--runtime", "compose", "--json", timeout=1800).stdout)
        load.wait_served(load.ok + 2, 300, "streams after the add")
    print(f"compose models add under streams: {load.ok} ok, {len(load.cut)} cut, {len(load.lost)} lost; {added}")
    assert load.lost == [] and load.cut == []
    with stack.sdk(admin) as sdk:
        listed = {m.id: m.model_dump() for m in sdk.models.list().data}
        assert {listed[m]["state"] for m in (MODEL, "chat-b")} == {"loaded"}, listed
        for model in (MODEL, "chat-b"):
            reply = sdk.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
            assert reply.model == model and reply.choices[0].finish_reason in {"stop", "length"}
        done: dict[str, Any] = {}

        def long_stream() -> None:
            try:
                for chunk in sdk.chat.completions.create(
                        model="chat-b", max_tokens=120, stream=True, **NO_CACHE,
                        messages=[{"role": "user", "content": "Count from one to two hundred in words."}]):
                    done.setdefault("first", True)
                    if chunk.choices and chunk.choices[0].finish_reason:
                        done["finish"] = chunk.choices[0].finish_reason
            except Exception as exc:
                done["error"] = repr(exc)

        thread = threading.Thread(target=long_stream)
        thread.start()
        wait_until(lambda: "first" in done or "error" in done, 120, "the stream on chat-b started", interval=0.2)
        stack.cli("models", "remove", "chat-b", "--runtime", "compose", timeout=900)
        thread.join(300)
        assert "error" not in done and done.get("finish") in {"stop", "length"}, done
        wait_until(lambda: "chat-b" not in {m.id for m in sdk.models.list().data}, 60, "chat-b unlisted")
    report = json.loads(stack.cli("status", "--runtime", "compose", "--json", check=False).stdout)
    assert [m["model"] for m in report["models"]] == [MODEL], report["models"]


def test_down_leaves_no_container_or_network(stack: ComposeAppliance) -> None:
    stack.cli("down", "--runtime", "compose")
    assert stack.leftovers() == ([], [])
    result = stack.cli("status", "--runtime", "compose", "--json", check=False)
    assert result.returncode == 2 and json.loads(result.stdout)["state"] == "down"
