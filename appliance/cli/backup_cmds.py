"""backup and restore verbs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from appliance.backup.key import created_notice
from appliance.backup.manifest import ManifestError
from appliance.backup.service import BackupResult, RestoreResult
from appliance.backup.snapshot import SnapshotError
from appliance.cli.audit_trail import record
from appliance.cli.context import RuntimeFor, load
from appliance.cli.output import err, fail, out, print_json
from appliance.runtime.protocol import RuntimeFailure
from appliance.runtime.settings import RuntimeSettings

__all__ = ["register"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _interval(text: str) -> float:
    number, unit = text[:-1], text[-1:]
    if unit not in _UNITS or not number.isdigit() or int(number) == 0:
        fail(f"--every expects a duration like 30m, 6h or 1d, not {text!r}")
    return int(number) * _UNITS[unit]


def backup(
    ctx: typer.Context,
    to: Annotated[Path | None, typer.Option("--to", help="directory for archives (default data/backups)")] = None,
    keep: Annotated[int, typer.Option(help="archives to keep (older ones are deleted)")] = 7,
    with_models: Annotated[bool, typer.Option("--with-models", help="include GGUF weights")] = False,
    offsite: Annotated[Path | None, typer.Option(help="also copy each verified archive here")] = None,
    every: Annotated[str | None, typer.Option(help="repeat: 30m, 6h, 1d (runs until stopped)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    runtime_name: Annotated[str | None, typer.Option("--runtime", help="local (default) or compose")] = None,
) -> None:
    """A consistent snapshot while serving: Redis, RAG store and indexes, config, model manifest."""
    runtime_for: RuntimeFor = ctx.obj
    rt = runtime_for(load(runtime=runtime_name))
    if (every or offsite) and not rt.schedules_backups:
        fail(
            "--every and --offsite are for the local runtime; on compose run `appliance backup --runtime "
            "compose` from cron and copy the archive"
        )
    period = _interval(every) if every else None
    while True:
        err.print("[bold]Backing up[/] (Redis BGSAVE, RAG store, secrets, model manifest)")
        try:
            result = rt.backup(
                to,
                with_models=with_models,
                keep=keep,
                offsite=offsite,
                step=lambda member: err.print(f"  + {member}", highlight=False),
            )
        except (RuntimeFailure, SnapshotError, ManifestError, OSError) as exc:
            record(rt.settings, action="backup.create", target=str(to or "backups"), outcome="failed",
                   detail={"error": type(exc).__name__})
            if period is None:
                fail(f"backup failed: {exc}")
            err.print(f"[red]backup failed[/]: {exc}; retrying at the next period")
        else:
            _record_backup(rt.settings, result)
            if result.key_created:
                err.print(f"[yellow]{created_notice(result.key_file)}[/]", highlight=False)
            summary = {
                "archive": str(result.archive),
                "files": result.files,
                "bytes": result.bytes,
                "redis_keys": result.redis_keys,
                "offsite": str(result.offsite) if result.offsite else None,
                "rotated": [str(p) for p in result.rotated],
                "key_file": str(result.key_file),
            }
            if as_json:
                print_json(summary)
            else:
                out.print(
                    f"Backup written: {result.archive} ({result.files} files, {result.bytes} bytes, "
                    f"{result.redis_keys} Redis keys)"
                )
        if period is None:
            return
        time.sleep(period)


def _record_backup(settings: RuntimeSettings, result: BackupResult) -> None:
    head = result.audit_head
    if head is not None:
        err.print(f"  audit head {head} anchored in the manifest", highlight=False)
    record(settings, action="backup.create", target=result.archive.name,
           detail={"files": result.files, "bytes": result.bytes, "anchored_seq": head.seq if head else 0})


def restore(
    ctx: typer.Context,
    archive: Annotated[Path, typer.Argument(help="a backup archive")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="verify and say what would be restored")] = False,
    key_file: Annotated[
        Path | None,
        typer.Option("--key", help="the backup key of the host that wrote the archive (default data/run/backup_key)"),
    ] = None,
    insecure_unsigned: Annotated[
        bool,
        typer.Option(
            "--insecure-unsigned",
            help="accept an archive in the old format, which has no MAC (its sums are still checked): only one "
            "that never left storage you trust",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    runtime_name: Annotated[str | None, typer.Option("--runtime", help="local (default) or compose")] = None,
) -> None:
    """Verify the archive (its manifest's MAC with the backup key, every sha256), then restore and restart."""
    if not archive.is_file():
        fail(f"{archive} is not a file")
    if key_file is not None and not key_file.is_file():
        fail(f"--key {key_file} is not a file")
    runtime_for: RuntimeFor = ctx.obj
    rt = runtime_for(load(runtime=runtime_name))
    try:
        result = rt.restore(archive, dry_run=dry_run, key_file=key_file, allow_unsigned=insecure_unsigned)
    except ManifestError as exc:
        _record_restore(rt.settings, archive, "refused", type(exc).__name__)
        fail(f"refusing to restore {archive.name}: {exc}")
    except RuntimeFailure as exc:
        _record_restore(rt.settings, archive, "failed", type(exc).__name__)
        fail(str(exc))
    except OSError as exc:
        _record_restore(rt.settings, archive, "failed", type(exc).__name__)
        fail(f"restore failed, the live data is unchanged or rolled forward by the next `appliance up`: {exc}")
    if not result.dry_run:
        head = result.audit_head
        record(rt.settings, action="backup.restore", target=archive.name,
               detail={"restored": ",".join(result.restored), "authenticated": result.authenticated,
                       "archive_audit_seq": head.seq if head else 0})
    _report_restore(result, as_json)


def _record_restore(settings: RuntimeSettings, archive: Path, outcome: str, error: str) -> None:
    record(settings, action="backup.restore", target=archive.name, outcome=outcome, detail={"error": error})


def _report_restore(result: RestoreResult, as_json: bool) -> None:
    """The restore's outcome."""
    summary = {
        "archive": str(result.archive),
        "dry_run": result.dry_run,
        "restored": result.restored,
        "models_missing": result.models_missing,
        "authenticated": result.authenticated,
    }
    if not result.authenticated:
        err.print(
            "[yellow]an unsigned legacy archive: its sums were checked, not who wrote it[/] (--insecure-unsigned)"
        )
    if as_json:
        print_json(summary)
        return
    verb = "Would restore" if result.dry_run else "Restored"
    checked = "manifest MAC and every sha256 verified" if result.authenticated else "every sha256 verified"
    out.print(f"{verb}: {', '.join(result.restored)} from {result.archive.name} ({checked})")
    if result.models_missing:
        err.print(f"[yellow]models not in the archive and not on disk:[/] {', '.join(result.models_missing)}")


def register(app: typer.Typer) -> None:
    app.command()(backup)
    app.command()(restore)
