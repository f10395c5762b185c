"""Admin API: keys, usage, status. Every route needs a key with the ``admin`` scope."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Literal

from litestar import Request, Response, delete, get, patch, post, put
from litestar.params import FromPath, FromQuery
from pydantic import BaseModel, ConfigDict, Field

from appliance.core.errors import APIError, bad_request, not_found
from appliance.core.ids import CollectionName, KeyId
from appliance.core.wire import parse_request
from gateway.access import access_record
from gateway.admission import STATS, parse_bearer, usage_key
from gateway.audit_trail import actor_of, audit
from gateway.generation import decode_body
from gateway.keys import MAX_WEIGHT, SCOPES, KeyLimits, Principal
from gateway.openapi import documented, link
from gateway.redis_guard import RedisUnavailable
from gateway.service_client import decode_json_object
from gateway.services import GatewayServices, Services

__all__ = ["admin_status", "create_key", "get_key", "list_keys", "queue", "revoke_key", "share_collection",
           "update_key", "usage"]

Priority = Literal["interactive", "batch"]


class LimitsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    tpd: int | None = Field(default=None, ge=0)
    max_concurrent: int | None = Field(default=None, ge=0)


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w .@:-]+$")
    scopes: list[str] = Field(default_factory=lambda: ["chat", "embeddings"])
    models: list[str] = Field(default_factory=list)
    limits: LimitsIn = Field(default_factory=LimitsIn)
    expires_in_s: float | None = Field(default=None, gt=0)
    priority: Priority = Field(default="interactive", description="Scheduling class when workers are busy.")
    weight: float = Field(default=1.0, gt=0, le=MAX_WEIGHT, description="Fair share among busy keys.")


class KeyUpdate(BaseModel):
    """What an admin may change on a live key (effective at its next request)."""

    model_config = ConfigDict(extra="forbid")
    priority: Priority | None = None
    weight: float | None = Field(default=None, gt=0, le=MAX_WEIGHT)
    limits: LimitsIn = Field(default_factory=LimitsIn)


async def _admin(request: Request[Any, Any, Any], svc: GatewayServices) -> Principal:
    record = access_record(request)
    ticket = await svc.admission.admit(parse_bearer(request.headers.get("authorization")), "admin", limited=False)
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    return ticket.principal


async def _admin_read(request: Request[Any, Any, Any], svc: GatewayServices) -> Principal:
    """An admin read: the first one after a pause is an ``admin.view`` in the audit log (not every poll)."""
    principal = await _admin(request, svc)
    if svc.admin_views.is_new_view(actor_of(principal)):
        await audit(svc.audit, principal, "admin.view", f"admin:{request.url.path}")
    return principal


_ADMIN_ERRORS = (401, 403, 503)


@post("/admin/keys", summary="Create an API key (the secret is returned once)", status_code=201,
      opt=documented(body=NewKey, answers={201: None}, errors=(400, 413, *_ADMIN_ERRORS), links={201: {
          "GetKey": link("GET", "/admin/keys/{key_id}", key_id="$response.body#/id"),
          "RevokeKey": link("DELETE", "/admin/keys/{key_id}", key_id="$response.body#/id")}}))
async def create_key(request: Request[Any, Any, Any], svc: Services) -> dict[str, Any]:
    admin = await _admin(request, svc)
    spec = parse_request(NewKey, decode_body(await request.body()))
    unknown = set(spec.scopes) - SCOPES
    if unknown or not spec.scopes:
        raise bad_request(f"scopes must be a non-empty subset of {sorted(SCOPES)}.", param="scopes")
    s = svc.settings
    limits = KeyLimits(
        rpm=s.default_rpm if spec.limits.rpm is None else spec.limits.rpm,
        tpm=s.default_tpm if spec.limits.tpm is None else spec.limits.tpm,
        tpd=s.default_tpd if spec.limits.tpd is None else spec.limits.tpd,
        max_concurrent=s.default_max_concurrent if spec.limits.max_concurrent is None else spec.limits.max_concurrent,
    )
    expires_at = time.time() + spec.expires_in_s if spec.expires_in_s else 0.0
    secret, view = await svc.keys.create(spec.name, set(spec.scopes), limits, models=set(spec.models),
                                         expires_at=expires_at, priority=spec.priority, weight=spec.weight)
    await audit(svc.audit, admin, "key.create", f"key:{view['id']}",
                detail={"name": spec.name, "scopes": ",".join(sorted(spec.scopes)), "priority": spec.priority})
    return {**view, "key": secret}


@patch("/admin/keys/{key_id:str}", summary="Change a key's priority, weight or limits",
       opt=documented(body=KeyUpdate, errors=(400, 404, 413, *_ADMIN_ERRORS)))
async def update_key(request: Request[Any, Any, Any], svc: Services, key_id: FromPath[str]) -> dict[str, Any]:
    admin = await _admin(request, svc)
    spec = parse_request(KeyUpdate, decode_body(await request.body()))
    fields = {name: str(value) for name, value in spec.limits.model_dump(exclude_none=True).items()}
    if spec.priority is not None:
        fields["priority"] = spec.priority
    if spec.weight is not None:
        fields["weight"] = repr(spec.weight)
    kid = KeyId.parse(key_id, param="key_id")
    view = await svc.keys.update(kid, fields)
    if view is None:
        raise not_found(f"No key with id {key_id!r}.", param="key_id")
    await audit(svc.audit, admin, "key.update", f"key:{kid}", detail=fields)
    return view


@get("/admin/keys", summary="List API keys (never their secrets)", opt=documented(errors=_ADMIN_ERRORS))
async def list_keys(request: Request[Any, Any, Any], svc: Services) -> dict[str, Any]:
    await _admin_read(request, svc)
    return {"object": "list", "data": await svc.keys.list()}


@get("/admin/keys/{key_id:str}", summary="One API key", opt=documented(errors=(400, 404, *_ADMIN_ERRORS)))
async def get_key(request: Request[Any, Any, Any], svc: Services, key_id: FromPath[str]) -> dict[str, Any]:
    await _admin_read(request, svc)
    view = await svc.keys.get(KeyId.parse(key_id, param="key_id"))
    if view is None:
        raise not_found(f"No key with id {key_id!r}.", param="key_id")
    return view


@delete("/admin/keys/{key_id:str}", summary="Revoke an API key (effective at once)", status_code=200,
        opt=documented(errors=(400, 404, *_ADMIN_ERRORS)))
async def revoke_key(request: Request[Any, Any, Any], svc: Services, key_id: FromPath[str]) -> dict[str, Any]:
    admin = await _admin(request, svc)
    kid = KeyId.parse(key_id, param="key_id")
    if not await svc.keys.revoke(kid):
        raise not_found(f"No key with id {key_id!r}.", param="key_id")
    await audit(svc.audit, admin, "key.revoke", f"key:{kid}")
    return {"id": key_id, "revoked": True}


class Sharing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shared: bool = Field(description="true: every key with the collections scope may read it; false: admins only")


@put("/admin/collections/{name:str}/sharing", summary="Share a collection with every key, or make it admin-only",
     opt=documented(body=Sharing, errors=(400, 404, 413, *_ADMIN_ERRORS)))
async def share_collection(request: Request[Any, Any, Any], svc: Services, name: FromPath[str]) -> dict[str, Any]:
    """Sharing is explicit and only an admin sets it; the owner stays (a key's collection is private to it again
    once unshared; a collection without a record becomes the admins')."""
    admin = await _admin(request, svc)
    collection = CollectionName.parse(name, param="name")
    spec = parse_request(Sharing, decode_body(await request.body()))
    reply = await svc.rag.request("GET", f"/collections/{collection.segment()}", caller=None)
    if reply.status == 404:
        raise not_found(f"No collection named {collection!r}.", param="name", code="collection_not_found")
    if reply.status != 200:
        raise APIError(502, f"The RAG service answered {reply.status}.", type_="server_error",
                       code="bad_upstream_response")
    access = await svc.owners.set_shared(collection, spec.shared)
    await audit(svc.audit, admin, "collection.share", f"collection:{collection}",
                detail={"shared": spec.shared, "access": str(access)})
    return {"name": str(collection), "object": "collection", "access": access}


@get("/admin/usage", summary="Requests and tokens per key per day (UTC)",
     opt=documented(errors=(400, *_ADMIN_ERRORS)))
async def usage(request: Request[Any, Any, Any], svc: Services, days: FromQuery[int] = 1,
                day: FromQuery[str | None] = None, key_id: FromQuery[str | None] = None) -> dict[str, Any]:
    admin = await _admin_read(request, svc)
    try:
        last = dt.date.fromisoformat(day) if day else dt.datetime.now(dt.UTC).date()
    except ValueError:
        raise bad_request("day must be YYYY-MM-DD.", param="day") from None
    if not 1 <= days <= 366:
        raise bad_request("days must be between 1 and 366.", param="days")
    only = None if key_id is None else KeyId.parse(key_id, param="key_id")
    await audit(svc.audit, admin, "usage.read", f"key:{only}" if only else "usage",
                detail={"days": days, "last_day": last.isoformat()})
    names = await svc.keys.names()
    rows: list[dict[str, Any]] = []
    for offset in range(days):
        date = last - dt.timedelta(days=offset)
        raw: dict[Any, Any] = await svc.guard.client.hgetall(usage_key(date))
        rows.extend(_usage_rows(date, raw, names, only))
    return {"object": "list", "data": rows}


def _usage_rows(date: dt.date, raw: dict[Any, Any], names: dict[str, str],
                only: KeyId | None) -> list[dict[str, Any]]:
    per_key: dict[str, dict[str, Any]] = {}
    for field, value in raw.items():
        kid, _, metric = field.decode().rpartition(":")
        if only and kid != only:
            continue
        row = per_key.setdefault(kid, {"day": date.isoformat(), "key_id": kid, "name": names.get(kid, ""),
                                       "requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
        row[metric] = int(value)
    return sorted(per_key.values(), key=lambda row: row["key_id"])


@get("/admin/queue", summary="Who waits for a worker (per model, per key), from the balancer",
     opt=documented(errors=(502, *_ADMIN_ERRORS)))
async def queue(request: Request[Any, Any, Any], svc: Services) -> dict[str, Any]:
    await _admin_read(request, svc)
    reply = await svc.balancer.request("GET", "/queue", caller=None)
    if reply.status != 200:
        raise APIError(502, f"The balancer answered {reply.status} for its queue.", type_="server_error",
                       code="bad_upstream_response")
    document = decode_json_object(reply.body, "balancer")
    names = await svc.keys.names()
    for model in document.get("models") or []:
        for row in model.get("keys") or []:
            row["name"] = names.get(str(row.get("key_id")), "")
    return document


@get("/admin/status", summary="Dependencies, workers behind the balancer, cache hit rate",
     opt=documented(answers={200: None}, errors=_ADMIN_ERRORS))
async def admin_status(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    await _admin_read(request, svc)
    await svc.catalog.refresh()
    try:
        raw: dict[Any, Any] = await svc.guard.call(lambda: svc.guard.client.hgetall(STATS))
        stats = {k.decode(): int(v) for k, v in raw.items()}
    except RedisUnavailable:
        stats = {}
    hits, misses = stats.get("cache_hit", 0), stats.get("cache_miss", 0)
    return Response({
        "redis": svc.guard.up,
        "balancer": {"up": svc.catalog.balancer_up, "health": svc.catalog.balancer_health},
        "workers": svc.catalog.workers,
        "cache": {"hits": hits, "misses": misses, "bypass": stats.get("cache_bypass", 0),
                  "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None},
    })
