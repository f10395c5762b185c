"""`/v1/collections…` and `/v1/jobs/{id}`: the RAG service's API for keys with the ``collections`` scope."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, Router, route
from litestar.background_tasks import BackgroundTask

from appliance.core.errors import bad_request
from gateway.access import access_record
from gateway.admission import parse_bearer
from gateway.keys import Principal
from gateway.ownership import collection_of
from gateway.services import GatewayServices
from gateway.upstream import decode_json_object, ensure_error_body

__all__ = ["collections_router"]

_METHODS: list[Any] = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_FORWARDED_HEADERS = ("content-type", "accept")


async def _forward(request: Request[Any, Any, Any], svc: GatewayServices, target: str) -> Response[Any]:
    if ".." in target.split("/") or "%" in target or "\\" in target:
        raise bad_request("Invalid collection path.", param="path")
    record = access_record(request)
    ticket = await svc.admission.admit(parse_bearer(request.headers.get("authorization")), "collections")
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    try:
        name = collection_of(target)
        if name is not None:
            writes = request.method not in ("GET", "HEAD") and not target.rstrip("/").endswith("/search")
            await svc.owners.check(name, ticket.principal, write=writes)
        body = await request.body() if request.method in ("POST", "PUT", "PATCH") else None
        headers = {name: request.headers[name] for name in _FORWARDED_HEADERS if name in request.headers}
        started = time.perf_counter()
        reply = await svc.rag.request(request.method, target, body=body, headers=headers,
                                      params=dict(request.query_params))
        record.upstream_s = time.perf_counter() - started
    except BaseException:
        svc.tasks.spawn(svc.admission.settle(ticket))
        raise
    content = reply.body if reply.status < 400 else ensure_error_body(reply.status, reply.body)
    if target == "/collections" and reply.status < 400:
        content = await _owned_view(svc, ticket.principal, request.method, body, content)
    elif name is not None and request.method == "DELETE" and target.rstrip("/") == f"/collections/{name}" \
            and reply.status < 400:
        await svc.owners.release(name)
    kept = {k: v for k, v in reply.headers.items() if k.lower() in ("location", "retry-after")}
    return Response(content, status_code=reply.status, media_type=reply.content_type,
                    headers={**kept, **ticket.rate_headers}, background=BackgroundTask(svc.admission.settle, ticket))


async def _owned_view(svc: GatewayServices, principal: Principal, method: str, body: bytes | None,
                      content: bytes) -> bytes:
    """After a create, record the owner; on a listing, keep only what this key may see."""
    if method == "POST":
        created = decode_json_object(body or b"{}", "request")
        if isinstance(created.get("name"), str):
            await svc.owners.claim(created["name"], principal)
        return content
    listing = decode_json_object(content, "rag service")
    owners = await svc.owners.owners()
    for field in ("collections", "data"):
        if isinstance(listing.get(field), list):
            listing[field] = [c for c in listing[field]
                              if isinstance(c, dict) and svc.owners.visible(principal, owners, str(c.get("name")))]
    return msgspec.json.encode(listing)


@route("/collections", http_method=_METHODS, summary="List or create collections (RAG)", status_code=200)
async def collections_root(request: Request[Any, Any, Any], svc: GatewayServices) -> Response[Any]:
    return await _forward(request, svc, "/collections")


@route("/collections/{path:path}", http_method=_METHODS, summary="Collections, documents and search (RAG)",
       status_code=200)
async def collections_path(request: Request[Any, Any, Any], svc: GatewayServices, path: str) -> Response[Any]:
    return await _forward(request, svc, "/collections/" + path.lstrip("/"))


@route("/jobs/{job_id:str}", http_method=["GET"], summary="Progress of a large upload (RAG)", status_code=200)
async def job_status(request: Request[Any, Any, Any], svc: GatewayServices, job_id: str) -> Response[Any]:
    return await _forward(request, svc, f"/jobs/{job_id}")


def collections_router(max_upload_bytes: int) -> Router:
    return Router(path="/v1", route_handlers=[collections_root, collections_path, job_status],
                  request_max_body_size=max_upload_bytes)
