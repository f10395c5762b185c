"""Admin verbs over the gateway's admin API: keys, usage; and document ingestion."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from appliance.cli.audit_trail import record
from appliance.cli.context import admin_key, load
from appliance.cli.output import err, fail, out, print_json
from appliance.runtime.settings import RuntimeSettings

if TYPE_CHECKING:
    from appliance.cli.rag_client import RagClient

__all__ = ["AdminKey", "Json", "admin_call", "register"]

keys_app = typer.Typer(help="Create, list, update and revoke API keys.", no_args_is_help=True)


def _gateway(settings: RuntimeSettings, key: str | None) -> httpx.Client:
    token = key or admin_key(settings)
    # Our own gateway (HTTPS after `up --tls`, remembered), whose certificate may be self-signed.
    return httpx.Client(base_url=settings.gateway_local_url, timeout=30, verify=False,  # noqa: S501
                        headers={"Authorization": f"Bearer {token}"})


def _call(settings: RuntimeSettings, key: str | None, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with _gateway(settings, key) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        fail(f"the gateway at port {settings.gateway_port} is not reachable ({type(exc).__name__}); is the stack up?")
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        fail(f"{method} {path} failed with {response.status_code}: {message}")
    return response.json() if response.content else None


admin_call = _call  # other verbs over the admin API (appliance.cli.batches_cmds) call it the same way

AdminKey = Annotated[
    str | None, typer.Option("--admin-key", envvar="APPLIANCE_ADMIN_KEY", help="default: data/admin_key")
]
Json = Annotated[bool, typer.Option("--json")]
Priority = Annotated[str | None, typer.Option(
    help="interactive (served first when workers are busy) or batch (uses idle capacity)")]
Weight = Annotated[float | None, typer.Option(help="fair share against other busy keys (default 1)", min=0.001)]


def _limits(rpm: int | None, tpm: int | None, tpd: int | None, concurrency: int | None) -> dict[str, int]:
    limits = {"rpm": rpm, "tpm": tpm, "tpd": tpd, "max_concurrent": concurrency}
    return {k: v for k, v in limits.items() if v is not None}


def _scheduling(body: dict[str, Any], priority: str | None, weight: float | None) -> dict[str, Any]:
    if priority is not None:
        if priority not in ("interactive", "batch"):
            fail("--priority must be interactive or batch")
        body["priority"] = priority
    if weight is not None:
        body["weight"] = weight
    return body


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who or what the key is for")],
    scopes: Annotated[str, typer.Option(help="comma-separated: chat,embeddings,collections,admin")] = "chat,embeddings",
    models: Annotated[str | None, typer.Option(help="comma-separated model ids allowed (default all)")] = None,
    rpm: Annotated[int | None, typer.Option(help="requests per minute")] = None,
    tpm: Annotated[int | None, typer.Option(help="tokens per minute")] = None,
    tpd: Annotated[int | None, typer.Option(help="tokens per day")] = None,
    concurrency: Annotated[int | None, typer.Option(help="max concurrent requests")] = None,
    expires_days: Annotated[int | None, typer.Option(help="expire after N days")] = None,
    priority: Priority = None, weight: Weight = None,
    key: AdminKey = None, as_json: Json = False,
) -> None:
    """Create a key; its secret is printed once."""
    body: dict[str, Any] = {"name": name, "scopes": [s.strip() for s in scopes.split(",") if s.strip()]}
    if models:
        body["models"] = [m.strip() for m in models.split(",") if m.strip()]
    body["limits"] = _limits(rpm, tpm, tpd, concurrency)
    _scheduling(body, priority, weight)
    if expires_days:
        body["expires_in_s"] = expires_days * 86400
    created = _call(load(), key, "POST", "/admin/keys", json=body)
    if as_json:
        print_json(created)
        return
    out.print(f"Key {created.get('id')} for {name}: {created.get('key')}")
    err.print("Store it now: it is not shown again.")


@keys_app.command("update")
def keys_update(
    key_id: Annotated[str, typer.Argument(help="the key's id (key_...)")],
    priority: Priority = None, weight: Weight = None,
    rpm: Annotated[int | None, typer.Option(help="requests per minute")] = None,
    tpm: Annotated[int | None, typer.Option(help="tokens per minute")] = None,
    tpd: Annotated[int | None, typer.Option(help="tokens per day")] = None,
    concurrency: Annotated[int | None, typer.Option(help="max concurrent requests")] = None,
    key: AdminKey = None, as_json: Json = False,
) -> None:
    """Change a key's priority, weight or limits; effective at its next request."""
    body = _scheduling({"limits": _limits(rpm, tpm, tpd, concurrency)}, priority, weight)
    updated = _call(load(), key, "PATCH", f"/admin/keys/{key_id}", json=body)
    if as_json:
        print_json(updated)
        return
    err.print(f"[green]Updated[/] {key_id}: priority {updated.get('priority')}, weight {updated.get('weight')}, "
              f"limits {updated.get('limits')}.")


@keys_app.command("list")
def keys_list(key: AdminKey = None, as_json: Json = False) -> None:
    """List keys (never their secrets)."""
    listed = _call(load(), key, "GET", "/admin/keys")
    rows = listed.get("data", listed) if isinstance(listed, dict) else listed
    if as_json:
        print_json(rows)
        return
    table = Table("id", "name", "scopes", "models", "limits", "priority", "weight", "expires", "revoked")
    for row in rows:
        table.add_row(str(row.get("id")), str(row.get("name")), ",".join(row.get("scopes", [])),
                      ",".join(row.get("models") or []) or "all", str(row.get("limits") or {}),
                      str(row.get("priority", "interactive")), f"{row.get('weight', 1)}",
                      str(row.get("expires_at") or "-"), str(row.get("revoked", False)))
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, key: AdminKey = None) -> None:
    """Revoke a key; it stops working at once."""
    _call(load(), key, "DELETE", f"/admin/keys/{key_id}")
    err.print(f"[green]Revoked[/] {key_id}.")


def usage(
    key: AdminKey = None,
    as_json: Json = False,
    days: Annotated[int, typer.Option("--days", min=1, max=366, help="this many days back, today included")] = 1,
) -> None:
    """Requests, prompt and completion tokens per key per day (UTC)."""
    report = _call(load(), key, "GET", "/admin/usage", params={"days": days})
    if as_json:
        print_json(report)
        return
    rows = report.get("data", report) if isinstance(report, dict) else report
    table = Table("key", "day", "requests", "prompt tokens", "completion tokens")
    for row in rows:
        table.add_row(str(row.get("name") or row.get("key_id")), str(row.get("day")), str(row.get("requests", "")),
                      str(row.get("prompt_tokens")), str(row.get("completion_tokens")))
    out.print(table)


collections_app = typer.Typer(help="Who may read a collection.", no_args_is_help=True)


@collections_app.command("share")
def collections_share(
    name: Annotated[str, typer.Argument(help="the collection")],
    off: Annotated[bool, typer.Option("--off", help="make it admin-only again")] = False,
    key: AdminKey = None,
    as_json: Json = False,
) -> None:
    """Let every key with the collections scope read and search a collection (only admins change it)."""
    view = _share(load(), key, name, shared=not off)
    if as_json:
        print_json(view)
    else:
        out.print(f"{name}: {'shared with every key' if not off else 'admin keys only'}")


def _share(settings: RuntimeSettings, key: str | None, name: str, *, shared: bool) -> Any:
    return _call(settings, key, "PUT", f"/admin/collections/{quote(name, safe='')}/sharing", json={"shared": shared})


def _created(client: RagClient, name: str) -> bool:
    """Create the collection; False when it was there already."""
    from appliance.cli.rag_client import RagClientError

    try:
        client.create_collection(name)
    except RagClientError as exc:
        if exc.status != 409:
            raise
        return False
    return True


def ingest(
    path: Annotated[Path, typer.Argument(help="a file or a folder of documents")],
    collection: Annotated[str, typer.Option("--collection", "-c")],
    shared: Annotated[bool, typer.Option(
        "--shared", help="let every key with the collections scope read it (default: admin keys only)")] = False,
    key: AdminKey = None,
    as_json: Json = False,
) -> None:
    """Upload documents into a collection (created if needed), with a progress bar."""
    if not path.exists():
        fail(f"{path} does not exist")
    settings = load()
    from appliance.cli.rag_client import RagClient, RagClientError, ingest_path  # over HTTP, no rag/ import

    results: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with RagClient(f"http://127.0.0.1:{settings.rag_port}", settings.resolved_internal_token()) as client, \
                Progress(*columns, console=err, disable=as_json) as bar:
            task = bar.add_task(f"ingest into {collection}", total=None)
            if _created(client, collection):  # straight to the RAG service: the gateway does not see it
                record(settings, action="collection.create", target=f"collection:{collection}",
                       detail={"via": "ingest"})
            for step in ingest_path(client, path, collection, create=False):
                done = step.file_index - 1 + (step.fraction if step.state not in {"done", "duplicate"} else 1)
                label = f"{step.state:<9} {step.path.name}"
                bar.update(task, total=step.files_total, completed=done, description=label)
                if step.state in {"done", "duplicate", "failed", "skipped"}:
                    results.append({"path": str(step.path), "state": step.state, "error": step.error,
                                    "document": step.document})
    except RagClientError as exc:
        fail(f"the RAG service refused: {exc}")
    except httpx.HTTPError as exc:
        fail(f"the RAG service on port {settings.rag_port} is not reachable ({type(exc).__name__}); is the stack up?")
    if shared:
        _share(settings, key, collection, shared=True)
    if as_json:
        print_json(results)
        return
    counts = {state: sum(r["state"] == state for r in results) for state in ("done", "duplicate", "skipped", "failed")}
    out.print(f"{collection}: {counts['done']} ingested, {counts['duplicate']} already there, "
              f"{counts['skipped']} skipped (unsupported type), {counts['failed']} failed.")
    for row in results:
        if row["state"] == "failed":
            err.print(f"  [red]{row['path']}[/]: {row['error']}", highlight=False)
    if counts["failed"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(collections_app, name="collections")
    app.command()(usage)
    app.command()(ingest)
