"""Admin API for people who signed in: list, show (groups, role, usage, sessions), disable and enable.

Disabling a user ends every session at once (and a session still in flight is refused at its next request:
the middleware reads the user's record each time); the user cannot sign in again until enabled.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from litestar import Request, get, post
from litestar.params import FromPath, FromQuery

from appliance.core.errors import bad_request, not_found
from appliance.core.ids import KeyId
from gateway.access import access_record
from gateway.admission import parse_bearer, usage_key
from gateway.audit_trail import actor_of, audit
from gateway.auth.subject import UserSubject
from gateway.auth.users import UserRecord
from gateway.openapi import documented
from gateway.routes.auth import signed_in
from gateway.services import GatewayServices, Services

__all__ = ["HANDLERS", "disable_user", "enable_user", "get_user", "list_users"]

_ERRORS = (401, 403, 503)


async def _admin(request: Request[Any, Any, Any], svc: GatewayServices) -> str:
    """Admit an admin; the actor as the audit log names it (the signed-in person, or the key)."""
    record = access_record(request)
    ticket = await svc.admission.admit(parse_bearer(request.headers.get("authorization")), "admin", limited=False)
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    person = signed_in(request)
    return f"user:{person.user.subject}" if person else actor_of(ticket.principal)


async def _admin_read(request: Request[Any, Any, Any], svc: GatewayServices) -> None:
    """An admin read: the first one after a pause is an ``admin.view`` in the audit log (not every poll)."""
    actor = await _admin(request, svc)
    if svc.admin_views.is_new_view(actor):
        await audit(svc.audit, actor, "admin.view", f"admin:{request.url.path}")


async def _usage(svc: GatewayServices, days: int) -> list[tuple[dt.date, dict[str, int]]]:
    """Per day (today first), the usage hash: ``<key id>:<metric>`` -> count."""
    today = dt.datetime.now(dt.UTC).date()
    rows = []
    for offset in range(days):
        date = today - dt.timedelta(days=offset)
        raw: dict[Any, Any] = await svc.guard.client.hgetall(usage_key(date))
        rows.append((date, {field.decode(): int(value) for field, value in raw.items()}))
    return rows


def _tokens(day: dict[str, int], key_id: str) -> int:
    return day.get(f"{key_id}:prompt_tokens", 0) + day.get(f"{key_id}:completion_tokens", 0)


def _row(user: UserRecord, today: dict[str, int]) -> dict[str, Any]:
    return {**user.public_view(), "usage_today_tokens": _tokens(today, user.key_id) if user.key_id else 0}


@get("/admin/users", summary="People who signed in: role, groups, disabled, last sign-in, tokens today",
     opt=documented(errors=_ERRORS))
async def list_users(request: Request[Any, Any, Any], svc: Services) -> dict[str, Any]:
    await _admin_read(request, svc)
    [(_, today)] = await _usage(svc, 1)
    return {"object": "list", "data": [_row(user, today) for user in await svc.web_auth.users.list()]}


async def _user(svc: GatewayServices, subject: str) -> UserRecord:
    user = await svc.web_auth.users.get(UserSubject.parse(subject, param="subject"))
    if user is None:
        raise not_found("No user with that subject.", param="subject", code="user_not_found")
    return user


@get("/admin/users/{subject:str}", summary="One user: groups, the groups that made the role, usage per day",
     opt=documented(errors=(400, 404, *_ERRORS)))
async def get_user(request: Request[Any, Any, Any], svc: Services, subject: FromPath[str],
                   days: FromQuery[int] = 7) -> dict[str, Any]:
    await _admin_read(request, svc)
    if not 1 <= days <= 366:
        raise bad_request("days must be between 1 and 366.", param="days")
    user = await _user(svc, subject)
    usage = await _usage(svc, days)
    per_day = [{"day": date.isoformat(), "requests": day.get(f"{user.key_id}:requests", 0),
                "prompt_tokens": day.get(f"{user.key_id}:prompt_tokens", 0),
                "completion_tokens": day.get(f"{user.key_id}:completion_tokens", 0)} for date, day in usage]
    key = await svc.keys.get(KeyId(user.key_id)) if KeyId.matches(user.key_id) else None
    return {**_row(user, usage[0][1]), "usage": per_day,
            "sessions": await svc.web_auth.sessions.count(user.subject),
            "key": key}


async def _set_disabled(request: Request[Any, Any, Any], svc: GatewayServices, subject: str,
                        disabled: bool) -> dict[str, Any]:
    actor = await _admin(request, svc)
    user = await _user(svc, subject)
    changed = await svc.web_auth.users.set_disabled(user.subject, disabled)
    assert changed is not None
    ended = await svc.web_auth.sessions.end_all(user.subject) if disabled else 0
    await audit(svc.audit, actor, "user.disable" if disabled else "user.enable", f"user:{user.subject}",
                detail={"sessions_ended": ended})
    return {**changed.public_view(), "sessions_ended": ended}


@post("/admin/users/{subject:str}/disable", status_code=200,
      summary="Disable a user: every session ends now, sign-in is refused until enabled",
      opt=documented(errors=(400, 404, *_ERRORS)))
async def disable_user(request: Request[Any, Any, Any], svc: Services, subject: FromPath[str]) -> dict[str, Any]:
    return await _set_disabled(request, svc, subject, True)


@post("/admin/users/{subject:str}/enable", status_code=200, summary="Let a disabled user sign in again",
      opt=documented(errors=(400, 404, *_ERRORS)))
async def enable_user(request: Request[Any, Any, Any], svc: Services, subject: FromPath[str]) -> dict[str, Any]:
    return await _set_disabled(request, svc, subject, False)


HANDLERS = [list_users, get_user, disable_user, enable_user]
