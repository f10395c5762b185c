"""Stack verbs: up, down, status, restart, scale, upgrade, logs, rotate-admin-key.

Each verb is written once against :class:`appliance.runtime.protocol.Runtime`; ``--runtime`` (or
``[runtime] runtime``) picks the local runtime (supervisord, the default) or compose.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli.audit_trail import record_config
from appliance.cli.context import RuntimeFor, admin_key, forget, load, remember
from appliance.cli.output import err, fail, out, print_json
from appliance.runtime.models import forget_changes
from appliance.runtime.protocol import Runtime, RuntimeFailure, Started, Status
from appliance.runtime.settings import LOOPBACK_HOSTS, RuntimeSettings

__all__ = ["register"]

RuntimeName = Annotated[str | None, typer.Option("--runtime", help="local (default) or compose")]


def _runtime(ctx: typer.Context, runtime_name: str | None, **extra: Any) -> Runtime:
    runtime_for: RuntimeFor = ctx.obj
    return runtime_for(load(runtime=runtime_name, **extra))


def up(
    ctx: typer.Context,
    workers: Annotated[int | None, typer.Option(help="number of inference workers")] = None,
    model: Annotated[Path | None, typer.Option(help="GGUF file; overrides \\[worker] model_path")] = None,
    served_name: Annotated[
        str | None,
        typer.Option("--served-name", "--alias", help="model id clients use; overrides \\[worker] model_alias"),
    ] = None,
    slots: Annotated[int | None, typer.Option(help="sequences per worker; overrides \\[worker] slots")] = None,
    host: Annotated[
        str | None, typer.Option(help="the gateway's listen address: 127.0.0.1 (default), a LAN IP, or 0.0.0.0")
    ] = None,
    tls: Annotated[
        bool | None, typer.Option("--tls/--no-tls", help="serve HTTPS (self-signed unless --tls-cert)")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="your certificate (PEM, full chain); implies --tls")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="its private key (PEM)")] = None,
    tls_name: Annotated[
        list[str] | None, typer.Option(help="extra DNS name or IP for the self-signed certificate (repeatable)")
    ] = None,
    reset: Annotated[bool, typer.Option(help="forget the flags earlier `up` commands remembered")] = False,
    runtime_name: RuntimeName = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Start every service in dependency order and wait until all are ready.

    The flags are remembered: later `scale`, `restart`, `status`, `keys`... use them too.
    """
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together")
    given: dict[str, Any] = {
        "workers": workers,
        "model_path": model,
        "model_alias": served_name,
        "worker_slots": slots,
        "gateway_host": host,
        "tls": tls,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "tls_names": tls_name or None,
    }
    if reset:
        remembered = load(runtime=runtime_name)
        forget(remembered)
        forget_changes(remembered.run_dir)  # and what `appliance models` changed over appliance.toml
    rt = _runtime(ctx, runtime_name, **given)
    started = time.monotonic()
    try:
        intro = rt.intro()
        err.print(f"[bold]{intro.title}[/] ({intro.detail})")
        for note in intro.notes:
            err.print(f"  {note}", highlight=False)
        ready = rt.up()
    except RuntimeFailure as exc:
        fail(escape(str(exc)))  # plain text: "[models] memory_budget" is not markup
    remember(rt.settings, given)
    record_config(rt.settings)
    ready_in = round(time.monotonic() - started, 1)
    if as_json:
        print_json(ready.report(ready_in))
        return
    _print_started(rt.settings, ready, ready_in)


def _print_started(settings: RuntimeSettings, ready: Started, ready_in: float) -> None:
    healthy = f" ({ready.healthy_in_s} s from `up` to healthy)" if ready.healthy_in_s is not None else ""
    err.print(f"[green]Ready[/] in {ready_in} s{healthy}.")
    out.print(f"Chat UI:          {ready.chat_ui}\nOpenAI base URL:  {ready.openai_base_url}")
    if ready.listen is not None:
        out.print(f"Model:            {ready.model}\nListening on:     {ready.listen}")
        for url in ready.lan_urls:
            out.print(f"From the LAN:     {url}")
        if settings.gateway_host in LOOPBACK_HOSTS:
            err.print("  Only this machine can reach it; `appliance up --host 0.0.0.0 --tls` serves the LAN.")
        elif not settings.tls:
            err.print("[yellow]  warning:[/] plain HTTP on the network: API keys cross it in clear; add --tls.")
    shown = settings.run_dir / "admin_key.shown"
    if ready.admin_key_file.is_file() and not shown.exists():
        out.print(
            f"Admin API key:    {ready.admin_key_file.read_text().strip()}  "
            f"(shown once; kept in {ready.admin_key_file}, mode 0600)"
        )
        shown.touch()
    else:
        out.print(f"Admin API key:    in {ready.admin_key_file}")


def down(ctx: typer.Context, runtime_name: RuntimeName = None) -> None:
    """Drain and stop everything, leaving no process behind."""
    rt = _runtime(ctx, runtime_name)
    try:
        stopped = rt.down()
    except RuntimeFailure as exc:
        fail(str(exc))
    err.print(f"[green]Stopped[/]{rt.stopped_note}." if stopped else "Nothing was running.")


def status(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False, runtime_name: RuntimeName = None
) -> None:
    """Every service, worker, Redis, RAG, GPU and the cache. Exit 0 healthy, 1 degraded, 2 down."""
    found = _runtime(ctx, runtime_name).status()
    if as_json:
        print_json(found.report)
    else:
        _print_status(found)
    raise typer.Exit(found.code)


def _print_status(found: Status) -> None:
    for error in found.errors:
        err.print(f"[red]{error}[/]")
    table = Table("service", *found.columns, title=f"appliance: {found.state}")
    for row in found.rows:
        cells = {**row.cells, "health": "[green]ok[/]" if row.healthy else f"[red]{row.cells['health']}[/]"}
        table.add_row(row.name, *(cells[column] for column in found.columns))
    out.print(table)
    for line in found.lines:
        out.print(line)


def restart(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Argument(help="a service, or 'inference' for all workers")] = None,
    allow_outage: Annotated[bool, typer.Option(help="restart a single worker anyway (no one serves)")] = False,
    runtime_name: RuntimeName = None,
) -> None:
    """Restart a service; workers restart one at a time (drained, restarted, readmitted).

    With one worker a rolling restart would leave none serving: it is refused unless --allow-outage
    (or `appliance scale inference=2` first).
    """
    try:
        done = _runtime(ctx, runtime_name).restart(service, allow_outage=allow_outage)
    except RuntimeFailure as exc:
        fail(str(exc))
    if done.headline:
        err.print(f"[green]{done.headline}[/]: {', '.join(done.names) or done.when_none}")


def scale(
    ctx: typer.Context, spec: Annotated[str, typer.Argument(help="inference=N")], runtime_name: RuntimeName = None
) -> None:
    """Add or remove inference workers live."""
    name, _, value = spec.partition("=")
    if name != "inference" or not value.isdigit() or not 1 <= int(value) <= 64:
        fail("expected inference=N with N between 1 and 64")
    rt = _runtime(ctx, runtime_name)
    try:
        done = rt.scale(int(value))
    except RuntimeFailure as exc:
        fail(str(exc))
    remember(rt.settings, {"workers": done.count})
    record_config(load(runtime=runtime_name))
    err.print(
        f"[green]Scaled to {done.count} workers[/] (added: {', '.join(done.added) or 'none'}, "
        f"removed: {', '.join(done.removed) or 'none'})"
    )


def logs(
    ctx: typer.Context,
    service: str,
    follow: Annotated[bool, typer.Option("-f", "--follow")] = False,
    lines: Annotated[int, typer.Option("-n", "--lines")] = 100,
    runtime_name: RuntimeName = None,
) -> None:
    """Show a service's log (last lines; -f to follow)."""
    try:
        _runtime(ctx, runtime_name).logs(service, follow=follow, lines=lines)
    except RuntimeFailure as exc:
        fail(str(exc))


def upgrade(
    ctx: typer.Context,
    allow_outage: Annotated[bool, typer.Option(help="allow it with a single worker (a gap)")] = False,
    runtime_name: RuntimeName = None,
) -> None:
    """Move every running service to the installed code without a gap (after `./scripts/run --install-only`)."""
    try:
        done = _runtime(ctx, runtime_name).upgrade(allow_outage=allow_outage)
    except RuntimeFailure as exc:
        fail(str(exc))
    err.print(f"[green]Upgraded[/]: {', '.join(done)}")


def rotate_admin_key() -> None:
    """Create a new admin key, write it to data/admin_key (0600) and revoke the old one."""
    settings = load()
    path = settings.data_dir / "admin_key"
    old = admin_key(settings)
    scopes = ["admin", "chat", "embeddings", "collections"]
    name = f"admin-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        with httpx.Client(
            base_url=settings.gateway_local_url,
            timeout=30,
            verify=False,  # noqa: S501 - our own
            headers={"Authorization": f"Bearer {old}"},
        ) as client:
            listed = client.get("/admin/keys").raise_for_status().json()
            rows = listed.get("data", listed) if isinstance(listed, dict) else listed
            hint = old[-4:]
            olds = [
                r
                for r in rows
                if str(r.get("hint", "")).endswith(hint) and "admin" in r.get("scopes", []) and not r.get("revoked")
            ]
            created = client.post("/admin/keys", json={"name": name, "scopes": scopes}).raise_for_status().json()
            tmp = path.with_name(".admin_key.new")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(created["key"] + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(path)
            if len(olds) != 1:
                fail(
                    f"new admin key {created['id']} written to {path}; revoke the old one by hand "
                    f"(`appliance keys list`, `appliance keys revoke ID`): {len(olds)} keys match it"
                )
            client.delete(f"/admin/keys/{olds[0]['id']}").raise_for_status()
    except httpx.HTTPError as exc:
        fail(f"the gateway refused or is not reachable ({exc}); is the stack up?")
    err.print(f"[green]Admin key rotated[/]: {created['id']} ({name}) in {path}; {olds[0]['id']} revoked.")


def register(app: typer.Typer) -> None:
    for command in (up, down, status, restart, scale, upgrade, logs):
        app.command()(command)
    app.command("rotate-admin-key")(rotate_admin_key)
