"""`/v1/collections…` and `/v1/jobs/{id}`: the RAG service's API for keys with the ``collections`` scope."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.background_tasks import BackgroundTask
from litestar.exceptions import HTTPException
from litestar.params import FromPath, FromQuery

from appliance.core.errors import APIError, bad_request, forbidden, not_found, payload_too_large
from appliance.core.ids import CollectionName, DocumentId, Identifier, JobId
from appliance.core.rag_wire import FileDocument, NewCollection, SearchQuery, TextDocument
from gateway.access import access_record
from gateway.admission import parse_bearer
from gateway.audit_trail import audit
from gateway.caller import Caller
from gateway.keys import Principal
from gateway.openapi import JSON, documented, link
from gateway.ownership import access_of, may_read, owns
from gateway.service_client import ServiceReply, decode_json_object, ensure_error_body
from gateway.services import GatewayServices, Services

__all__ = ["collections_router"]

_FORWARDED_HEADERS = ("content-type", "accept")


class _StreamedUpload:
    """An upload passed on to the RAG service as it arrives, so the gateway never holds it whole.

    Litestar enforces the size limit while streaming; when it refuses, the upstream request is
    aborted mid-body (RAG sees a broken chunked body and ingests nothing) and the client gets a 413.
    A non-admin key's upload is also held to what is left of its storage allowance
    (``rag_max_bytes_per_key``): refused up front on ``Content-Length``, cut off past it otherwise.
    """

    def __init__(self, request: Request[Any, Any, Any], allowance: int | None) -> None:
        self._request = request
        self._allowance = allowance
        self.refused: HTTPException | APIError | None = None
        limit = request.route_handler.resolve_request_max_body_size()
        declared = request.content_length
        if limit and declared is not None and declared > limit:  # refused before RAG is even contacted
            raise payload_too_large("Request body too large.")
        if allowance is not None and declared is not None and declared > allowance:
            raise _over_allowance(allowance)

    @classmethod
    async def open(cls, request: Request[Any, Any, Any], svc: GatewayServices,
                   principal: Principal) -> _StreamedUpload:
        cap = svc.settings.rag_max_bytes_per_key
        if principal.is_admin or cap <= 0:
            return cls(request, None)
        return cls(request, max(cap - await _bytes_stored(svc, principal), 0))

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        try:
            async for chunk in self._request.stream():
                seen += len(chunk)
                if self._allowance is not None and seen > self._allowance:
                    self.refused = _over_allowance(self._allowance)
                    raise self.refused
                yield chunk
        except HTTPException as exc:
            self.refused = exc
            raise


def _over_allowance(left: int) -> APIError:
    return payload_too_large(f"This key's documents would exceed its storage allowance ({left} bytes left); "
                             "delete documents or ask an admin for a larger allowance.")


async def _bytes_stored(svc: GatewayServices, principal: Principal) -> int:
    """What the key's own collections hold, as the RAG service counts it (document bytes)."""
    reply = await svc.rag.request("GET", "/collections", caller=Caller.of(principal))
    if reply.status != 200:
        raise APIError(503, "The RAG service cannot report storage use right now.", type_="server_error",
                       code="rag_unavailable")
    owners = await svc.owners.owners()
    listing = decode_json_object(reply.body, "rag service").get("collections") or []
    return sum(int(c.get("bytes") or 0) for c in listing
               if isinstance(c, dict) and owns(principal, owners.get(str(c.get("name")))))


class _Call(msgspec.Struct, frozen=True):
    """One forwarded call, built from typed values only: the collection it acts on (if any) and how."""

    path: str
    collection: CollectionName | None = None
    write: bool = False
    body: bytes | None = None  # a body the gateway re-encoded from typed values (else the client's is sent)
    create: bool = False  # the collection is being created (its record is claimed by ``before``, not checked)


def _collection_path(name: CollectionName, *tail: str | Identifier) -> str:
    parts = [name.segment(), *(part.segment() if isinstance(part, Identifier) else part for part in tail)]
    return "/collections/" + "/".join(parts)


After = Callable[[GatewayServices, Principal, ServiceReply], Awaitable[bytes | None]]
Before = Callable[[GatewayServices, Principal, "_Call"], Awaitable[None]]


async def _forward(request: Request[Any, Any, Any], svc: GatewayServices, build: Callable[[], _Call], *,
                   streamed: bool = False, before: Before | None = None, after: After | None = None,
                   ) -> Response[Any]:
    """Admit the key, then parse what the route names (``build``: typed values, or a 400), check access
    to the collection, forward, and let ``after`` look at the answer (ownership records, listings)."""
    record = access_record(request)
    ticket = await svc.admission.admit(parse_bearer(request.headers.get("authorization")), "collections")
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    caller = Caller.of(ticket.principal)  # the RAG service counts a key's upload jobs by it
    try:
        call = build()
        body = call.body
        if call.collection is not None and not call.create:
            await svc.owners.check(call.collection, ticket.principal, write=call.write)
        if before is not None:
            await before(svc, ticket.principal, call)
        upload = await _StreamedUpload.open(request, svc, ticket.principal) if streamed else None
        if body is None and request.method == "POST" and upload is None:
            body = await request.body()
        headers = {name: request.headers[name] for name in _FORWARDED_HEADERS if name in request.headers}
        started = time.perf_counter()
        try:
            reply = await svc.rag.request(request.method, call.path, caller=caller,
                                          body=upload.chunks() if upload else body,
                                          headers=headers, params=_params(request))
        except Exception:
            # Cutting the upload off aborts the RAG request (seen here as a payload or connection error):
            # the client's answer is the 413, not a 503 about the RAG service.
            if upload is not None and upload.refused is not None:
                raise upload.refused from None
            raise
        record.upstream_s = time.perf_counter() - started
        content = reply.body if reply.status < 400 else ensure_error_body(reply.status, reply.body)
        if after is not None:
            content = await after(svc, ticket.principal, reply) or content
    except BaseException:
        svc.tasks.spawn(svc.admission.settle(ticket))
        raise
    kept = {k: v for k, v in reply.headers.items() if k.lower() in ("location", "retry-after")}
    # An error body is always JSON, even when an upstream sent (and the gateway wrapped) something else.
    media_type = reply.content_type if reply.status < 400 else JSON
    return Response(content, status_code=reply.status, media_type=media_type,
                    headers={**kept, **ticket.rate_headers}, background=BackgroundTask(svc.admission.settle, ticket))


def _params(request: Request[Any, Any, Any]) -> dict[str, str]:
    """Only the query parameters the RAG service reads, each as its one typed value."""
    background = request.query_params.get("background")
    return {} if background is None else {"background": "true" if _truthy(background) else "false"}


def _truthy(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


_ERRORS = (400, 401, 403, 404, 429, 502, 503)


_DOCUMENT_LINKS = {
    "GetDocument": link("GET", "/v1/collections/{name}/documents/{document_id}", name="$request.path.name",
                        document_id="$response.body#/id"),
    "DeleteDocument": link("DELETE", "/v1/collections/{name}/documents/{document_id}", name="$request.path.name",
                           document_id="$response.body#/id"),
}


def _name(raw: str) -> CollectionName:
    return CollectionName.parse(raw, param="name")


def _read(path: str, name: CollectionName) -> _Call:
    return _Call(path, name, write=False)


def _write(path: str, name: CollectionName) -> _Call:
    return _Call(path, name, write=True)


# The RAG service validates these bodies (appliance.core.rag_wire, docs/CONTRACTS.md); here they document them.
@get("/collections", summary="Collections this key may see (RAG)", opt=documented(errors=_ERRORS))
async def list_collections(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    return await _forward(request, svc, lambda: _Call("/collections"), after=_visible_only)


async def _visible_only(svc: GatewayServices, principal: Principal, reply: ServiceReply) -> bytes | None:
    """Keep only what this key may see, each marked with its access (private, shared or admin)."""
    if reply.status >= 400:
        return None
    listing = decode_json_object(reply.body, "rag service")
    owners = await svc.owners.owners()
    for field in ("collections", "data"):
        if isinstance(listing.get(field), list):
            listing[field] = [{**c, "access": access_of(owners.get(c["name"]))} for c in listing[field]
                              if isinstance(c, dict) and isinstance(c.get("name"), str)
                              and may_read(principal, owners.get(c["name"]))]
    return msgspec.json.encode(listing)


@post(
    "/collections",
    summary="Create a collection: private to this key, or with an admin key admin-only unless \"shared\": true",
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
    wanted = _new_collection(await request.body())
    claimed: list[str] = []

    def build() -> _Call:
        name = _name(wanted.name)
        return _Call("/collections", name, write=True, body=msgspec.json.encode({"name": str(name)}), create=True)

    async def claim(svc: GatewayServices, principal: Principal, call: _Call) -> None:
        """Record the creator first, so the collection never exists without an access record."""
        if call.collection is None:
            return
        if wanted.shared and not principal.is_admin:
            raise forbidden("Only an admin key can create a shared collection.")
        try:
            made = await svc.owners.claim(call.collection, principal, shared=wanted.shared)
        except APIError as exc:
            if exc.status != 409 or (await svc.rag.request("GET", _collection_path(call.collection),
                                                                 caller=Caller.of(principal))).status != 404:
                raise
            made = await svc.owners.replace(call.collection, principal, shared=wanted.shared)  # a stale record
        if made is not None:
            claimed.append(made)

    async def settle(svc: GatewayServices, principal: Principal, reply: ServiceReply) -> bytes | None:
        if reply.status >= 400 and claimed:  # not created (409: someone else's, or RAG refused): drop our claim
            await svc.owners.release(_name(wanted.name), claimed[0])
        elif reply.status < 400:
            await audit(svc.audit, principal, "collection.create", f"collection:{_name(wanted.name)}",
                        detail={"shared": wanted.shared})
        return None

    return await _forward(request, svc, build, before=claim, after=settle)


class _NewCollection(msgspec.Struct, frozen=True):
    name: Any = None
    shared: bool = False


def _new_collection(body: bytes) -> _NewCollection:
    try:
        return msgspec.json.decode(body or b"{}", type=_NewCollection)
    except msgspec.ValidationError as exc:
        raise bad_request(f"Invalid collection: {exc}.", param="shared") from None
    except msgspec.DecodeError:
        raise bad_request("The request body is not a valid JSON object.") from None


@get("/collections/{name:str}", summary="One collection (RAG)", opt=documented(errors=_ERRORS))
async def get_collection(request: Request[Any, Any, Any], svc: Services, name: FromPath[str]) -> Response[Any]:
    return await _forward(request, svc, lambda: _read(_collection_path(n := _name(name)), n))


@delete(
    "/collections/{name:str}",
    summary="Delete a collection and its documents",
    status_code=200,
    opt=documented(answers={200: None}, errors=_ERRORS),
)
async def delete_collection(request: Request[Any, Any, Any], svc: Services, name: FromPath[str]) -> Response[Any]:
    async def forget(svc: GatewayServices, principal: Principal, reply: ServiceReply) -> bytes | None:
        if reply.status < 400:
            await svc.owners.release(_name(name))
            await audit(svc.audit, principal, "collection.delete", f"collection:{_name(name)}")
        return None

    return await _forward(request, svc, lambda: _write(_collection_path(n := _name(name)), n), after=forget)


@get("/collections/{name:str}/documents", summary="Documents of a collection", opt=documented(errors=_ERRORS))
async def list_documents(request: Request[Any, Any, Any], svc: Services, name: FromPath[str]) -> Response[Any]:
    return await _forward(request, svc, lambda: _read(_collection_path(n := _name(name), "documents"), n))


async def upload_document(
    request: Request[Any, Any, Any], svc: Services, name: FromPath[str], background: FromQuery[bool] = False
) -> Response[Any]:
    """Registered by :func:`collections_router`, which knows the upload size limit."""
    return await _forward(request, svc, lambda: _write(_collection_path(n := _name(name), "documents"), n),
                          streamed=True)


def _document(raw: str) -> DocumentId:
    return DocumentId.parse(raw, param="document_id")


@get("/collections/{name:str}/documents/{document_id:str}", summary="One document", opt=documented(errors=_ERRORS))
async def get_document(
    request: Request[Any, Any, Any], svc: Services, name: FromPath[str], document_id: FromPath[str]
) -> Response[Any]:
    return await _forward(request, svc, lambda: _read(
        _collection_path(n := _name(name), "documents", _document(document_id)), n))


@delete(
    "/collections/{name:str}/documents/{document_id:str}",
    summary="Delete a document",
    status_code=200,
    opt=documented(answers={200: None}, errors=_ERRORS),
)
async def delete_document(
    request: Request[Any, Any, Any], svc: Services, name: FromPath[str], document_id: FromPath[str]
) -> Response[Any]:
    return await _forward(request, svc, lambda: _write(
        _collection_path(n := _name(name), "documents", _document(document_id)), n))


@post(
    "/collections/{name:str}/search",
    summary="Search a collection",
    status_code=200,
    opt=documented(body=SearchQuery, answers={200: None}, errors=(*_ERRORS, 413)),
)
async def search(request: Request[Any, Any, Any], svc: Services, name: FromPath[str]) -> Response[Any]:
    return await _forward(request, svc, lambda: _read(_collection_path(n := _name(name), "search"), n))


@get("/jobs/{job_id:str}", summary="Progress of a large upload (RAG)", opt=documented(errors=_ERRORS))
async def job_status(request: Request[Any, Any, Any], svc: Services, job_id: FromPath[str]) -> Response[Any]:
    async def only_readable(svc: GatewayServices, principal: Principal, reply: ServiceReply) -> bytes | None:
        """A job is as visible as the collection it writes into; any other key gets the same 404 as for a
        job that does not exist."""
        if reply.status >= 400 or principal.is_admin:
            return None
        collection = decode_json_object(reply.body, "rag service").get("collection")
        if CollectionName.matches(collection) and may_read(
                principal, await svc.owners.record(CollectionName(collection))):
            return None
        raise not_found(f"Job {job_id!r} does not exist.", param="job_id", code="job_not_found")

    return await _forward(request, svc, lambda: _Call("/jobs/" + JobId.parse(job_id, param="job_id").segment()),
                          after=only_readable)


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
