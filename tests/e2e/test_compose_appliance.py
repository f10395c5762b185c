"""The compose appliance for real on this machine's Docker Engine (CPU profile, no registry).

`appliance images build` makes the local Debian base (debootstrap), the wheelhouse and every image;
`appliance up --runtime compose` brings the stack up; then, only through the ports published on
127.0.0.1: chat, a stream, an embedding, a RAG ingest and a cited answer with the official openai SDK;
`appliance status --runtime compose --json` healthy; Prometheus (in its container) reports every scrape
target up; `down` leaves no container or network. Every container and network of the test's own compose
project is removed at the end, even on failure (the fixture's finally).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.processes import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "corpus"
MODEL = "gemma-3-270m"
QUESTION = "How do bees tell each other where the flowers are?"


def _docker(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    docker = shutil.which("docker") or "docker"
    return subprocess.run([docker, *args], capture_output=True, text=True, check=check, timeout=timeout)


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(1.0)
    raise AssertionError(f"{what} not within {timeout:.0f} s")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The Docker daemon: the running one, or one started here (as root) and stopped at the end."""
    if shutil.which("docker") is None:
        pytest.skip("Docker is not installed (./scripts/test installs docker.io on Debian when run as root)")
    if _docker("info").returncode == 0:
        yield
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("no Docker daemon answers and this user cannot start one")
    with (tmp_path_factory.mktemp("dockerd") / "dockerd.log").open("wb") as log:
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: _docker("info").returncode == 0, 90, "dockerd answering")
            yield
        finally:
            started.terminate()
            try:
                started.wait(60)
            except subprocess.TimeoutExpired:
                started.kill()
                started.wait(10)


class Stack:
    """`appliance … --runtime compose` as a subprocess, on free loopback ports and its own compose project."""

    def __init__(self, data_dir: Path) -> None:
        self.project = f"llm-appliance-e2e-{os.getpid()}"
        self.port = free_port()
        self.prometheus = free_port()
        self.gateway = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "APPLIANCE_RUNTIME_GATEWAY_HOST": "127.0.0.1",
            "APPLIANCE_RUNTIME_GATEWAY_PORT": str(self.port),
            "APPLIANCE_RUNTIME_PROMETHEUS_PORT": str(self.prometheus),
            "APPLIANCE_WORKER_SLOTS": "4",
            "NO_COLOR": "1",
        }
        for name in ("APPLIANCE_CONFIG", "COMPOSE_FILE", "APPLIANCE_INTERNAL_TOKEN"):
            self.env.pop(name, None)
        self.use(data_dir)

    def use(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env["APPLIANCE_DATA_DIR"] = str(data_dir)

    def cli(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "appliance.cli", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"appliance {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
        return result

    def admin_key(self) -> str:
        return (self.data_dir / "gateway" / "admin_key").read_text().strip()

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.gateway}/v1",
            api_key=key,
            max_retries=0,
            timeout=180,
            http_client=httpx.Client(timeout=180),
        )

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.gateway, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def container(self, service: str) -> dict[str, Any]:
        ids = _docker(
            "ps",
            "-aq",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
        ).stdout.split()
        assert len(ids) == 1, (service, ids)
        info: dict[str, Any] = json.loads(_docker("inspect", ids[0], check=True).stdout)[0]
        return info

    def leftovers(self) -> tuple[list[str], list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return (
            _docker("ps", "-aq", "--filter", label).stdout.split(),
            _docker("network", "ls", "-q", "--filter", label).stdout.split(),
        )

    def remove_everything(self) -> None:
        containers, networks = self.leftovers()
        if containers:
            _docker("rm", "-f", *containers, timeout=300)
        if networks:
            _docker("network", "rm", *networks)


@pytest.fixture(scope="module")
def stack(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("compose") / "data")
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


def test_chat_stream_and_embedding_through_the_gateway(stack: Stack) -> None:
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


def test_rag_ingest_and_a_cited_answer(stack: Stack, shared: dict[str, Any]) -> None:
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


def _search(stack: Stack, key: str) -> list[tuple[str, float]]:
    with stack.http(key) as client:
        found = client.post("/v1/collections/library/search", json={"query": QUESTION, "top_k": 3})
    assert found.status_code == 200, found.text
    return [(hit["document_id"], round(hit["score"], 4)) for hit in found.json()["results"]]


def test_status_json_reports_every_service_healthy(stack: Stack) -> None:
    result = stack.cli("status", "--runtime", "compose", "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert report["state"] == "healthy" and report["gateway"]["ready"] is True
    names = {s["name"] for s in report["services"]}
    assert names == {
        "redis",
        "inference-1",
        "inference-2",
        "balancer",
        "rag",
        "gateway",
        "redis-exporter",
        "node-exporter",
        "alertmanager",
        "prometheus",
    }
    assert all(s["healthy"] and s["state"] == "running" for s in report["services"]), report["services"]


def test_prometheus_in_its_container_scrapes_every_target(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.prometheus}/api/v1/targets"
    targets: list[dict[str, Any]] = []

    def all_up() -> bool:
        nonlocal targets
        targets = httpx.get(url, timeout=10).json()["data"]["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    try:
        _wait(all_up, 120, "every Prometheus target up")
    except AssertionError:
        raise AssertionError([(t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]) from None
    jobs = {t["labels"]["job"] for t in targets}
    assert jobs == {"prometheus", "gateway", "balancer", "inference", "rag", "redis", "node", "alertmanager"}
    assert sum(t["labels"]["job"] == "inference" for t in targets) == 2


def test_down_leaves_no_container_or_network(stack: Stack) -> None:
    stack.cli("down", "--runtime", "compose")
    assert stack.leftovers() == ([], [])
    result = stack.cli("status", "--runtime", "compose", "--json", check=False)
    assert result.returncode == 2 and json.loads(result.stdout)["state"] == "down"
