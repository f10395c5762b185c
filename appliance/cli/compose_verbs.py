"""The stack verbs for `--runtime compose` (called from appliance/cli/stack.py) and `appliance images`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from appliance.cli.output import err, fail, out, print_json
from appliance.runtime.compose import ComposeRuntime
from appliance.runtime.compose_engine import find_engine
from appliance.runtime.compose_images import build_images
from appliance.runtime.local import RuntimeFailure
from appliance.runtime.settings import RuntimeSettings

if TYPE_CHECKING:
    from appliance.backup.service import RestoreResult

__all__ = ["down", "images_app", "logs", "register", "restart", "scale", "status", "up"]


def _log(message: str) -> None:
    err.print(f"  {message}", highlight=False)


def _runtime(settings: RuntimeSettings) -> ComposeRuntime:
    return ComposeRuntime(settings, log=_log)


def up(settings: RuntimeSettings, as_json: bool, build: bool = False) -> None:
    rt = _runtime(settings)
    err.print(f"[bold]Starting the appliance on Docker[/] (project {rt.project}, data in {rt.data_path()})")
    started = time.monotonic()
    try:
        healthy_in = rt.up(build=build)
    except RuntimeFailure as exc:
        fail(str(exc))
    info = {
        "chat_ui": f"{rt.gateway_url}/",
        "openai_base_url": f"{rt.gateway_url}/v1",
        "admin_key_file": str(rt.admin_key_file),
        "ready_in_s": round(time.monotonic() - started, 1),
        "healthy_in_s": healthy_in,
    }
    if as_json:
        print_json(info)
        return
    err.print(f"[green]Ready[/] in {info['ready_in_s']} s ({healthy_in} s from `up` to healthy).")
    out.print(f"Chat UI:          {info['chat_ui']}\nOpenAI base URL:  {info['openai_base_url']}")
    shown = settings.data_dir / "run" / "admin_key.shown"
    if rt.admin_key_file.is_file() and not shown.exists():
        out.print(
            f"Admin API key:    {rt.admin_key_file.read_text().strip()}  "
            f"(shown once; kept in {rt.admin_key_file}, mode 0600)"
        )
        shown.touch()
    else:
        out.print(f"Admin API key:    in {rt.admin_key_file}")


def down(settings: RuntimeSettings) -> None:
    try:
        stopped = _runtime(settings).down()
    except RuntimeFailure as exc:
        fail(str(exc))
    err.print(
        "[green]Stopped[/] (containers and networks removed; the data stays)." if stopped else "Nothing was running."
    )


def status(settings: RuntimeSettings, as_json: bool) -> None:
    code, report = _runtime(settings).status()
    if as_json:
        print_json(report)
        raise typer.Exit(code)
    if report.get("error"):
        err.print(f"[red]{report['error']}[/]")
    table = Table(
        "service", "state", "health", "restarts", "uptime", "container", title=f"appliance: {report['state']}"
    )
    for s in report["services"]:
        health = "[green]ok[/]" if s["healthy"] else f"[red]{s['health']}[/]"
        table.add_row(s["name"], s["state"], health, str(s["restarts"]), f"{s['uptime_s']}s", s["container"] or "-")
    out.print(table)
    if "gateway" in report:
        out.print(f"  gateway {report['gateway']['url']}: ready={report['gateway']['ready']}")
    raise typer.Exit(code)


def restart(settings: RuntimeSettings, service: str | None) -> None:
    try:
        names = _runtime(settings).restart(service)
    except RuntimeFailure as exc:
        fail(str(exc))
    err.print(f"[green]Restarted one at a time[/]: {', '.join(names) or 'nothing was running'}")


def scale(settings: RuntimeSettings, count: int) -> None:
    try:
        added, removed = _runtime(settings).scale(count)
    except RuntimeFailure as exc:
        fail(str(exc))
    err.print(
        f"[green]Scaled to {count} workers[/] (started: {', '.join(added) or 'none'}, "
        f"stopped: {', '.join(removed) or 'none'})"
    )


def logs(settings: RuntimeSettings, service: str, follow: bool, lines: int) -> None:
    try:
        _runtime(settings).logs(service, follow, lines)
    except RuntimeFailure as exc:
        fail(str(exc))


def backup(settings: RuntimeSettings, to: Path | None, with_models: bool, as_json: bool) -> None:
    from appliance.backup.key import created_notice
    from appliance.backup.manifest import ManifestError
    from appliance.backup.snapshot import SnapshotError
    from appliance.runtime.compose_backup import compose_backup

    try:
        result = compose_backup(
            _runtime(settings),
            to,
            with_models=with_models,
            step=lambda member: err.print(f"  + {member}", highlight=False),
        )
    except (RuntimeFailure, SnapshotError, ManifestError, OSError) as exc:
        fail(f"backup failed: {exc}")
    if result.key_created:
        err.print(f"[yellow]{created_notice(result.key_file)}[/]", highlight=False)
    summary: dict[str, Any] = {
        "archive": str(result.archive),
        "files": result.files,
        "bytes": result.bytes,
        "redis_keys": result.redis_keys,
        "key_file": str(result.key_file),
    }
    if as_json:
        print_json(summary)
    else:
        out.print(
            f"Backup written: {result.archive} ({result.files} files, {result.bytes} bytes, "
            f"{result.redis_keys} Redis keys)"
        )


def restore(
    settings: RuntimeSettings, archive: Path, dry_run: bool, key_file: Path | None, allow_unsigned: bool
) -> RestoreResult:
    """`appliance restore --runtime compose`; the caller reports the result as for the local runtime."""
    from appliance.backup.manifest import ManifestError
    from appliance.runtime.compose_backup import compose_restore

    try:
        return compose_restore(
            _runtime(settings), archive, dry_run=dry_run, key_file=key_file, allow_unsigned=allow_unsigned
        )
    except ManifestError as exc:
        fail(f"refusing to restore {archive.name}: {exc}")
    except RuntimeFailure as exc:
        fail(str(exc))


images_app = typer.Typer(help="The compose runtime's images (built locally, no registry).", no_args_is_help=True)


@images_app.command("build")
def images_build(
    only: Annotated[list[str] | None, typer.Argument(help="images to build (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Build the CPU images: local Debian base (debootstrap), wheelhouse, then one docker build each."""
    try:
        report = build_images(find_engine(), _log, only=list(only or []) or None)
    except RuntimeFailure as exc:
        fail(str(exc))
    sizes_mb = {name: round(size / 1e6) for name, size in report.sizes.items()}
    if as_json:
        print_json({"seconds": report.seconds, "sizes_mb": sizes_mb})
        return
    for name, size in sizes_mb.items():
        out.print(f"  {name:<15} {size:>5} MB  built in {report.seconds.get(name)} s")


def register(app: typer.Typer) -> None:
    app.add_typer(images_app, name="images")
