"""Stack verbs: up, down, status, restart, scale, upgrade, logs, rotate-admin-key."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from appliance.cli import compose_verbs
from appliance.cli.context import admin_key, forget, load, remember, runtime
from appliance.cli.output import err, fail, out, print_json
from appliance.runtime.local import RuntimeFailure
from appliance.runtime.plan import lan_addresses
from appliance.runtime.rolling import rolling_restart, scale_workers
from appliance.runtime.settings import LOOPBACK_HOSTS, RuntimeSettings
from appliance.runtime.status import collect_status
from appliance.runtime.upgrade import upgrade as upgrade_stack

__all__ = ["register"]

Runtime = Annotated[str | None, typer.Option("--runtime", help="local (default) or compose")]


def _settings(runtime_name: str | None = None, **extra: Any) -> RuntimeSettings:
    return load(runtime=runtime_name, **extra)


def up(
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
    runtime_name: Runtime = None,
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
        forget(_settings(runtime_name))
    settings = _settings(runtime_name, **given)
    if settings.runtime == "compose":
        compose_verbs.up(settings, as_json)
        return
    started = time.monotonic()
    err.print(f"[bold]Starting the appliance[/] ({settings.workers} workers, data in {settings.data_dir})")
    rt = runtime(settings)
    try:
        served = rt.served_model()
        err.print(f"  model: {served.model_alias} ({served.model_path})", highlight=False)
        rt.up()
    except RuntimeFailure as exc:
        fail(str(exc))
    remember(settings, given)
    info = {
        **_addresses(settings),
        "model": served.model_alias,
        "admin_key_file": str(settings.data_dir / "admin_key"),
        "ready_in_s": round(time.monotonic() - started, 1),
    }
    if as_json:
        print_json(info)
        return
    err.print(f"[green]Ready[/] in {info['ready_in_s']} s.")
    out.print(
        f"Chat UI:          {info['chat_ui']}\nOpenAI base URL:  {info['openai_base_url']}\n"
        f"Model:            {info['model']}\nListening on:     {info['listen']}"
    )
    for url in info["lan_urls"]:
        out.print(f"From the LAN:     {url}")
    if settings.gateway_host in LOOPBACK_HOSTS:
        err.print("  Only this machine can reach it; `appliance up --host 0.0.0.0 --tls` serves the LAN.")
    elif not settings.tls:
        err.print("[yellow]  warning:[/] plain HTTP on the network: API keys cross it in clear; add --tls.")
    _show_admin_key_once(settings)


def _addresses(settings: RuntimeSettings) -> dict[str, Any]:
    """Where clients reach the gateway: loopback, and the LAN addresses when it listens beyond loopback."""
    scheme, port, host = settings.scheme, settings.gateway_port, settings.gateway_host
    if host in LOOPBACK_HOSTS:
        lan: list[str] = []
    elif host in ("0.0.0.0", "::"):  # noqa: S104 - comparing names
        lan = [f"{scheme}://{address}:{port}/" for address in lan_addresses()]
    else:
        lan = [f"{scheme}://{host}:{port}/"]
    base = settings.gateway_local_url
    return {"chat_ui": f"{base}/", "openai_base_url": f"{base}/v1", "listen": f"{host}:{port}", "lan_urls": lan}


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
        compose_verbs.down(settings)
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
        compose_verbs.status(settings, as_json)
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
        out.print(
            f"  {w['name']}: model={w.get('model')} slots={w.get('slots_busy')}/{w.get('slots_total')} "
            f"queue={w.get('queue_depth')} ctx/slot={w.get('n_ctx')} layers on GPU={w.get('gpu_layers')}"
        )
    redis_info, rag, gpu = report.get("redis") or {}, report.get("rag") or {}, report.get("gpu") or {}
    out.print(
        f"  redis: up={redis_info.get('up')} memory={redis_info.get('used_memory_human')} "
        f"last_save={redis_info.get('last_save')}"
    )
    if rag:
        out.print(f"  rag: up={rag.get('up')} collections={rag.get('collections')} documents={rag.get('documents')}")
    out.print(f"  gpu: {gpu.get('gpus') if gpu.get('present') else 'none'}")
    out.print(f"  cache hit rate: {report.get('cache_hit_rate')}")


def restart(
    service: Annotated[str | None, typer.Argument(help="a service, or 'inference' for all workers")] = None,
    allow_outage: Annotated[bool, typer.Option(help="restart a single worker anyway (no one serves)")] = False,
    runtime_name: Runtime = None,
) -> None:
    """Restart a service; workers restart one at a time (drained, restarted, readmitted).

    With one worker a rolling restart would leave none serving: it is refused unless --allow-outage
    (or `appliance scale inference=2` first).
    """
    settings = _settings(runtime_name=runtime_name)
    if settings.runtime == "compose":
        compose_verbs.restart(settings, service)
        return
    rt = runtime(settings)
    try:
        if service in (None, "inference"):
            try:
                names = rolling_restart(rt, allow_outage=allow_outage)
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


def scale(spec: Annotated[str, typer.Argument(help="inference=N")], runtime_name: Runtime = None) -> None:
    """Add or remove inference workers live."""
    name, _, value = spec.partition("=")
    if name != "inference" or not value.isdigit() or not 1 <= int(value) <= 64:
        fail("expected inference=N with N between 1 and 64")
    settings = _settings(runtime_name=runtime_name)
    if settings.runtime == "compose":
        compose_verbs.scale(settings, int(value))
        remember(settings, {"workers": int(value)})
        return
    try:
        added, removed = scale_workers(runtime(settings), int(value))
    except httpx.HTTPError as exc:
        fail(f"the balancer's admin API failed while scaling ({exc})")
    except RuntimeFailure as exc:
        fail(str(exc))
    remember(settings, {"workers": int(value)})
    err.print(f"[green]Scaled to {value} workers[/] (added: {added or 'none'}, removed: {removed or 'none'})")


def logs(
    service: str,
    follow: Annotated[bool, typer.Option("-f", "--follow")] = False,
    lines: Annotated[int, typer.Option("-n", "--lines")] = 100,
    runtime_name: Runtime = None,
) -> None:
    """Show a service's log (last lines; -f to follow)."""
    settings = _settings(runtime_name=runtime_name)
    if settings.runtime == "compose":
        compose_verbs.logs(settings, service, follow, lines)
        return
    path = settings.log_dir / f"{service}.log"
    if not path.is_file():
        available = sorted(p.stem for p in settings.log_dir.glob("*.log"))
        fail(f"no log for {service!r}; available: {', '.join(available) or 'none (is the stack up?)'}")
    argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), str(path)]
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(argv, check=False)  # noqa: S603 - fixed argv


def upgrade(allow_outage: Annotated[bool, typer.Option(help="allow it with a single worker (a gap)")] = False) -> None:
    """Move every running service to the installed code without a gap (after `./scripts/run --install-only`)."""
    settings = _settings()
    try:
        done = upgrade_stack(runtime(settings), allow_outage=allow_outage)
    except httpx.HTTPError as exc:
        fail(f"the balancer's admin API failed during the upgrade ({exc})")
    except RuntimeFailure as exc:
        fail(str(exc))
    err.print(f"[green]Upgraded[/]: {', '.join(done)}")


def rotate_admin_key() -> None:
    """Create a new admin key, write it to data/admin_key (0600) and revoke the old one."""
    settings = _settings()
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
