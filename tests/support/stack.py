"""A whole appliance on loopback for tests: Redis, N workers, balancer, RAG, gateway, each its own process.

Usage::

    with appliance_stack(tmp_path, model_path=model_path, workers=3) as stack:
        stack.gateway, stack.balancer, stack.workers, stack.rag   # base URLs
        stack.admin_key, stack.token                               # gateway admin key, internal token
        stack.services["worker0"].signal(signal.SIGKILL)           # any process by name

Every process binds 127.0.0.1 on a free port, writes its log under ``tmp/logs`` and is
stopped when the context exits. ``upstream="fake"`` replaces balancer, workers and RAG
with the instant fake upstream (``appliance.bench.fake_worker``) for fuzzing and load
tests of the gateway alone; ``fake_workers=N`` puts N failure-mode fake workers
(``appliance.bench.fake_worker``) behind the real balancer instead of real ones.
``rag`` is ``"real"`` (the real service and embedding model), ``"fake"`` (the fake
upstream answers RAG calls too) or ``"none"`` (the gateway then reports it as a failing
dependency: ready but "degraded"); it defaults to the kind of ``upstream``.
``stack.restart(name)`` and ``restart_redis(stack)`` bring a killed process back.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance.bench.harness import redis_answers, wait_until
from tests.support.processes import Service, free_port, python_module, redis_server, run_service, wait_http_ok

TOKEN = "stack-internal-token-padded-to-at-least-32-characters"
FAKE_MODEL = "fake-model"


@dataclass
class LoopbackAppliance:
    """URLs, processes and secrets of a running stack."""

    tmp: Path
    token: str
    redis_url: str
    gateway: str = ""
    gateways: list[str] = field(default_factory=list)
    balancer: str = ""
    workers: list[str] = field(default_factory=list)
    rag: str = ""
    admin_key: str = ""
    model: str = "gemma-3-270m"
    services: dict[str, Service] = field(default_factory=dict)
    env: dict[str, dict[str, str]] = field(default_factory=dict)
    exits: ExitStack = field(default_factory=ExitStack)

    @property
    def pids(self) -> dict[str, int]:
        return {name: service.pid for name, service in self.services.items()}

    def restart(self, name: str, ready_path: str = "/health", timeout: float = 180) -> Service:
        """Start process ``name`` again (same argv, env and port) after a test killed it."""
        old = self.services[name]
        old.stop(timeout=5)
        port = next(v for k, v in self.env[name].items() if k.endswith("_PORT"))
        service = self.exits.enter_context(run_service(
            old.argv, env=self.env[name], log_path=old.log_path, ready_url=f"http://127.0.0.1:{port}{ready_path}",
            ready_timeout=timeout))
        self.services[name] = service
        return service

    def internal_headers(self) -> dict[str, str]:
        return {"X-Internal-Token": self.token}

    def balancer_workers(self) -> list[dict[str, Any]]:
        request = urllib.request.Request(f"{self.balancer}/workers", headers=self.internal_headers())
        with urllib.request.urlopen(request, timeout=5) as response:
            return list(json.loads(response.read())["workers"])

    def create_key(self, name: str, scopes: tuple[str, ...] = ("chat",), gateway: str | None = None,
                   **limits: int) -> str:
        """A new gateway API key (secret) with these scopes; limits default to unlimited rpm."""
        body = json.dumps({"name": name, "scopes": list(scopes), "limits": {"rpm": 0, **limits}}).encode()
        request = urllib.request.Request(f"{gateway or self.gateway}/admin/keys", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {self.admin_key}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["key"])


def metric_value(url: str, name: str, headers: Mapping[str, str] | None = None) -> float:
    """Sum of every sample of ``name`` (any labels) on a Prometheus ``/metrics`` page."""
    request = urllib.request.Request(f"{url}/metrics", headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _common(tmp: Path, token: str) -> dict[str, str]:
    (tmp / "empty.toml").write_text("")
    return {"APPLIANCE_CONFIG": str(tmp / "empty.toml"), "APPLIANCE_DATA_DIR": str(tmp / "data"),
            "APPLIANCE_INTERNAL_TOKEN": token, "APPLIANCE_LOG_LEVEL": "WARNING", "APPLIANCE_LOG_JSON": "true",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _prefixed(prefix: str, settings: Mapping[str, str] | None) -> dict[str, str]:
    return {f"{prefix}{key.upper()}": value for key, value in (settings or {}).items()}


def start_workers(stack: LoopbackAppliance, exits: ExitStack, count: int, model_path: Path,
                  settings: Mapping[str, str] | None) -> None:
    """Start ``count`` real workers at once (they load the model in parallel), then wait for all."""
    base = {**_common(stack.tmp, stack.token), "APPLIANCE_WORKER_MODEL_PATH": str(model_path),
            "APPLIANCE_WORKER_SLOTS": "8", "APPLIANCE_WORKER_N_THREADS": "1", "APPLIANCE_WORKER_N_CTX": "512",
            **_prefixed("APPLIANCE_WORKER_", settings)}
    for index in range(count):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**base, "APPLIANCE_WORKER_PORT": str(port)}
        stack.services[f"worker{index}"] = exits.enter_context(run_service(
            python_module("inference"), env=env, log_path=stack.tmp / "logs" / f"worker{index}.log", ready_url=None))
        stack.workers.append(url)
        stack.env[f"worker{index}"] = env
    for index, url in enumerate(stack.workers):
        wait_http_ok(f"{url}/health", 180, stack.services[f"worker{index}"].proc)


def start_fake_workers(stack: LoopbackAppliance, exits: ExitStack, count: int) -> None:
    """Failure-mode fake workers (``appliance.bench.fake_worker``), switchable with ``POST /_mode``."""
    for index in range(count):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = python_module("appliance.bench.fake_worker", "--port", str(port), "--model", FAKE_MODEL)
        stack.services[f"worker{index}"] = exits.enter_context(run_service(
            argv, env={}, log_path=stack.tmp / "logs" / f"fake-worker{index}.log", ready_url=f"{url}/health"))
        stack.workers.append(url)
    stack.model = FAKE_MODEL


def restart_redis(stack: LoopbackAppliance) -> Service:
    """Start redis-server again on the same port and directory (its AOF is replayed) after a kill."""
    old = stack.services["redis"]
    old.stop(timeout=5)
    service = Service(old.argv, log=old.log_path)
    stack.exits.callback(service.stop)
    port = int(stack.redis_url.rsplit("/", 1)[0].rsplit(":", 1)[1])
    wait_until(lambda: redis_answers(port), 15, "redis restarted", proc=service)
    stack.services["redis"] = service
    return service


def start_balancer(stack: LoopbackAppliance, exits: ExitStack, settings: Mapping[str, str] | None) -> None:
    port = free_port()
    env = {**_common(stack.tmp, stack.token), "APPLIANCE_BALANCER_PORT": str(port),
           "APPLIANCE_BALANCER_WORKERS": ",".join(stack.workers), "APPLIANCE_BALANCER_PROBE_INTERVAL_S": "0.5",
           "APPLIANCE_BALANCER_QUEUE_TIMEOUT_S": "60", "APPLIANCE_BALANCER_FIRST_BYTE_TIMEOUT_S": "60",
           **_prefixed("APPLIANCE_BALANCER_", settings)}
    stack.balancer = f"http://127.0.0.1:{port}"
    stack.env["balancer"] = env
    stack.services["balancer"] = exits.enter_context(run_service(
        python_module("balancer"), env=env, log_path=stack.tmp / "logs" / "balancer.log",
        ready_url=f"{stack.balancer}/health"))
    if stack.workers:
        wait_until(lambda: all(w["state"] == "healthy" for w in stack.balancer_workers()), 60,
                   what="all workers healthy in the balancer")


def start_rag(stack: LoopbackAppliance, exits: ExitStack, settings: Mapping[str, str] | None) -> None:
    port = free_port()
    env = {**_common(stack.tmp, stack.token), "APPLIANCE_RAG_PORT": str(port),
           "APPLIANCE_RAG_EMBEDDING_DEVICE": "cpu", **_prefixed("APPLIANCE_RAG_", settings)}
    stack.rag = f"http://127.0.0.1:{port}"
    stack.env["rag"] = env
    stack.services["rag"] = exits.enter_context(run_service(
        python_module("rag"), env=env, log_path=stack.tmp / "logs" / "rag.log", ready_url=f"{stack.rag}/health",
        ready_timeout=180))


def start_fake_upstream(stack: LoopbackAppliance, exits: ExitStack) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = python_module("appliance.bench.fake_worker", "--port", str(port), "--token", stack.token,
                         "--model", FAKE_MODEL)
    stack.services["upstream"] = exits.enter_context(run_service(
        argv, env={}, log_path=stack.tmp / "logs" / "upstream.log", ready_url=f"{url}/health"))
    stack.balancer = stack.rag = url
    stack.model = FAKE_MODEL


def start_gateways(stack: LoopbackAppliance, exits: ExitStack, count: int, settings: Mapping[str, str] | None) -> None:
    """``count`` gateway processes sharing Redis and the data dir (so one admin key)."""
    for index in range(count):
        port = free_port()
        env = {**_common(stack.tmp, stack.token), "APPLIANCE_GATEWAY_PORT": str(port),
               "APPLIANCE_GATEWAY_REDIS_URL": stack.redis_url, "APPLIANCE_GATEWAY_BALANCER_URL": stack.balancer,
               "APPLIANCE_GATEWAY_RAG_URL": stack.rag or "http://127.0.0.1:9",
               "APPLIANCE_GATEWAY_MODEL_INFO_TTL_S": "2", **_prefixed("APPLIANCE_GATEWAY_", settings)}
        url = f"http://127.0.0.1:{port}"
        name = "gateway" if index == 0 else f"gateway{index}"
        stack.env[name] = env
        stack.services[name] = exits.enter_context(run_service(
            python_module("gateway"), env=env, log_path=stack.tmp / "logs" / f"{name}.log",
            ready_url=f"{url}/healthz", ready_timeout=90))
        stack.gateways.append(url)
    stack.gateway = stack.gateways[0]
    stack.admin_key = (stack.tmp / "data" / "admin_key").read_text().strip()


@contextmanager
def appliance_stack(
    tmp: Path, *, model_path: Path | None = None, workers: int = 1, gateways: int = 1,
    rag: Literal["real", "fake", "none"] | None = None,
    upstream: Literal["real", "fake", "none"] = "real", redis_appendonly: bool = True, fake_workers: int = 0,
    worker_settings: Mapping[str, str] | None = None, balancer_settings: Mapping[str, str] | None = None,
    gateway_settings: Mapping[str, str] | None = None, rag_settings: Mapping[str, str] | None = None,
    token: str = TOKEN,
) -> Iterator[LoopbackAppliance]:
    """Start the stack (``upstream="none"``: no gateway either, just workers/balancer/RAG) and stop it on exit.

    Settings mappings use field names (``{"probe_interval_s": "0.2"}``) and become ``APPLIANCE_<SVC>_<FIELD>``.
    """
    (tmp / "logs").mkdir(parents=True, exist_ok=True)
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    with ExitStack() as exits:
        service, redis_url = exits.enter_context(redis_server(tmp / "redis", appendonly=redis_appendonly))
        stack = LoopbackAppliance(tmp=tmp, token=token, redis_url=redis_url, services={"redis": service},
                      exits=exits.enter_context(ExitStack()))
        rag = rag or ("fake" if upstream == "fake" else "real")
        if upstream == "fake":
            start_fake_upstream(stack, exits)
            if rag == "real":
                start_rag(stack, exits, rag_settings)
        else:
            if fake_workers:
                start_fake_workers(stack, exits, fake_workers)
            elif workers:
                if model_path is None:
                    raise ValueError("real workers need model_path")
                start_workers(stack, exits, workers, model_path, worker_settings)
            if stack.workers:  # a balancer without workers is never ready (and nothing would use it)
                start_balancer(stack, exits, balancer_settings)
            if rag == "real":
                start_rag(stack, exits, rag_settings)
        if upstream != "none" and gateways:
            start_gateways(stack, exits, gateways, gateway_settings)
        yield stack
