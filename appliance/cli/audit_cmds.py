"""`appliance audit verify` and `appliance audit export`: thin verbs over appliance.core.audit_verify."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from appliance.backup.archive import verify_archive
from appliance.backup.audit_snapshot import live_audit_path, manifest_anchor
from appliance.backup.key import default_key_path, load_key
from appliance.backup.manifest import ManifestError
from appliance.cli.context import load
from appliance.cli.output import err, fail, out, print_json
from appliance.core.audit import AuditHead
from appliance.core.audit_verify import Verdict, read_records, verify_log

__all__ = ["register"]

audit_app = typer.Typer(help="Check and export the tamper-evident audit log.", no_args_is_help=True)

_SINCE = re.compile(r"\d{4}-\d{2}-\d{2}(T\d{2}(:\d{2}(:\d{2}(\.\d{1,6})?)?)?)?")
LogPath = Annotated[Path | None, typer.Option("--file", help="the audit log (default: the appliance's own)")]


def _anchors_from_log(path: Path) -> list[AuditHead]:
    """The ``audit anchor`` lines of a structured (JSON lines) log: the gateway's stderr or `journalctl -o cat`."""
    found: list[AuditHead] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        fail(f"cannot read {path}: {exc}")
    for line in lines:
        if '"audit anchor"' not in line:
            continue
        try:
            entry = json.loads(line[line.index("{"):])
            found.append(AuditHead.parse(str(entry["audit_anchor"])))
        except (ValueError, KeyError, TypeError):
            continue
    return found


def _anchor_of_backup(archive: Path, key_file: Path | None, data_dir: Path) -> AuditHead | None:
    try:
        manifest = verify_archive(archive, lambda: load_key(key_file or default_key_path(data_dir)))
    except (ManifestError, OSError) as exc:
        fail(f"cannot take an anchor from {archive}: {exc}")
    return manifest_anchor(manifest)


def _report(verdict: Verdict, path: Path, anchors: list[AuditHead], as_json: bool) -> None:
    problem = verdict.problem
    if as_json:
        print_json({"ok": verdict.ok, "file": str(path), "records": verdict.records,
                    "head": str(verdict.head) if verdict.head else None,
                    "anchors": [str(anchor) for anchor in anchors],
                    "problem": None if problem is None else {"kind": problem.kind, "line": problem.line,
                                                             "seq": problem.seq, "message": problem.message}})
    elif problem is None:
        against = f", consistent with {len(anchors)} anchor(s)" if anchors else " (no anchor given: a cut tail " \
            "or a chain recomputed from some record on would not show)"
        out.print(f"audit log intact: {verdict.records} records, head {verdict.head or 'none'}{against}",
                  highlight=False)
    else:
        err.print(f"[bold red]audit log damaged[/] at line {problem.line} (seq {problem.seq}): {problem.kind}: "
                  f"{problem.message}", highlight=False)


@audit_app.command("verify")
def verify(
    anchor: Annotated[list[str] | None, typer.Option(
        "--anchor", help="SEQ:HASH from the logs or a backup (repeatable): a cut tail or a recomputed chain shows")
    ] = None,
    backup: Annotated[list[Path] | None, typer.Option(
        "--backup", help="take the anchor from this archive's MAC-checked manifest (repeatable)")] = None,
    log: Annotated[list[Path] | None, typer.Option(
        "--log", help="take every 'audit anchor' line from this JSON-lines log (gateway stderr, journalctl -o cat)")
    ] = None,
    key_file: Annotated[Path | None, typer.Option("--key", help="backup key for --backup")] = None,
    file: LogPath = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Walk the hash chain: exit 0 when intact; 1 naming the first bad record (line, seq, what is wrong)."""
    settings = load()
    path = file or live_audit_path(settings)
    try:
        anchors = [AuditHead.parse(text) for text in anchor or []]
    except ValueError as exc:
        fail(str(exc), code=2)
    for archive in backup or []:
        found = _anchor_of_backup(archive, key_file, settings.data_dir)
        if found is None:
            err.print(f"[yellow]{archive.name} has no audit anchor (an older backup, or no audit log then)[/]")
        else:
            anchors.append(found)
    for source in log or []:
        anchors.extend(_anchors_from_log(source))
    verdict = verify_log(path, anchors)
    _report(verdict, path, anchors, as_json)
    raise typer.Exit(0 if verdict.ok else 1)


@audit_app.command("export")
def export(
    since: Annotated[str, typer.Option(help="records at or after this UTC time: 2026-12-08 or 2026-12-08T02:00")
                     ] = "",
    file: LogPath = None,
    as_json: Annotated[bool, typer.Option("--json", help="the stored JSON lines, verbatim (verifiable)")] = False,
) -> None:
    """Print the records (a table, or with --json the JSON lines exactly as stored)."""
    if since and not _SINCE.fullmatch(since):
        fail(f"--since is a UTC date or time like 2026-12-08 or 2026-12-08T02:00, not {since!r}", code=2)
    path = file or live_audit_path(load())
    if as_json:
        for raw in read_records(path, since):
            sys.stdout.buffer.write(raw + b"\n")
        sys.stdout.flush()
        return
    table = Table("seq", "time", "actor", "action", "target", "outcome", title=f"audit log {path}")
    for raw in read_records(path, since):
        record = json.loads(raw)
        table.add_row(str(record["seq"]), record["time"], record["actor"], record["action"], record["target"],
                      record["outcome"])
    out.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
