"""`--runtime compose`: the local runtime's verbs over the Docker Engine and compose.yaml.

Works with Compose v2 (`docker compose`) and Debian's docker-compose 1.29 alike: the project name is
passed with ``-p`` (1.29 has no top-level ``name:``) and readiness is waited for here from the
containers' healthchecks (1.29 has no ``up --wait``). Workers are the services named ``inference-N``;
each pins its own GPU in compose.gpu.yaml, so compose's ``--scale`` (identical replicas sharing one
device reservation and one advertised name) does not fit: ``scale`` starts or stops the worker
services compose.yaml defines, and going past them means adding ``inference-K`` to the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.core.redis_auth import ensure_redis_users
from appliance.runtime.budget import human_bytes
from appliance.runtime.compose.engine import Engine, EngineError, find_engine
from appliance.runtime.compose.images import DEBIAN_IMAGES, PYTHON_IMAGES, build_images, image_name
from appliance.runtime.compose.models import compose_model_plan, override_path, write_override, written_workers
from appliance.runtime.compose.models import publish as publish_catalogue
from appliance.runtime.protocol import (
    DEGRADED,
    DOWN,
    HEALTHY,
    BackupStep,
    Intro,
    ModelChange,
    ModelRow,
    Restarted,
    Scaled,
    ServiceRow,
    Started,
    Status,
)
from appliance.runtime.settings import RuntimeSettings

if TYPE_CHECKING:
    from appliance.backup.service import BackupResult, RestoreResult
    from appliance.core.model_settings import ModelConfig

__all__ = ["DATA_DIRS", "PROJECT", "ComposeRuntime", "worker_index"]

REPO = Path(__file__).resolve().parents[3]
PROJECT = "llm-appliance"
CONTAINER_UID = 10001
# Directories the containers write (owned by APPLIANCE_UID), and the read-only models folder.
DATA_DIRS = ("redis", "rag", "gateway", "prometheus", "alertmanager")
_WORKER = re.compile(r"^inference-(\d+)$")

Log = Callable[[str], None]


def worker_index(service: str) -> int | None:
    match = _WORKER.match(service)
    return int(match.group(1)) if match else None


def _quiet(_message: str) -> None:
    return None


def _dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key and not key.startswith("#"):
                values[key.strip()] = value.strip().strip("'\"")
    return values


@dataclass
class ComposeRuntime:
    settings: RuntimeSettings
    log: Log = _quiet
    engine: Engine | None = None
    project: str = field(default_factory=lambda: os.environ.get("COMPOSE_PROJECT_NAME", PROJECT))
    stopped_note = " (containers and networks removed; the data stays)"
    schedules_backups = False  # cron runs `appliance backup --runtime compose`; nothing here repeats it

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def docker(self) -> Engine:
        if self.engine is None:
            self.engine = find_engine()
        return self.engine

    @property
    def compose_file(self) -> Path:
        path = self.settings.compose_file
        if not path.is_absolute() and not path.exists():
            path = REPO / path
        if not path.is_file():
            raise EngineError(f"no compose file at {path} (set APPLIANCE_RUNTIME_COMPOSE_FILE)")
        return path.resolve()

    def _dotenv(self) -> dict[str, str]:
        return _dotenv(self.compose_file.parent / ".env")

    def files(self) -> list[Path]:
        """COMPOSE_FILE (environment, else .env) when set, e.g. compose.yaml:compose.gpu.yaml; else compose.yaml."""
        listed = os.environ.get("COMPOSE_FILE") or self._dotenv().get("COMPOSE_FILE", "")
        base = self.compose_file.parent
        names = [n for n in listed.split(os.pathsep) if n]
        files = [(base / n).resolve() for n in names] if names else [self.compose_file]
        generated = override_path(self)  # several models: each worker service's model (compose/models.py)
        return [*files, generated] if generated.is_file() else files

    def defined_workers(self) -> int:
        """How many worker services the compose files themselves define (without the generated one)."""
        files = [f for f in self.files() if f != override_path(self)]
        listed = self.docker.compose_run(files, self.project, "config", "--services", env=self.env()).stdout or ""
        return sum(1 for s in listed.split() if worker_index(s) is not None)

    @property
    def cpu_profile(self) -> bool:
        return self.files() == [self.compose_file]

    def data_path(self) -> Path:
        return self.settings.data_dir.resolve()

    def uid_gid(self) -> tuple[int, int]:
        """The containers' user: the caller's own, or 10001 when the caller is root (the data is chowned)."""
        uid, gid = os.getuid(), os.getgid()
        return (CONTAINER_UID, CONTAINER_UID) if uid == 0 else (uid, gid)

    def env(self) -> dict[str, str]:
        uid, gid = self.uid_gid()
        values = {
            "APPLIANCE_DATA_PATH": str(self.data_path()),
            "APPLIANCE_UID": str(uid),
            "APPLIANCE_GID": str(gid),
            "APPLIANCE_GATEWAY_BIND": self.settings.gateway_host,
            "APPLIANCE_GATEWAY_PUBLISH": str(self.settings.gateway_port),
            "APPLIANCE_PROMETHEUS_PUBLISH": str(self.settings.prometheus_port),
        }
        if not os.environ.get("APPLIANCE_INTERNAL_TOKEN") and not self._dotenv().get("APPLIANCE_INTERNAL_TOKEN"):
            values["APPLIANCE_INTERNAL_TOKEN"] = self.settings.resolved_internal_token()
        return values

    def compose(self, *args: str, capture: bool = True, check: bool = True, timeout: float | None = None) -> str:
        result = self.docker.compose_run(
            self.files(), self.project, *args, env=self.env(), capture=capture, check=check, timeout=timeout
        )
        return result.stdout or ""

    def services(self) -> list[str]:
        return [s for s in self.compose("config", "--services").split() if s]

    def workers(self) -> list[str]:
        found = [s for s in self.services() if worker_index(s) is not None]
        return sorted(found, key=lambda s: worker_index(s) or 0)

    def worker_count(self) -> int:
        """The planned workers: one per resident worker and swap host with several models, else the scale."""
        return len(written_workers(self)) or self.settings.workers

    def wanted(self) -> list[str]:
        """Every service but the workers past the remembered scale (or the model plan's workers)."""
        count = self.worker_count()
        return [s for s in self.services() if (worker_index(s) or 0) <= count]

    def containers(self) -> dict[str, dict[str, Any]]:
        """service -> its container's `docker inspect` (one container per service in this design)."""
        ids = self.docker.run("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}").stdout
        found: dict[str, dict[str, Any]] = {}
        for info in self.docker.inspect(*ids.split()):
            service = info.get("Config", {}).get("Labels", {}).get("com.docker.compose.service")
            if service:
                found[service] = info
        return found

    # -- data and images --------------------------------------------------------------------------

    def prepare_data(self) -> None:
        data = self.data_path()
        (data / "models").mkdir(parents=True, exist_ok=True)
        (data / "run").mkdir(parents=True, exist_ok=True)
        uid, gid = self.uid_gid()
        # The Redis users' passwords and ACL file, mounted as secrets: 0600, so they must be the containers'.
        secrets_dir = ensure_redis_users(data).parent
        if os.getuid() == 0:
            for item in [secrets_dir, *secrets_dir.iterdir()]:
                os.lchown(item, uid, gid)
        # models too: the workers (uid 10001) read the operator's GGUF files (and restored ones), written 0600 here.
        for name in (*DATA_DIRS, "models"):
            path = data / name
            path.mkdir(parents=True, exist_ok=True)
            if os.getuid() == 0:
                for item in [path, *path.rglob("*")]:
                    with contextlib.suppress(FileNotFoundError):
                        os.lchown(item, uid, gid)

    def image(self, name: str) -> str:
        """The tag compose.yaml gives image ``name`` (APPLIANCE_IMAGE_PREFIX, APPLIANCE_VERSION: environment, .env)."""
        prefix = os.environ.get("APPLIANCE_IMAGE_PREFIX") or self._dotenv().get(
            "APPLIANCE_IMAGE_PREFIX", "llm-appliance"
        )
        version = os.environ.get("APPLIANCE_VERSION") or self._dotenv().get("APPLIANCE_VERSION", "latest")
        return image_name(name, prefix, version)

    def missing_images(self) -> list[str]:
        return [name for name in [*PYTHON_IMAGES, *DEBIAN_IMAGES] if not self.docker.image_exists(self.image(name))]

    def build(self, only: list[str] | None = None) -> dict[str, Any]:
        if not self.cpu_profile:
            self.compose("build", *(only or []), capture=False)
            return {}
        report = build_images(self.docker, self.log, only=only)
        return {"seconds": report.seconds, "sizes": report.sizes}

    # -- verbs ------------------------------------------------------------------------------------

    def check_ports(self) -> None:
        """A clear error before compose's own when a published port is taken by something else (a port this
        project's own running container publishes is not: restore stops only gateway, RAG and Redis, then
        brings the stack up while Prometheus still holds its port)."""
        running = self.containers()
        for port, what in ((self.settings.gateway_port, "gateway"), (self.settings.prometheus_port, "prometheus")):
            if running.get(what, {}).get("State", {}).get("Running"):
                continue
            host = self.settings.gateway_host if what == "gateway" else "127.0.0.1"
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, port))
                except OSError:
                    raise EngineError(
                        f"port {port} on {host} is already taken, so the {what} cannot be published there: "
                        f"stop what listens on it or choose another (APPLIANCE_RUNTIME_"
                        f"{'GATEWAY' if what == 'gateway' else 'PROMETHEUS'}_PORT)"
                    ) from None

    def finish_interrupted_restore(self) -> list[str]:
        """Roll forward a restore killed after its commit point (drop one killed before it), as the local
        runtime's `up` does, before Redis starts on half-swapped data; the parts rolled forward."""
        from appliance.backup.restore import recover_interrupted_restore  # (backup imports the runtime)

        finished = recover_interrupted_restore(self.data_path())
        if finished:
            self.log(f"finished an interrupted restore: {', '.join(finished)}")
        return finished

    def intro(self) -> Intro:
        return Intro("Starting the appliance on Docker", f"project {self.project}, data in {self.data_path()}")

    def up(self, build: bool = False) -> Started:
        """Build what is missing, start in dependency order, wait until healthy and the gateway ready."""
        healthy_in = self.start_containers(build)
        return Started(
            chat_ui=f"{self.gateway_url}/",
            openai_base_url=f"{self.gateway_url}/v1",
            admin_key_file=self.admin_key_file,
            healthy_in_s=healthy_in,
        )

    def start_containers(self, build: bool = False) -> float:
        """Build what is missing, start in dependency order, wait until healthy; seconds to healthy."""
        self.finish_interrupted_restore()
        self.prepare_data()
        models = compose_model_plan(self)
        write_override(self, models, self.defined_workers())
        workers = self.workers()
        if self.worker_count() > len(workers):
            raise EngineError(self._scale_limit(len(workers)))
        missing = self.missing_images()
        if build or missing:
            self.build(None if build else missing)
        self.check_ports()
        started = time.monotonic()
        self.compose("up", "-d", "redis")  # the catalogue is in Redis before any worker starts (contract C1)
        self.wait_healthy(["redis"])
        publish_catalogue(self, models)
        wanted = self.wanted()
        self.compose("up", "-d", "--remove-orphans", *wanted)
        extra = [w for w in workers if w not in wanted]
        if extra:
            self.compose("stop", "-t", "90", *extra)
        self.wait_healthy(wanted)
        self.wait_gateway_ready()
        return round(time.monotonic() - started, 1)

    def _scale_limit(self, defined: int) -> str:
        return (
            f"compose.yaml defines {defined} worker services (inference-1..{defined}); each pins its own GPU "
            "and advertises its own name, so compose's --scale cannot add identical replicas. Add an "
            "inference-K service to the compose file, or use the local runtime or Kubernetes for more."
        )

    def wait_healthy(self, services: list[str], timeout: float | None = None) -> None:
        limit = timeout or max(self.settings.ready_timeout_s, 600.0)
        deadline = time.monotonic() + limit
        pending = list(services)
        baseline: dict[str, int] = {}
        while pending:
            containers = self.containers()
            for service in list(pending):
                info = containers.get(service)
                if info is None:
                    continue
                state = info.get("State", {})
                health = (state.get("Health") or {}).get("Status")
                count = int(info.get("RestartCount") or 0)
                restarts = count - baseline.setdefault(service, count)
                if restarts >= 3:
                    raise EngineError(f"{service} keeps restarting ({restarts} times): {self.tail(service)}")
                if state.get("Running") and health in (None, "healthy"):
                    pending.remove(service)
                    self.log(f"ready     {service}")
                elif (
                    state.get("Status") == "exited"
                    and info.get("HostConfig", {}).get("RestartPolicy", {}).get("Name") == "no"
                ):
                    raise EngineError(f"{service} exited ({state.get('ExitCode')}): {self.tail(service)}")
            if not pending:
                return
            if time.monotonic() > deadline:
                details = "; ".join(f"{s}: {self.tail(s)}" for s in pending)
                raise EngineError(f"not healthy after {limit:.0f} s: {', '.join(pending)} ({details})")
            time.sleep(1.0)

    def tail(self, service: str, lines: int = 3) -> str:
        text = self.compose("logs", "--no-color", "--tail", str(lines), service, check=False)
        return " | ".join(line.split("|", 1)[-1].strip() for line in text.strip().splitlines()[-lines:])

    @property
    def gateway_url(self) -> str:
        host = "127.0.0.1" if self.settings.gateway_host in ("0.0.0.0", "::", "") else self.settings.gateway_host  # noqa: S104
        scheme = "https" if self.settings.tls else "http"
        return f"{scheme}://{host}:{self.settings.gateway_port}"

    def gateway_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.gateway_url}/readyz", timeout=5) as response:  # noqa: S310
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_gateway_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.gateway_ready():
            if time.monotonic() > deadline:
                raise EngineError(
                    f"the gateway is healthy but {self.gateway_url}/readyz did not answer 200 within {timeout:.0f} s"
                )
            time.sleep(1.0)

    def status(self) -> Status:
        """The containers' table and the gateway's readiness under it; an engine failure above it."""
        code, report = self.report()
        rows = tuple(
            ServiceRow(
                s["name"],
                s["healthy"],
                {
                    "state": s["state"],
                    "health": "ok" if s["healthy"] else str(s["health"]),
                    "restarts": str(s["restarts"]),
                    "uptime": f"{s['uptime_s']}s",
                    "container": s["container"] or "-",
                },
            )
            for s in report["services"]
        )
        gateway = report.get("gateway")
        return Status(
            code,
            report,
            ("state", "health", "restarts", "uptime", "container"),
            rows,
            errors=(report["error"],) if report.get("error") else (),
            lines=(
                *((f"  gateway {gateway['url']}: ready={gateway['ready']}",) if gateway else ()),
                *(f"  model {m['model']}: {m['resident']}, state={m['state']}, workers={','.join(m['workers']) or '-'}"
                  f", memory per worker={human_bytes(m['memory_bytes'])}" for m in report.get("models", [])),
            ),
        )

    def _models(self) -> list[dict[str, Any]]:
        """Each servable model as the gateway lists it (the balancer's state, contract C3)."""
        from appliance.runtime.compose.model_verbs import gateway_models

        return [{"model": name, "state": str(m.get("state", "loaded")), "resident": str(m.get("resident", "always")),
                 "workers": [str(w) for w in m.get("workers") or []], "memory_bytes": int(m.get("memory_bytes") or 0)}
                for name, m in gateway_models(self).items()]

    def report(self) -> tuple[int, dict[str, Any]]:
        """0 healthy, 1 degraded, 2 down: container health plus the gateway's own /readyz."""
        try:
            wanted = self.wanted()
            containers = self.containers()
        except EngineError as exc:
            return DOWN, {"runtime": "compose", "state": "down", "error": str(exc), "services": []}
        now = datetime.now(UTC)
        services = []
        for name in wanted:
            info = containers.get(name)
            state = (info or {}).get("State", {})
            health = (state.get("Health") or {}).get("Status") or ("none" if info else "missing")
            started = state.get("StartedAt")
            uptime = 0.0
            if state.get("Running") and started:
                with contextlib.suppress(ValueError):
                    uptime = (now - datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00")).total_seconds()
            services.append(
                {
                    "name": name,
                    "state": state.get("Status", "missing"),
                    "health": health,
                    "healthy": bool(state.get("Running")) and health in ("healthy", "none"),
                    "restarts": (info or {}).get("RestartCount", 0),
                    "uptime_s": round(uptime),
                    "container": (info or {}).get("Name", "").lstrip("/") or None,
                    "image": (info or {}).get("Config", {}).get("Image"),
                }
            )
        ready = self.gateway_ready() if any(s["healthy"] for s in services if s["name"] == "gateway") else False
        workers = [s for s in services if worker_index(s["name"]) is not None]
        report: dict[str, Any] = {
            "runtime": "compose",
            "project": self.project,
            "files": [str(f) for f in self.files()],
            "services": services,
            "workers": [{"name": w["name"], "healthy": w["healthy"]} for w in workers],
            "gateway": {"url": self.gateway_url, "ready": ready},
            "models": self._models() if ready else [],
        }
        if not containers:
            code = DOWN
        elif all(s["healthy"] for s in services) and ready:
            code = HEALTHY
        elif ready and any(w["healthy"] for w in workers):
            code = DEGRADED
        else:
            code = DOWN
        report["state"] = {HEALTHY: "healthy", DEGRADED: "degraded", DOWN: "down"}[code]
        return code, report

    def restart(self, service: str | None, *, allow_outage: bool = False) -> Restarted:
        names = self.restart_one_at_a_time(service)
        return Restarted(names, "Restarted one at a time", when_none="nothing was running")

    def restart_one_at_a_time(self, service: str | None) -> list[str]:
        """Workers one at a time (each stops gracefully, so it withdraws and drains first), then the rest."""
        known = self.wanted()
        if service is not None and service != "inference" and service not in known:
            raise EngineError(f"unknown service {service!r}; known: inference, {', '.join(known)}")
        running = set(self.containers())
        if service in (None, "inference"):
            names = [w for w in known if worker_index(w) is not None and w in running]
        else:
            names = [service]
        if service is None:
            names += [s for s in ("balancer", "rag", "gateway") if s in known]
        for name in names:
            self.log(f"restarting {name}")
            self.compose("restart", "-t", "90", name)
            self.wait_healthy([name])
        return names

    def scale(self, count: int) -> Scaled:
        """Start or stop the worker services compose.yaml defines (each pins its own GPU: no --scale)."""
        if written_workers(self):
            raise EngineError("with several models each one's workers are set per model ([[models.entry]] "
                              "workers, `appliance models add --workers N`); scale serves the single-model stack")
        workers = self.workers()
        if count > len(workers):
            raise EngineError(self._scale_limit(len(workers)))
        containers = self.containers()
        keep, drop = workers[:count], workers[count:]
        added = [w for w in keep if not containers.get(w, {}).get("State", {}).get("Running")]
        removed = [w for w in drop if containers.get(w, {}).get("State", {}).get("Running")]
        if added:
            self.compose("up", "-d", "--no-deps", *added)
            self.wait_healthy(added)
        if removed:
            self.compose("stop", "-t", "90", *removed)
        return Scaled(count, added, removed)

    def upgrade(self, *, allow_outage: bool = False) -> list[str]:
        raise EngineError(
            "`appliance upgrade` replaces the local runtime's processes; on compose rebuild the images "
            "(`appliance images build`) and run `appliance up --runtime compose`, which recreates what changed"
        )

    def logs(self, service: str, *, follow: bool = False, lines: int = 100) -> None:
        known = self.services()
        if service not in known:
            raise EngineError(f"no service {service!r}; known: {', '.join(known)}")
        with contextlib.suppress(KeyboardInterrupt):
            self.compose(
                "logs", "--no-color", "--tail", str(lines), *(["-f"] if follow else []), service, capture=False
            )

    def down(self) -> bool:
        """Stop and remove every container and network of the project; True if something was running."""
        had = bool(self.containers())
        self.compose("down", "--timeout", "90", "--remove-orphans")
        left = self.containers()
        if left:
            raise EngineError(f"containers left after down: {', '.join(left)}")
        return had

    def exec(self, service: str, *argv: str) -> str:
        container = self.containers().get(service)
        if container is None or not container.get("State", {}).get("Running"):
            raise EngineError(f"{service} is not running (appliance up --runtime compose)")
        return self.docker.run("exec", container["Id"], *argv).stdout

    @property
    def admin_key_file(self) -> Path:
        return self.data_path() / "gateway" / "admin_key"

    def backup(
        self, to: Path | None, *, with_models: bool, keep: int, offsite: Path | None, step: BackupStep
    ) -> BackupResult:
        """Redis through `docker exec`, the RAG store and secrets from the data volume (``keep`` is the local
        runtime's rotation; archives here are kept until removed)."""
        from appliance.runtime.compose.backup import compose_backup  # (it imports this module)

        if offsite is not None:
            raise EngineError("--offsite is for the local runtime; on compose copy the archive yourself")
        return compose_backup(self, to, with_models=with_models, step=step)

    def models(self) -> list[ModelRow]:
        from appliance.runtime.compose.model_verbs import list_models

        return list_models(self)

    def add_model(self, config: ModelConfig) -> ModelChange:
        from appliance.runtime.compose.model_verbs import add_model

        return add_model(self, config)

    def remove_model(self, alias: str) -> ModelChange:
        from appliance.runtime.compose.model_verbs import remove_model

        return remove_model(self, alias)

    def pin_model(self, alias: str, pinned: bool) -> ModelChange:
        from appliance.runtime.compose.model_verbs import pin_model

        return pin_model(self, alias, pinned)

    def restore(
        self, archive: Path, *, dry_run: bool, key_file: Path | None, allow_unsigned: bool
    ) -> RestoreResult:
        from appliance.runtime.compose.backup import compose_restore

        return compose_restore(self, archive, dry_run=dry_run, key_file=key_file, allow_unsigned=allow_unsigned)
