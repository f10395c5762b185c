"""`appliance users list|show|disable|enable`: people who signed in with the OpenID provider, over the gateway's
admin API (``/admin/users``)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table

from appliance.cli.admin import AdminKey, Json
from appliance.cli.admin import _call as gateway_call  # the one admin-API call (errors as one sentence)
from appliance.cli.context import load
from appliance.cli.output import err, out, print_json

__all__ = ["register"]

users_app = typer.Typer(help="People who signed in with the identity provider: list, show, disable, enable.",
                        no_args_is_help=True)
Subject = Annotated[str, typer.Argument(help="the user's subject (the provider's sub; see `appliance users list`)")]


def _when(epoch: Any) -> str:
    if not epoch:
        return "-"
    return dt.datetime.fromtimestamp(float(epoch), dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@users_app.command("list")
def users_list(key: AdminKey = None, as_json: Json = False) -> None:
    """Every user: role, the groups that made it, disabled, last sign-in, tokens used today."""
    listed = gateway_call(load(), key, "GET", "/admin/users")
    rows = listed.get("data", []) if isinstance(listed, dict) else []
    if as_json:
        print_json(rows)
        return
    table = Table("subject", "email", "role", "groups", "disabled", "last sign-in", "tokens today")
    for row in rows:
        role = row.get("role", "user") + (f" (via {', '.join(row['role_groups'])})" if row.get("role_groups") else "")
        table.add_row(str(row.get("subject")), str(row.get("email") or "-"), role, ", ".join(row.get("groups") or []),
                      "yes" if row.get("disabled") else "no", _when(row.get("last_sign_in")),
                      str(row.get("usage_today_tokens", 0)))
    out.print(table)


@users_app.command("show")
def users_show(subject: Subject, days: Annotated[int, typer.Option(min=1, max=366, help="usage days")] = 7,
               key: AdminKey = None, as_json: Json = False) -> None:
    """One user: groups, role and the groups behind it, live sessions, their key, usage per day."""
    user = gateway_call(load(), key, "GET", f"/admin/users/{quote(subject, safe='')}", params={"days": days})
    if as_json:
        print_json(user)
        return
    out.print(f"[bold]{user.get('name') or user.get('subject')}[/] <{user.get('email') or '-'}>  "
              f"subject {user.get('subject')}", highlight=False)
    out.print(f"role {user.get('role')}" + (f" (via {', '.join(user['role_groups'])})" if user.get("role_groups")
                                           else "") + f"; groups: {', '.join(user.get('groups') or []) or '-'}",
              highlight=False)
    out.print(f"disabled: {'yes' if user.get('disabled') else 'no'}; live sessions: {user.get('sessions', 0)}; "
              f"first seen {_when(user.get('created_at'))}; last sign-in {_when(user.get('last_sign_in'))}",
              highlight=False)
    keyview = user.get("key") or {}
    out.print(f"key {keyview.get('id', '-')}: scopes {','.join(keyview.get('scopes') or [])}, "
              f"limits {keyview.get('limits') or {}}, revoked {keyview.get('revoked', False)}", highlight=False)
    table = Table("day", "requests", "prompt tokens", "completion tokens")
    for row in user.get("usage") or []:
        table.add_row(str(row["day"]), str(row["requests"]), str(row["prompt_tokens"]), str(row["completion_tokens"]))
    out.print(table)


def _switch(subject: str, key: str | None, action: str) -> dict[str, Any]:
    changed: dict[str, Any] = gateway_call(load(), key, "POST", f"/admin/users/{quote(subject, safe='')}/{action}")
    return changed


@users_app.command("disable")
def users_disable(subject: Subject, key: AdminKey = None, as_json: Json = False) -> None:
    """Disable a user: their sessions end now and they cannot sign in until enabled."""
    changed = _switch(subject, key, "disable")
    if as_json:
        print_json(changed)
        return
    err.print(f"[green]Disabled[/] {subject}: {changed.get('sessions_ended', 0)} session(s) ended.", highlight=False)


@users_app.command("enable")
def users_enable(subject: Subject, key: AdminKey = None, as_json: Json = False) -> None:
    """Let a disabled user sign in again."""
    changed = _switch(subject, key, "enable")
    if as_json:
        print_json(changed)
        return
    err.print(f"[green]Enabled[/] {subject}.", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(users_app, name="users")
