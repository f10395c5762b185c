"""`appliance batches list|show|cancel`: every key's batches, over the gateway's admin API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table

from appliance.cli.admin import AdminKey, Json, admin_call
from appliance.cli.context import load
from appliance.cli.output import err, out, print_json

__all__ = ["register"]

batches_app = typer.Typer(help="Batches of every key (Batch API): list, show, cancel.", no_args_is_help=True)
BatchArg = Annotated[str, typer.Argument(help="the batch's id (batch_...)")]


def _when(stamp: Any) -> str:
    return datetime.fromtimestamp(int(stamp), UTC).strftime("%Y-%m-%d %H:%M:%SZ") if stamp else "-"


def _progress(counts: dict[str, Any]) -> str:
    return f"{counts.get('completed', 0)} ok, {counts.get('failed', 0)} failed of {counts.get('total', 0)}"


@batches_app.command("list")
def batches_list(
    limit: Annotated[int, typer.Option(min=1, max=100, help="newest first, this many")] = 20,
    key: AdminKey = None, as_json: Json = False,
) -> None:
    """Every key's batches, newest first, with their progress."""
    page = admin_call(load(), key, "GET", "/admin/batches", params={"limit": limit})
    if as_json:
        print_json(page)
        return
    table = Table("id", "key", "status", "progress", "tokens", "created")
    for row in page.get("data", []):
        table.add_row(str(row.get("id")), str(row.get("key_name") or row.get("key_id")), str(row.get("status")),
                      _progress(row.get("request_counts") or {}), str(row.get("tokens", 0)),
                      _when(row.get("created_at")))
    out.print(table)


@batches_app.command("show")
def batches_show(batch_id: BatchArg, key: AdminKey = None, as_json: Json = False) -> None:
    """One batch: status, progress, files, times."""
    batch = admin_call(load(), key, "GET", f"/admin/batches/{quote(batch_id, safe='')}")
    if as_json:
        print_json(batch)
        return
    table = Table("field", "value", show_header=False)
    table.add_row("id", str(batch.get("id")))
    table.add_row("key", f"{batch.get('key_name')} ({batch.get('key_id')})")
    table.add_row("endpoint", str(batch.get("endpoint")))
    table.add_row("status", str(batch.get("status")))
    table.add_row("progress", _progress(batch.get("request_counts") or {}))
    table.add_row("files", f"input {batch.get('input_file_id')}, output {batch.get('output_file_id') or '-'}, "
                           f"errors {batch.get('error_file_id') or '-'}")
    for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "cancelled_at", "expires_at"):
        if batch.get(stamp):
            table.add_row(stamp.removesuffix("_at"), _when(batch.get(stamp)))
    out.print(table)


@batches_app.command("cancel")
def batches_cancel(batch_id: BatchArg, key: AdminKey = None, as_json: Json = False) -> None:
    """Cancel a batch: lines not started are not run, lines in flight finish."""
    batch = admin_call(load(), key, "POST", f"/admin/batches/{quote(batch_id, safe='')}/cancel")
    if as_json:
        print_json(batch)
        return
    err.print(f"[green]{batch.get('status', 'cancelling').capitalize()}[/] {batch_id} "
              f"({_progress(batch.get('request_counts') or {})}).")


def register(app: typer.Typer) -> None:
    app.add_typer(batches_app, name="batches")
