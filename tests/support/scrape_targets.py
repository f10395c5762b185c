"""The processes a real Prometheus scrapes in the observability tests: each service of the tree as its own
process on loopback (``python -m <package>``), the exporters from their Debian binaries, started on demand."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import REPO, free_port, python_module, run_service, wait_http_ok

__all__ = ["SPECS", "ScrapeTargets", "Spec"]

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


class ScrapeTargets:
    """Starts the processes Prometheus scrapes, on demand (with what they depend on); stops them all at the end."""

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
        wait_http_ok(ready, 120.0 if name in {"inference", "rag"} else 30.0, service)
        return url
