"""The observability config against the running local stack.

Each service of the tree is started as its own process on loopback (``python -m
<package>``, the exporters from their Debian binaries), then:

* every metric name the dashboards and alert rules use must be on the /metrics
  page of the process that owns it (names come from parsing the PromQL, not
  from a hand-kept list);
* a real Prometheus scrapes them all, with the real alert rules loaded, and
  finds every target up, the key series present and the rules healthy.

A service whose package is not in the tree yet is skipped with that reason.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from observability.promql import exported_names, owner_of, used_metric_names
from tests.support.processes import REPO, Service, free_port, python_module, run_service

pytestmark = pytest.mark.integration

TOKEN = "observability-test-token-padded-to-32-characters"


@dataclass(frozen=True)
class Spec:
    job: str  # the job name in observability/prometheus.yml
    available: Callable[[], str | None]  # None if it can run here, else why not
    key_series: tuple[str, ...]  # PromQL that must return something once scraped


def _package(name: str) -> Callable[[], str | None]:
    return lambda: None if (REPO / name / "__main__.py").is_file() else f"package {name}/ is not in the tree yet"


def _binary(name: str) -> Callable[[], str | None]:
    return lambda: None if shutil.which(name) else f"{name} not installed (scripts/debian-packages.txt)"


SPECS: dict[str, Spec] = {
    "inference": Spec("inference", _package("inference"), ("appliance_worker_slots_total",)),
    "balancer": Spec("balancer", _package("balancer"), ("appliance_balancer_queue_depth",)),
    "rag": Spec("rag", _package("rag"), ("appliance_rag_ingested_chunks_total",)),
    "gateway": Spec("gateway", _package("gateway"), ("appliance_gateway_overhead_seconds_count",)),
    "gpu_exporter": Spec("gpu-exporter", lambda: None, ("appliance_gpu_exporter_up == 1", "appliance_gpu_count",
                                                "appliance_gpu_nvml_available")),
    "redis_exporter": Spec("redis", _binary("prometheus-redis-exporter"), ("redis_up == 1",)),
    "node_exporter": Spec("node", _binary("prometheus-node-exporter"), ("node_filesystem_avail_bytes",)),
}


class Stack:
    """Starts services on demand (with what they depend on) and stops them all at the end."""

    def __init__(self, request: pytest.FixtureRequest, workdir: Path, exits: ExitStack) -> None:
        self._request = request
        self._workdir = workdir
        self._exits = exits
        self._urls: dict[str, str] = {}
        self._failed: dict[str, str] = {}

    def url(self, name: str) -> str:
        """Base URL of a running service; skips if it cannot exist here, fails if it does not start."""
        reason = SPECS[name].available()
        if reason:
            pytest.skip(reason)
        if name in self._failed:
            pytest.fail(self._failed[name])
        if name not in self._urls:
            try:
                self._urls[name] = self._start(name)
            except Exception as exc:
                self._failed[name] = f"{name} did not start: {exc}"
                raise
        return self._urls[name]

    def optional(self, name: str) -> str | None:
        return None if SPECS[name].available() else self.url(name)

    def _common_env(self) -> dict[str, str]:
        return {"APPLIANCE_DATA_DIR": str(self._workdir / "data"), "APPLIANCE_INTERNAL_TOKEN": TOKEN,
                "APPLIANCE_LOG_JSON": "true", "HF_HUB_OFFLINE": "1"}

    def _argv_env(self, name: str, port: int) -> tuple[list[str], dict[str, str]]:
        env = self._common_env()
        if name == "inference":
            model = self._request.getfixturevalue("model_path")
            env |= {"APPLIANCE_WORKER_PORT": str(port), "APPLIANCE_WORKER_MODEL_PATH": str(model),
                    "APPLIANCE_WORKER_SLOTS": "2", "APPLIANCE_WORKER_N_CTX": "512"}
            return python_module("inference"), env
        if name == "balancer":
            worker = self.optional("inference")
            env |= {"APPLIANCE_BALANCER_PORT": str(port), "APPLIANCE_BALANCER_WORKERS": worker or ""}
            return python_module("balancer"), env
        if name == "rag":
            return python_module("rag"), env | {"APPLIANCE_RAG_PORT": str(port)}
        if name == "gateway":
            env |= {"APPLIANCE_GATEWAY_PORT": str(port),
                    "APPLIANCE_GATEWAY_BALANCER_URL": self.optional("balancer") or "http://127.0.0.1:9",
                    "APPLIANCE_GATEWAY_RAG_URL": self.optional("rag") or "http://127.0.0.1:9",
                    "APPLIANCE_GATEWAY_REDIS_URL": self._request.getfixturevalue("redis_url")}
            return python_module("gateway"), env
        if name == "gpu_exporter":
            return python_module("observability.gpu_exporter"), env | {"APPLIANCE_GPU_EXPORTER_PORT": str(port)}
        if name == "redis_exporter":
            redis = self._request.getfixturevalue("redis_url").rsplit("/", 1)[0]
            return ["prometheus-redis-exporter", f"--redis.addr={redis}",
                    f"--web.listen-address=127.0.0.1:{port}"], {}
        return ["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{port}"], {}

    def _start(self, name: str) -> str:
        port = free_port()
        argv, env = self._argv_env(name, port)
        url = f"http://127.0.0.1:{port}"
        service = self._exits.enter_context(run_service(argv, env=env, log_path=self._workdir / f"{name}.log",
                                                        ready_url=None))
        # The worker serves /metrics while its model loads; it is up for Prometheus once /health is 200.
        ready = f"{url}/health" if name == "inference" else f"{url}/metrics"
        wait_ok(ready, 120.0 if name in {"inference", "rag"} else 30.0, service)
        return url


def wait_ok(url: str, timeout: float, service: Service) -> None:
    """Poll until 200, closing every error response (a 503 while loading must not leak its socket)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            exc.close()
            last = exc
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready ({last}); exit code {service.proc.poll()}\n{service.logs()[-3000:]}")


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with ExitStack() as exits:
        yield Stack(request, tmp_path_factory.mktemp("obs-stack"), exits)


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        return str(response.read().decode())


USED = used_metric_names()


@pytest.mark.parametrize("owner", sorted(SPECS))
def test_every_metric_the_dashboards_and_rules_use_is_exported(stack: Stack, owner: str) -> None:
    names = {name: places for name, places in USED.items() if owner_of(name) == owner}
    assert names, f"nothing in the dashboards or rules reads from {owner}"
    exposed = exported_names(fetch(f"{stack.url(owner)}/metrics"))
    missing = {name: sorted(places) for name, places in names.items() if name not in exposed}
    assert not missing, f"{owner} does not export: {json.dumps(missing, indent=1)}"


def _prometheus_config(stack: Stack, rules: Path) -> tuple[dict[str, Any], list[str]]:
    jobs, skipped = [], []
    for name, spec in SPECS.items():
        if spec.available():
            skipped.append(f"{name}: {spec.available()}")
            continue
        target = stack.url(name).removeprefix("http://")
        jobs.append({"job_name": spec.job, "static_configs": [{"targets": [target]}]})
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
              "rule_files": [str(rules)], "scrape_configs": jobs}
    return config, skipped


def _api(base: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    body = json.loads(fetch(f"{base}/api/v1/{path}{query}"))
    assert body["status"] == "success", body
    return body["data"]


def _wait(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_real_prometheus_scrapes_every_target_and_evaluates_the_rules(stack: Stack, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not installed: apt-get install prometheus (scripts/debian-packages.txt)")
    config, skipped = _prometheus_config(stack, REPO / "observability" / "rules" / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"]
    with run_service(argv, env={}, log_path=tmp_path / "prometheus.log", ready_url=None) as prometheus:
        wait_ok(f"{base}/-/ready", 30.0, prometheus)

        def all_up() -> bool:
            targets = _api(base, "targets")["activeTargets"]
            return len(targets) == len(config["scrape_configs"]) and all(t["health"] == "up" for t in targets)

        _wait("every target up", all_up)
        for name, spec in SPECS.items():
            if spec.available():
                continue
            assert _api(base, "query", query=f'up{{job="{spec.job}"}}')["result"][0]["value"][1] == "1", name
            for series in spec.key_series:
                _wait(f"{series} from {name}", lambda s=series: bool(_api(base, "query", query=s)["result"]), 10)

        def rules_evaluated() -> bool:
            groups = _api(base, "rules")["groups"]
            return all(rule.get("lastEvaluation", "0001").startswith("20") for g in groups for rule in g["rules"])

        _wait("one evaluation of every rule", rules_evaluated)
        rules = [rule for group in _api(base, "rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} >= {"WorkerDown", "RedisDown", "GPUHot", "DiskAlmostFull"}
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    healthy_stack_alerts = {r["name"]: r["state"] for r in rules if r["name"] in {"WorkerDown", "AllWorkersDown",
                                                                                    "RedisDown"}}
    assert set(healthy_stack_alerts.values()) == {"inactive"}, healthy_stack_alerts
    if skipped:
        pytest.skip(f"checked without: {'; '.join(skipped)}")
