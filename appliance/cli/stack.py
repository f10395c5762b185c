"""Stack verbs: up, down, status, restart, scale, logs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from appliance.cli.context import load, runtime
from appliance.cli.output import err, fail, out, print_json
from appliance.runtime.compose import ComposeRuntime
from appliance.runtime.local import RuntimeFailure
from appliance.runtime.rolling import rolling_restart, scale_workers
from appliance.runtime.settings import RuntimeSettings
from appliance.runtime.status import collect_status

__all__ = ["register"]

Runtime = Annotated[str | None, typer.Option("--runtime", help="local (default) or compose")]


def _scale_file(settings: RuntimeSettings) -> Path:
    return settings.run_dir / "scale.json"


def _settings(workers: int | None = None, runtime_name: str | None = None, **extra: Any) -> RuntimeSettings:
    settings = load(runtime=runtime_name, **extra)
    path = _scale_file(settings)
    if workers is None and path.is_file():
        workers = int(json.loads(path.read_text())["workers"])
    return settings.model_copy(update={"workers": workers}) if workers else settings


def _remember_scale(settings: RuntimeSettings) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    _scale_file(settings).write_text(json.dumps({"workers": settings.workers}))


def up(
    workers: Annotated[int | None, typer.Option(help="number of inference workers")] = None,
    model: Annotated[Path | None, typer.Option(help="GGUF model file (default: the bundled Gemma 3 270M)")] = None,
    tls: Annotated[bool, typer.Option(help="serve HTTPS with a self-signed certificate")] = False,
    runtime_name: Runtime = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Start every service in dependency order and wait until all are ready."""
    settings = _settings(workers, runtime_name, model_path=model, tls=tls or None)
    if settings.runtime == "compose":
        ComposeRuntime(settings).up()
        return
    started = time.monotonic()
    err.print(f"[bold]Starting the appliance[/] ({settings.workers} workers, data in {settings.data_dir})")
    try:
        runtime(settings).up()
    except RuntimeFailure as exc:
        fail(str(exc))
    _remember_scale(settings)
    scheme = "https" if settings.tls else "http"
    base = f"{scheme}://{settings.gateway_host}:{settings.gateway_port}"
    info = {"chat_ui": f"{base}/", "openai_base_url": f"{base}/v1",
            "admin_key_file": str(settings.data_dir / "admin_key"), "ready_in_s": round(time.monotonic() - started, 1)}
    if as_json:
        print_json(info)
        return
    err.print(f"[green]Ready[/] in {info['ready_in_s']} s.")
    out.print(f"Chat UI:          {info['chat_ui']}\nOpenAI base URL:  {info['openai_base_url']}")
    _show_admin_key_once(settings)


def _show_admin_key_once(settings: RuntimeSettings) -> None:
    key_file, shown = settings.data_dir / "admin_key", settings.run_dir / "admin_key.shown"
    if key_file.is_file() and not shown.exists():
        out.print(f"Admin API key:    {key_file.read_text().strip()}  (shown once; kept in {key_file}, mode 0600)")
        shown.touch()
    else:
        out.print(f"Admin API key:    in {key_file}")


def down(runtime_name: Runtime = None) -> None:
    """Drain and stop everything, leaving no process behind."""
    settings = _settings(runtime_name=runtime_name)
    if settings.runtime == "compose":
        ComposeRuntime(settings).down()
        return
    try:
        stopped = runtime(settings).down()
    except RuntimeFailure as exc:
        fail(str(exc))
    err.print("[green]Stopped.[/]" if stopped else "Nothing was running.")


def status(as_json: Annotated[bool, typer.Option("--json")] = False, runtime_name: Runtime = None) -> None:
    """Every service, worker, Redis, RAG, GPU and the cache. Exit 0 healthy, 1 degraded, 2 down."""
    settings = _settings(runtime_name=runtime_name)
    if settings.runtime == "compose":
        raise typer.Exit(ComposeRuntime(settings).status())
    code, report = collect_status(runtime(settings))
    if as_json:
        print_json(report)
    else:
        _print_status(report)
    raise typer.Exit(code)


def _print_status(report: dict[str, Any]) -> None:
    table = Table("service", "state", "pid", "uptime", "restarts", "health", title=f"appliance: {report['state']}")
    for s in report["services"]:
        health = "[green]ok[/]" if s["healthy"] else f"[red]{s['health']}[/]"
        table.add_row(s["name"], s["state"], str(s["pid"] or "-"), f"{s['uptime_s']}s", str(s["restarts"]), health)
    out.print(table)
    for w in report.get("workers", []):
        out.print(f"  {w['name']}: model={w.get('model')} slots={w.get('slots_busy')}/{w.get('slots_total')} "
                  f"queue={w.get('queue_depth')}")
    redis_info, rag, gpu = report.get("redis") or {}, report.get("rag") or {}, report.get("gpu") or {}
    out.print(f"  redis: up={redis_info.get('up')} memory={redis_info.get('used_memory_human')} "
              f"last_save={redis_info.get('last_save')}")
    if rag:
        out.print(f"  rag: up={rag.get('up')} collections={rag.get('collections')} documents={rag.get('documents')}")
    out.print(f"  gpu: {gpu.get('gpus') if gpu.get('present') else 'none'}")
    out.print(f"  cache hit rate: {report.get('cache_hit_rate')}")


def restart(service: Annotated[str | None, typer.Argument(help="a service, or 'inference' for all workers")] = None,
            runtime_name: Runtime = None) -> None:
    """Restart a service; workers restart one at a time (drained, restarted, readmitted)."""
    settings = _settings(runtime_name=runtime_name)
    if settings.runtime == "compose":
        ComposeRuntime(settings).restart(service)
        return
    rt = runtime(settings)
    try:
        if service in (None, "inference"):
            try:
                names = rolling_restart(rt)
            except httpx.HTTPError as exc:
                fail(f"the balancer's admin API failed during the rolling restart ({exc})")
            err.print(f"[green]Rolling restart done[/]: {', '.join(names)}")
            if service is None:
                for other in ("gateway", "balancer", "rag"):
                    rt.supervisor.stop(other)
                rt.up()
            return
        known = {info["name"] for info in rt.supervisor.processes()}
        if service not in known:
            fail(f"unknown service {service!r}; known: {', '.join(sorted(known))}")
        rt.supervisor.stop(service)
        rt.up()
    except RuntimeFailure as exc:
        fail(str(exc))


def scale(spec: Annotated[str, typer.Argument(help="inference=N")]) -> None:
    """Add or remove inference workers live."""
    name, _, value = spec.partition("=")
    if name != "inference" or not value.isdigit() or not 1 <= int(value) <= 64:
        fail("expected inference=N with N between 1 and 64")
    settings = _settings()
    try:
        added, removed = scale_workers(runtime(settings), int(value))
    except httpx.HTTPError as exc:
        fail(f"the balancer's admin API failed while scaling ({exc})")
    except RuntimeFailure as exc:
        fail(str(exc))
    _remember_scale(settings.model_copy(update={"workers": int(value)}))
    err.print(f"[green]Scaled to {value} workers[/] (added: {added or 'none'}, removed: {removed or 'none'})")


def logs(service: str, follow: Annotated[bool, typer.Option("-f", "--follow")] = False,
         lines: Annotated[int, typer.Option("-n", "--lines")] = 100) -> None:
    """Show a service's log (last lines; -f to follow)."""
    settings = _settings()
    path = settings.log_dir / f"{service}.log"
    if not path.is_file():
        available = sorted(p.stem for p in settings.log_dir.glob("*.log"))
        fail(f"no log for {service!r}; available: {', '.join(available) or 'none (is the stack up?)'}")
    argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), str(path)]
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(argv, check=False)  # noqa: S603 - fixed argv


def register(app: typer.Typer) -> None:
    for command in (up, down, status, restart, scale, logs):
        app.command()(command)
