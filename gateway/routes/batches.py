"""OpenAI's Batch API: create from an uploaded JSONL file (every line checked first), retrieve, list, cancel;
and the admins' view (``GET /admin/batches``, the dashboard's panel).

A batch belongs to the key that created it: another key gets the 404 of a batch that does not exist.
Its lines run later as that key, at batch priority (``gateway.batches.runner``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from litestar import Request, get, post
from litestar.params import FromPath
from pydantic import BaseModel, ConfigDict

from appliance.core.errors import APIError, bad_request, forbidden, not_found
from appliance.core.ids import BatchId, FileId
from gateway.access import access_record
from gateway.admission import parse_bearer
from gateway.batches import Batches
from gateway.batches.lines import ENDPOINTS, parse_lines, problems_error
from gateway.batches.records import TERMINAL, BatchRecord
from gateway.generation import decode_body
from gateway.keys import Principal
from gateway.openapi import documented
from gateway.routes.files import BatchesDep, missing_file, page_of
from gateway.services import GatewayServices, Services

__all__ = ["HANDLERS"]

_ERRORS = (400, 401, 403, 404, 503)
WINDOWS = ("24h",)
_WINDOW_S = {"24h": 86400}


class NewBatch(BaseModel):
    """``POST /v1/batches`` (OpenAI's fields)."""

    model_config = ConfigDict(extra="allow")
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


async def _principal(request: Request[Any, Any, Any], svc: GatewayServices, scope: str) -> Principal:
    record = access_record(request)
    ticket = await svc.admission.admit(parse_bearer(request.headers.get("authorization")), scope, limited=False)
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    return ticket.principal


def _missing() -> APIError:
    return not_found("No such batch (or one this key may not see).", param="batch_id", code="batch_not_found")


def _metadata(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in raw.items()):
        raise bad_request("metadata is at most 16 string pairs (keys up to 64, values up to 512 characters).",
                          param="metadata", code="invalid_metadata")
    return dict(raw)


@post("/v1/batches", summary="Create a batch from an uploaded JSONL file (OpenAI Batch API)", status_code=200,
      opt=documented(body=NewBatch, errors=_ERRORS))
async def create_batch(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep) -> dict[str, Any]:
    principal = await _principal(request, svc, "chat")
    payload = decode_body(await request.body())
    endpoint = payload.get("endpoint")
    if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
        raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)}.", param="endpoint",
                          code="invalid_endpoint")
    if ENDPOINTS[endpoint] not in principal.scopes:
        raise forbidden(f"This API key lacks the '{ENDPOINTS[endpoint]}' scope its lines need.")
    window = payload.get("completion_window", "24h")
    if not isinstance(window, str) or window not in WINDOWS:
        raise bad_request("completion_window must be '24h'.", param="completion_window",
                          code="invalid_completion_window")
    metadata = _metadata(payload.get("metadata"))
    file_id = FileId.parse(payload.get("input_file_id"), param="input_file_id")
    item = await asyncio.to_thread(batches.files.get, principal.key_id, file_id)
    if item is None:
        raise missing_file("input_file_id")
    if item.purpose != "batch":
        raise bad_request("The input file's purpose must be 'batch'.", param="input_file_id",
                          code="invalid_input_file")
    source = batches.files.content_path(principal.key_id, file_id)
    raw = await asyncio.to_thread(source.read_bytes)
    settings = batches.settings
    lines, problems = parse_lines(raw, endpoint, allows_model=principal.allows_model,
                                  max_lines=settings.batch_max_lines, max_line_bytes=settings.max_body_bytes)
    if problems or not lines:
        raise problems_error(problems, empty=not problems)
    now = int(time.time())
    record = BatchRecord(id=str(BatchId.mint()), key_id=principal.key_id, key_name=principal.name,
                         endpoint=endpoint, input_file_id=str(file_id), completion_window=window, created_at=now,
                         expires_at=now + _WINDOW_S[window], out_id=str(FileId.mint()), err_id=str(FileId.mint()),
                         metadata=metadata, total=len(lines))
    await asyncio.to_thread(batches.journal(BatchId.trusted(record.id)).create, source)
    await batches.store.create(record)
    await svc.audit.append_async(actor=f"key:{principal.key_id}", action="batch.create", target=record.id,
                                 detail={"endpoint": endpoint, "lines": len(lines), "file": str(file_id)})
    batches.runner.wake()
    return record.view(None)


async def _owned(request: Request[Any, Any, Any], svc: GatewayServices, batches: Batches,
                 batch_id: str) -> tuple[Principal, BatchRecord, int | None]:
    principal = await _principal(request, svc, "chat")
    parsed = BatchId.parse(batch_id, param="batch_id")
    found = await batches.store.get(parsed)
    if found is None or found[0].key_id != principal.key_id:
        raise _missing()
    return principal, found[0], found[1]


@get("/v1/batches/{batch_id:str}", summary="One batch of this key", opt=documented(errors=_ERRORS))
async def retrieve_batch(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep,
                         batch_id: FromPath[str]) -> dict[str, Any]:
    _, record, cancel_at = await _owned(request, svc, batches, batch_id)
    return record.view(cancel_at)


@post("/v1/batches/{batch_id:str}/cancel", summary="Cancel a batch: lines not started are not run",
      status_code=200, opt=documented(errors=(*_ERRORS, 409)))
async def cancel_batch(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep,
                       batch_id: FromPath[str]) -> dict[str, Any]:
    principal, record, cancel_at = await _owned(request, svc, batches, batch_id)
    return await _cancel(svc, batches, record, cancel_at, principal.key_id)


async def _cancel(svc: GatewayServices, batches: Batches, record: BatchRecord, cancel_at: int | None,
                  actor_key: str) -> dict[str, Any]:
    """Ask the batch's runner to stop taking lines (audited once); the batch object as it now reads."""
    if record.status in TERMINAL and record.status != "cancelled":
        raise APIError(409, f"The batch is {record.status}; only a running batch can be cancelled.",
                       param="batch_id", code="batch_not_cancellable")
    if cancel_at is None and record.status not in TERMINAL:
        await batches.store.request_cancel(record.id)
        detail = {} if actor_key == record.key_id else {"owner": record.key_id}
        await svc.audit.append_async(actor=f"key:{actor_key}", action="batch.cancel", target=record.id,
                                     detail=detail)
        batches.runner.cancel(record.id)
    found = await batches.store.get(record.id)
    return found[0].view(found[1]) if found is not None else record.view(cancel_at)


async def _page(batches: Batches, key_id: str | None, query: Any, *, admin: bool) -> dict[str, Any]:
    raw = query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise bad_request("limit must be between 1 and 100.", param="limit")
    after = query.get("after")
    ids, more = await batches.store.page(key_id, BatchId.parse(after, param="after") if after else None, int(raw))
    views = []
    for batch_id in ids:
        found = await batches.store.get(batch_id)
        if found is not None:
            views.append(found[0].admin_view(found[1]) if admin else found[0].view(found[1]))
    return page_of(views, more)


@get("/v1/batches", summary="This key's batches, newest first", opt=documented(errors=_ERRORS))
async def list_batches(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep) -> dict[str, Any]:
    principal = await _principal(request, svc, "chat")
    return await _page(batches, principal.key_id, request.query_params, admin=False)


@get("/admin/batches", summary="Every key's batches, newest first (admin dashboard)",
     opt=documented(errors=(400, 401, 403, 503)))
async def admin_batches(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep) -> dict[str, Any]:
    await _principal(request, svc, "admin")
    return await _page(batches, None, request.query_params, admin=True)


@get("/admin/batches/{batch_id:str}", summary="One batch of any key (admin)", opt=documented(errors=_ERRORS))
async def admin_batch(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep,
                      batch_id: FromPath[str]) -> dict[str, Any]:
    await _principal(request, svc, "admin")
    found = await batches.store.get(BatchId.parse(batch_id, param="batch_id"))
    if found is None:
        raise _missing()
    return {**found[0].view(found[1]), "key_id": found[0].key_id, "key_name": found[0].key_name}


@post("/admin/batches/{batch_id:str}/cancel", summary="Cancel any key's batch (admin)", status_code=200,
      opt=documented(errors=(*_ERRORS, 409)))
async def admin_cancel(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep,
                       batch_id: FromPath[str]) -> dict[str, Any]:
    admin = await _principal(request, svc, "admin")
    found = await batches.store.get(BatchId.parse(batch_id, param="batch_id"))
    if found is None:
        raise _missing()
    viewed = await _cancel(svc, batches, found[0], found[1], admin.key_id)
    return {**viewed, "key_id": found[0].key_id, "key_name": found[0].key_name}


HANDLERS = (create_batch, retrieve_batch, cancel_batch, list_batches, admin_batches, admin_batch, admin_cancel)
