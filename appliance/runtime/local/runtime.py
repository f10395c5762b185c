"""The local runtime: every service a process under supervisord, started in dependency order.

:class:`LocalRuntime` carries the stack verbs of :class:`appliance.runtime.protocol.Runtime` on this host;
rolling restarts and scaling live in ``rolling``, the gap-free upgrade in ``upgrade``, `status` in ``status``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from appliance.core.entry import CONFIG_ERROR_EXIT
from appliance.core.files import make_private
from appliance.core.model_files import DEFAULT_MODEL_ALIAS, default_model_path, prepare_default_model
from appliance.core.redis_auth import ensure_redis_users
from appliance.core.settings import ConfigError, load_settings
from appliance.runtime.local.catalogue import publish
from appliance.runtime.local.health import Probe, probe_http, probe_redis
from appliance.runtime.local.models import add_model, list_models, pin_model, remove_model
from appliance.runtime.local.prometheus_conf import WORKER_TARGETS_FILE, render_prometheus_conf, render_worker_targets
from appliance.runtime.local.rolling import rolling_restart, scale_workers
from appliance.runtime.local.status import status_of
from appliance.runtime.local.supervisor_client import SupervisorClient
from appliance.runtime.local.supervisor_conf import render_supervisor_conf, socket_path
from appliance.runtime.local.upgrade import upgrade as upgrade_stack
from appliance.runtime.models import ModelPlan, catalogue_plan
from appliance.runtime.plan import (
    DRAIN_MARGIN_S,
    STAGES,
    STANDBY_SUFFIX,
    WORKER_WITHDRAW_S,
    Program,
    build_plan,
    lan_addresses,
)
from appliance.runtime.protocol import (
    BackupStep,
    Intro,
    ModelChange,
    ModelRow,
    Restarted,
    RuntimeFailure,
    Scaled,
    Started,
    Status,
)
from appliance.runtime.settings import LOOPBACK_HOSTS, RuntimeSettings, WorkerModelView

if TYPE_CHECKING:
    from appliance.backup.service import BackupResult, RestoreResult
    from appliance.core.model_settings import ModelConfig

__all__ = ["LocalRuntime", "Progress"]

REPO = Path(__file__).resolve().parents[3]
# (program name, state, detail) — states: starting, ready, failed, stopping, stopped
Progress = Callable[[str, str, str], None]
_STOPPED_STATES = frozenset({"STOPPED", "EXITED", "FATAL"})
# What appliance.core.entry.load_or_exit writes before exiting with CONFIG_ERROR_EXIT.
_CONFIG_ERROR_LINE = re.compile(r"^\S+: invalid \S+ configuration:", re.MULTILINE)


def _quiet(_name: str, _state: str, _detail: str) -> None:
    return None


def _atomic_write(path: Path, text: str, mode: int = 0o600) -> bool:
    """Write if the content changed; returns whether it did."""
    if path.is_file() and path.read_text() == text:
        return False
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return True


@dataclass
class LocalRuntime:
    settings: RuntimeSettings
    progress: Progress = _quiet
    stopped_note = ""
    schedules_backups = True  # supervisord runs `appliance backup --every` beside the services

    @property
    def supervisor(self) -> SupervisorClient:
        return SupervisorClient(socket_path(self.settings.run_dir))

    def served_model(self) -> RuntimeSettings:
        """The settings with the model resolved: `up --model/--served-name/--slots` over ``[worker]``.

        A model file without an alias is served under its file name (without ``.gguf``).
        """
        settings = self.settings
        try:
            view = load_settings(WorkerModelView)
        except ConfigError as exc:
            raise RuntimeFailure(str(exc)) from None
        path = settings.model_path or (Path(view.model_path) if view.model_path else None)
        if path is None:
            path = default_model_path(settings.data_dir)
            alias = settings.model_alias or view.model_alias
        else:
            if not path.is_file():
                source = "--model" if settings.model_path else "[worker] model_path"
                raise RuntimeFailure(f"model file {path} (from {source}) does not exist")
            path = path.resolve()
            named = settings.model_alias or ("model_alias" in view.model_fields_set and view.model_alias)
            alias = named or (path.stem if path != default_model_path(settings.data_dir).resolve() else "")
        return settings.model_copy(
            update={
                "model_path": path,
                "model_alias": alias or DEFAULT_MODEL_ALIAS,
                "worker_slots": settings.worker_slots or view.slots,
            }
        )

    def served_path(self, served: RuntimeSettings) -> Path:
        path = served.model_path or default_model_path(self.settings.data_dir)
        if path == default_model_path(self.settings.data_dir):
            path = prepare_default_model(self.settings.data_dir)  # assembled once; a hash check afterwards
        return path.resolve()

    def model_plan(self) -> ModelPlan | None:
        """The catalogue's plan when it has several models ([[models.entry]] or `appliance models add`); None for
        the single model of ``[worker]``, whose workers run exactly as before."""
        served = self.served_model()
        return catalogue_plan(self.settings, served, self.served_path(served))

    def plan(self) -> list[Program]:
        served = self.served_model()
        path = self.served_path(served)
        models = catalogue_plan(self.settings, served, path)
        if models is not None and not models.legacy:
            return build_plan(served, path, models.roles)
        return build_plan(served, path)

    # -- up -----------------------------------------------------------------------------------
    def intro(self) -> Intro:
        """What `up` will start; with several models each one's workers and the memory arithmetic (a catalogue
        that does not fit is refused here, before anything starts)."""
        served = self.served_model()
        models = self.model_plan()
        if models is None or models.legacy:
            return Intro(
                "Starting the appliance",
                f"{self.settings.workers} workers, data in {self.settings.data_dir}",
                (f"model: {served.model_alias} ({served.model_path})",),
            )
        notes = [f"model {e.alias}: {e.resident}, {e.workers if e.resident == 'always' else 'swap hosts'} ({e.path})"
                 for e in models.entries]
        return Intro("Starting the appliance", f"{len(models.roles)} workers, {len(models.entries)} models, data in "
                     f"{self.settings.data_dir}", (*notes, *models.fit.lines))

    def up(self) -> Started:
        self.start_missing()
        settings = self.settings
        scheme, port, host = settings.scheme, settings.gateway_port, settings.gateway_host
        if host in LOOPBACK_HOSTS:
            lan: tuple[str, ...] = ()
        elif host in ("0.0.0.0", "::"):  # noqa: S104 - comparing names
            lan = tuple(f"{scheme}://{address}:{port}/" for address in lan_addresses())
        else:
            lan = (f"{scheme}://{host}:{port}/",)
        base = settings.gateway_local_url
        return Started(
            chat_ui=f"{base}/",
            openai_base_url=f"{base}/v1",
            admin_key_file=settings.data_dir / "admin_key",
            model=self.served_model().model_alias,
            listen=f"{host}:{port}",
            lan_urls=lan,
        )

    def start_missing(self) -> list[Program]:
        """Start whatever is not running; a second call on a running stack changes nothing."""
        from appliance.backup.restore import recover_interrupted_restore  # (backup imports the runtime)

        recover_interrupted_restore(self.settings.data_dir)  # a restore killed mid-swap finishes before Redis starts
        plan = self.plan()
        self.write_files(plan)
        client = self.supervisor
        if not client.alive():
            self._start_supervisord()
        else:
            self._apply_config_changes(client)
        for stage in STAGES:
            programs = [p for p in plan if p.stage == stage and not p.standby]
            for program in programs:
                if client.process(program.name)["statename"] != "RUNNING":
                    self.progress(program.name, "starting", "")
                    client.start(program.name, wait=False)
            for program in programs:
                self.wait_ready(program)
            if stage == "redis":  # before any worker starts: swap hosts load their entries from it
                self.publish_catalogue()
        return plan

    def publish_catalogue(self) -> list[str]:
        """Write the catalogue to Redis (contract C1), dropping entries no longer configured; the aliases."""
        served = self.served_model()
        models = catalogue_plan(self.settings, served, self.served_path(served))
        entries = list(models.entries) if models is not None else []
        publish(self.settings, entries)
        return [e.alias for e in entries]

    def write_files(self, plan: list[Program]) -> None:
        settings = self.settings
        for sub in ("run", "logs", "redis", "rag", "models", "backups", "prometheus"):
            (settings.data_dir / sub).mkdir(parents=True, exist_ok=True)
        conf = render_supervisor_conf(plan, settings.run_dir.resolve(), settings.log_dir.resolve(), REPO)
        _atomic_write(settings.run_dir / "supervisord.conf", conf)
        # Prometheus scrapes every planned worker (with several models their count is the model plan's).
        scraped = settings.model_copy(update={"workers": sum(p.stage == "inference" for p in plan) or settings.workers})
        _atomic_write(settings.run_dir / "prometheus.yml", render_prometheus_conf(scraped, REPO))
        _atomic_write(settings.run_dir / WORKER_TARGETS_FILE, render_worker_targets(scraped))
        settings.resolved_internal_token()  # created once here so every service reads the same file
        make_private(settings.data_dir)  # 0700/0600 whatever an older version, a copy or a restore left
        ensure_redis_users(settings.data_dir)  # one password per service; redis-server loads the ACL file

    def _start_supervisord(self) -> None:
        conf = self.settings.run_dir / "supervisord.conf"
        stale = socket_path(self.settings.run_dir)
        stale.unlink(missing_ok=True)
        subprocess.run(  # noqa: S603 - fixed argv, our own config file
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf.resolve())],
            check=True,
            cwd=REPO,
            timeout=30,
        )
        deadline = time.monotonic() + 15
        while not self.supervisor.alive():
            if time.monotonic() > deadline:
                raise RuntimeFailure("supervisord did not start; see data/logs/supervisord.log")
            time.sleep(0.1)

    def _apply_config_changes(self, client: SupervisorClient) -> None:
        added, changed, removed = client.reload_config()
        for name in removed + changed:
            self.progress(name, "stopping", "configuration changed")
            client.stop(name)
            client.remove_group(name)
        for name in changed + added:
            client.add_group(name)

    def probe(self, program: Program) -> Probe:
        if program.redis_port is not None:
            return probe_redis(program.redis_port)
        if program.health_url is None:
            return Probe(True)
        return probe_http(program.health_url)

    def wait_ready(self, program: Program) -> None:
        deadline = time.monotonic() + self.settings.ready_timeout_s
        last = Probe(False)
        while time.monotonic() < deadline:
            last = self.probe(program)
            if last.ok:
                self.progress(program.name, "ready", "")
                return
            info = self.supervisor.process(program.name)
            state = info["statename"]
            # supervisord records no exit status for an exit within startsecs (BACKOFF, then FATAL), so a
            # configuration error is also recognised by the message load_or_exit writes before exiting 2.
            if state in {"EXITED", "BACKOFF", "FATAL"} and (
                info.get("exitstatus") == CONFIG_ERROR_EXIT or _CONFIG_ERROR_LINE.search(self._log_tail(program.name))
            ):
                self.supervisor.stop(program.name)  # no more retries: the same configuration fails the same way
                self.progress(program.name, "failed", "configuration error")
                raise RuntimeFailure(f"{program.name} refused its configuration:\n{self._log_tail(program.name)}")
            if state == "FATAL":  # supervisord gave up restarting it: waiting longer cannot help
                self.progress(program.name, "failed", "exits at start")
                raise RuntimeFailure(f"{program.name} keeps exiting at start:\n{self._log_tail(program.name)}")
            detail = "loading" if last.status == 503 else (last.error or f"HTTP {last.status}")
            self.progress(program.name, "starting", detail)
            time.sleep(0.25)
        self.progress(program.name, "failed", last.error or f"HTTP {last.status}")
        log = self.settings.log_dir / f"{program.name}.log"
        raise RuntimeFailure(f"{program.name} did not become ready in {self.settings.ready_timeout_s:.0f}s; see {log}")

    def _log_tail(self, name: str, lines: int = 12) -> str:
        log = self.settings.log_dir / f"{name}.log"
        try:
            text = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {log})"
        return "\n".join(text)

    # -- down ---------------------------------------------------------------------------------
    def down(self, timeout: float = 60.0) -> bool:
        """Stop every program (reverse order) and supervisord; False if nothing was running."""
        client = self.supervisor
        if not client.alive():
            return False
        pid = client.pid()
        names = {info["name"] for info in client.processes()}
        for stage in reversed(STAGES):
            self.stop_together(self._names_in(stage, names))
        client.shutdown()
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            raise RuntimeFailure(f"supervisord (pid {pid}) did not exit in {timeout:.0f}s")
        return True

    def stop_together(self, names: list[str], timeout: float | None = None) -> None:
        """Stop programs in parallel (workers each withdraw and drain on SIGTERM: no need to queue them)."""
        if timeout is None:  # what supervisord itself may wait before SIGKILL, plus a margin
            timeout = self.settings.drain_s + WORKER_WITHDRAW_S + DRAIN_MARGIN_S + 30.0
        client = self.supervisor
        for name in names:
            self.progress(name, "stopping", "")
            client.stop(name, wait=False)
        deadline = time.monotonic() + timeout
        for name in names:
            while client.process(name)["statename"] not in _STOPPED_STATES:
                if time.monotonic() > deadline:
                    raise RuntimeFailure(f"{name} did not stop in {timeout:.0f}s")
                time.sleep(0.1)
            self.progress(name, "stopped", "")

    # -- the other verbs ----------------------------------------------------------------------------
    def status(self) -> Status:
        return status_of(self)

    def restart(self, service: str | None, *, allow_outage: bool = False) -> Restarted:
        """Workers roll one at a time (drained, restarted, readmitted); any other service stops and starts.

        With one worker a rolling restart would leave none serving: refused unless ``allow_outage``.
        """
        if service in (None, "inference"):
            try:
                names = rolling_restart(self, allow_outage=allow_outage)
            except httpx.HTTPError as exc:
                raise RuntimeFailure(f"the balancer's admin API failed during the rolling restart ({exc})") from None
            if service is None:
                for other in ("gateway", "balancer", "rag"):
                    self.supervisor.stop(other)
                self.start_missing()
            return Restarted(names, "Rolling restart done")
        known = {info["name"] for info in self.supervisor.processes()}
        if service not in known:
            raise RuntimeFailure(f"unknown service {service!r}; known: {', '.join(sorted(known))}")
        self.supervisor.stop(service)
        self.start_missing()
        return Restarted([service], None)

    def scale(self, count: int) -> Scaled:
        models = self.model_plan()
        if models is not None and not models.legacy:
            raise RuntimeFailure("with several models each one's workers are set per model ([[models.entry]] "
                                 "workers, `appliance models add --workers N`); scale serves the single-model stack")
        try:
            added, removed = scale_workers(self, count)
        except httpx.HTTPError as exc:
            raise RuntimeFailure(f"the balancer's admin API failed while scaling ({exc})") from None
        return Scaled(count, added, removed)

    def upgrade(self, *, allow_outage: bool = False) -> list[str]:
        try:
            return upgrade_stack(self, allow_outage=allow_outage)
        except httpx.HTTPError as exc:
            raise RuntimeFailure(f"the balancer's admin API failed during the upgrade ({exc})") from None

    def logs(self, service: str, *, follow: bool = False, lines: int = 100) -> None:
        log_dir = self.settings.log_dir
        path = log_dir / f"{service}.log"
        if not path.is_file():
            available = sorted(p.stem for p in log_dir.glob("*.log"))
            raise RuntimeFailure(
                f"no log for {service!r}; available: {', '.join(available) or 'none (is the stack up?)'}"
            )
        argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), str(path)]
        with contextlib.suppress(KeyboardInterrupt):
            subprocess.run(argv, check=False)  # noqa: S603 - fixed argv

    def backup(
        self, to: Path | None, *, with_models: bool, keep: int, offsite: Path | None, step: BackupStep
    ) -> BackupResult:
        from appliance.backup.service import create_backup  # (backup imports the runtime's settings)

        return create_backup(self.settings, to, with_models=with_models, keep=keep, offsite=offsite, step=step)

    def restore(
        self, archive: Path, *, dry_run: bool, key_file: Path | None, allow_unsigned: bool
    ) -> RestoreResult:
        """Verify, stop the services that hold the data, put it back, start them again (when running)."""
        from appliance.backup.service import restore_backup

        def stop(names: list[str]) -> None:
            if self.supervisor.alive():
                for name in names:
                    self.supervisor.stop(name)

        def start() -> None:
            if self.supervisor.alive():
                try:
                    self.start_missing()
                except RuntimeFailure as exc:
                    raise RuntimeFailure(f"restored the data but a service did not come back: {exc}") from None

        return restore_backup(
            self.settings,
            archive,
            key_file=key_file,
            allow_unsigned=allow_unsigned,
            dry_run=dry_run,
            stop=stop,
            start=start,
        )

    def models(self) -> list[ModelRow]:
        return list_models(self)

    def add_model(self, config: ModelConfig) -> ModelChange:
        return self._models_call(lambda: add_model(self, config))

    def remove_model(self, alias: str) -> ModelChange:
        return self._models_call(lambda: remove_model(self, alias))

    def pin_model(self, alias: str, pinned: bool) -> ModelChange:
        return self._models_call(lambda: pin_model(self, alias, pinned))

    @staticmethod
    def _models_call(change: Callable[[], ModelChange]) -> ModelChange:
        try:
            return change()
        except httpx.HTTPError as exc:
            raise RuntimeFailure(f"the balancer's admin API failed while moving workers ({exc})") from None

    @staticmethod
    def _names_in(stage: str, names: set[str]) -> list[str]:
        if stage == "inference":
            return sorted(n for n in names if n.startswith("inference-"))
        if stage == "observability":
            return sorted(n for n in names if n in {"prometheus", "gpu-exporter"})
        if stage == "maintenance":
            return ["backup"] if "backup" in names else []
        return [n for n in (stage, stage + STANDBY_SUFFIX) if n in names]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
