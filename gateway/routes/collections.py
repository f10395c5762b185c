"""`/v1/collections…` and `/v1/jobs/{id}`: the RAG service's API for keys with the ``collections`` scope."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.background_tasks import BackgroundTask
from litestar.exceptions import HTTPException
from litestar.params import FromPath, FromQuery

from appliance.core.errors import bad_request, payload_too_large
from appliance.core.rag_wire import FileDocument, NewCollection, SearchQuery, TextDocument
from gateway.access import access_record
from gateway.admission import parse_bearer
from gateway.keys import Principal
from gateway.openapi import JSON, documented, link
from gateway.ownership import collection_of
from gateway.services import GatewayServices, Services
from gateway.upstream import decode_json_object, ensure_error_body

__all__ = ["collections_router"]

_FORWARDED_HEADERS = ("content-type", "accept")


class _StreamedUpload:
    """An upload passed on to the RAG service as it arrives, so the gateway never holds it whole.

    Litestar enforces the size limit while streaming; when it refuses, the upstream request is
    aborted mid-body (RAG sees a broken chunked body and ingests nothing) and the client gets a 413.
    """

    def __init__(self, request: Request[Any, Any, Any]) -> None:
        self._request = request
        self.refused: HTTPException | None = None
        limit = request.route_handler.resolve_request_max_body_size()
        declared = request.content_length
        if limit and declared is not None and declared > limit:  # refused before RAG is even contacted
            raise payload_too_large("Request body too large.")

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._request.stream():
                yield chunk
        except HTTPException as exc:
            self.refused = exc
            raise


async def _forward(request: Request[Any, Any, Any], svc: GatewayServices, target: str,
                   *, streamed: bool = False) -> Response[Any]:
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
        upload = _StreamedUpload(request) if streamed else None
        body = await request.body() if request.method == "POST" and upload is None else None
        headers = {name: request.headers[name] for name in _FORWARDED_HEADERS if name in request.headers}
        started = time.perf_counter()
        try:
            reply = await svc.rag.request(request.method, target, body=upload.chunks() if upload else body,
                                          headers=headers, params=dict(request.query_params))
        except Exception:
            # Cutting the upload off aborts the RAG request (seen here as a payload or connection error):
            # the client's answer is the 413, not a 503 about the RAG service.
            if upload is not None and upload.refused is not None:
                raise upload.refused from None
            raise
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
    # An error body is always JSON, even when an upstream sent (and the gateway wrapped) something else.
    media_type = reply.content_type if reply.status < 400 else JSON
    return Response(content, status_code=reply.status, media_type=media_type,
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


_ERRORS = (400, 401, 403, 404, 429, 502, 503)


_DOCUMENT_LINKS = {
    "GetDocument": link("GET", "/v1/collections/{name}/documents/{document_id}", name="$request.path.name",
                        document_id="$response.body#/id"),
    "DeleteDocument": link("DELETE", "/v1/collections/{name}/documents/{document_id}", name="$request.path.name",
                           document_id="$response.body#/id"),
}


# The RAG service validates these bodies (appliance.core.rag_wire, docs/CONTRACTS.md); here they document them.
@get("/collections", summary="Collections this key may see (RAG)", opt=documented(errors=_ERRORS))
async def list_collections(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    return await _forward(request, svc, "/collections")


@post(
    "/collections",
    summary="Create a collection, owned by this key (shared if an admin key)",
    status_code=201,
    opt=documented(
        body=NewCollection,
        answers={201: None},
        errors=(*_ERRORS, 409, 413),
        links={
            201: {
                "GetCollection": link("GET", "/v1/collections/{name}", name="$request.body#/name"),
                "Upload": link("POST", "/v1/collections/{name}/documents", name="$request.body#/name"),
                "Search": link("POST", "/v1/collections/{name}/search", name="$request.body#/name"),
                "DeleteCollection": link("DELETE", "/v1/collections/{name}", name="$request.body#/name"),
            }
        },
    ),
)
async def create_collection(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    return await _forward(request, svc, "/collections")


@get("/collections/{name:str}", summary="One collection (RAG)", opt=documented(errors=_ERRORS))
async def get_collection(request: Request[Any, Any, Any], svc: Services, name: FromPath[str]) -> Response[Any]:
    return await _forward(request, svc, f"/collections/{name}")


@delete(
    "/collections/{name:str}",
    summary="Delete a collection and its documents",
    status_code=200,
    opt=documented(answers={200: None}, errors=_ERRORS),
)
async def delete_collection(request: Request[Any, Any, Any], svc: Services, name: FromPath[str]) -> Response[Any]:
    return await _forward(request, svc, f"/collections/{name}")


@get("/collections/{name:str}/documents", summary="Documents of a collection", opt=documented(errors=_ERRORS))
async def list_documents(request: Request[Any, Any, Any], svc: Services, name: FromPath[str]) -> Response[Any]:
    return await _forward(request, svc, f"/collections/{name}/documents")


async def upload_document(
    request: Request[Any, Any, Any], svc: Services, name: FromPath[str], background: FromQuery[bool] = False
) -> Response[Any]:
    """Registered by :func:`collections_router`, which knows the upload size limit."""
    return await _forward(request, svc, f"/collections/{name}/documents", streamed=True)


@get("/collections/{name:str}/documents/{document_id:str}", summary="One document", opt=documented(errors=_ERRORS))
async def get_document(
    request: Request[Any, Any, Any], svc: Services, name: FromPath[str], document_id: FromPath[str]
) -> Response[Any]:
    return await _forward(request, svc, f"/collections/{name}/documents/{document_id}")


@delete(
    "/collections/{name:str}/documents/{document_id:str}",
    summary="Delete a document",
    status_code=200,
    opt=documented(answers={200: None}, errors=_ERRORS),
)
async def delete_document(
    request: Request[Any, Any, Any], svc: Services, name: FromPath[str], document_id: FromPath[str]
) -> Response[Any]:
    return await _forward(request, svc, f"/collections/{name}/documents/{document_id}")


@post(
    "/collections/{name:str}/search",
    summary="Search a collection",
    status_code=200,
    opt=documented(body=SearchQuery, answers={200: None}, errors=(*_ERRORS, 413)),
)
async def search(request: Request[Any, Any, Any], svc: Services, name: FromPath[str]) -> Response[Any]:
    return await _forward(request, svc, f"/collections/{name}/search")


@get("/jobs/{job_id:str}", summary="Progress of a large upload (RAG)", opt=documented(errors=_ERRORS))
async def job_status(request: Request[Any, Any, Any], svc: Services, job_id: FromPath[str]) -> Response[Any]:
    return await _forward(request, svc, f"/jobs/{job_id}")


def collections_router(max_upload_bytes: int) -> Router:
    """The collections API; uploads may be up to ``max_upload_bytes`` (streamed through), every other
    body has the app's own limit."""
    upload = post(
        "/collections/{name:str}/documents",
        summary="Upload a document (multipart file or JSON text)",
        request_max_body_size=max_upload_bytes,
        opt=documented(
            body={"multipart/form-data": FileDocument, JSON: TextDocument},
            answers={200: None, 201: None, 202: None},
            errors=(*_ERRORS, 413, 415),
            links={status: _DOCUMENT_LINKS for status in (200, 201)},
        ),
    )(upload_document)
    return Router(path="/v1", route_handlers=[
        list_collections, create_collection, get_collection, delete_collection, list_documents, upload,
        get_document, delete_document, search, job_status])
