"""OpenAI's Files API for batches: upload (multipart), list, retrieve, content, delete; per key.

A file belongs to the key that uploaded it (or whose batch produced it); any other key gets the 404 of a
file that does not exist. Uploads are capped by ``files_max_bytes`` (a 413 naming the limit, refused on
``Content-Length`` before the body is read) and a key's files by ``files_max_bytes_per_key``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import IO, Any

from litestar import Request, Response, Router, delete, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import File

from appliance.core.errors import APIError, bad_request, not_found, payload_too_large
from appliance.core.ids import FileId
from gateway.access import access_record
from gateway.admission import parse_bearer
from gateway.batches import Batches
from gateway.batches.files import PURPOSES, FileObject, StorageFull
from gateway.openapi import documented
from gateway.services import Services

__all__ = ["files_router", "key_of", "missing_file", "page_of"]

BatchesDep = NamedDependency[Batches]
SCOPE = "chat"  # files serve batches, whose lines generate
_ERRORS = (400, 401, 403, 404, 503)
_CHUNK = 1 << 20
_MULTIPART_SLACK = 64 << 10  # the form's boundaries and other fields, above the file itself
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


async def key_of(request: Request[Any, Any, Any], svc: Services) -> tuple[str, str]:
    """Verify the key (scope ``chat``, not counted against its limits): (its id, its name)."""
    record = access_record(request)
    ticket = await svc.admission.admit(parse_bearer(request.headers.get("authorization")), SCOPE, limited=False)
    record.key_name, record.key_id = ticket.principal.name, ticket.principal.key_id
    return ticket.principal.key_id, ticket.principal.name


def missing_file(param: str = "file_id") -> APIError:
    return not_found("No such file (or one this key may not see).", param=param, code="file_not_found")


def page_of(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page."""
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def _view(item: FileObject) -> dict[str, Any]:
    return {"id": item.id, "object": "file", "bytes": item.bytes, "created_at": item.created_at,
            "filename": item.filename, "purpose": item.purpose, "status": item.status,
            "expires_at": item.expires_at, "status_details": item.status_details}


def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    handle.seek(0)
    while chunk := handle.read(_CHUNK):
        yield chunk


def _filename(raw: str | None) -> str:
    name = _UNSAFE.sub("_", (raw or "upload.jsonl").rsplit("/", 1)[-1])[:255]
    return name or "upload.jsonl"


async def upload_file(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep) -> Response[Any]:
    """Registered by :func:`files_router`, which knows the size limit."""
    key_id, _ = await key_of(request, svc)
    limit = batches.settings.files_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _MULTIPART_SLACK:
        raise payload_too_large(f"The upload is {declared} bytes; a file may be at most {limit} bytes.")
    form = await request.form()
    upload, purpose = form.get("file"), form.get("purpose")
    if purpose not in ("batch",):
        raise bad_request(f"purpose must be 'batch' (the appliance's files serve batches; {PURPOSES[1]!r} files "
                          "are the batches' own results).", param="purpose", code="invalid_purpose")
    if not isinstance(upload, UploadFile):
        raise bad_request("Send the file as the multipart field 'file'.", param="file", code="missing_file")
    size = await asyncio.to_thread(lambda: upload.file.seek(0, 2))
    if size > limit:
        raise payload_too_large(f"The file is {size} bytes; a file may be at most {limit} bytes.")
    try:
        item = await asyncio.to_thread(batches.files.save, key_id, _chunks(upload.file),
                                       filename=_filename(upload.filename), purpose="batch")
    except StorageFull as full:
        raise payload_too_large(f"This key's files may hold {batches.settings.files_max_bytes_per_key} bytes; "
                                f"{full.allowed} are left.") from None
    return Response(_view(item), status_code=200)


@get("/v1/files", summary="This key's files (OpenAI Files API)", opt=documented(errors=_ERRORS))
async def list_files(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep) -> dict[str, Any]:
    key_id, _ = await key_of(request, svc)
    query = request.query_params
    purpose, after, order = query.get("purpose"), query.get("after"), query.get("order", "desc")
    limit = _limit(query.get("limit"), default=10_000, most=10_000)
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'.", param="order")
    items = [item for item in await asyncio.to_thread(batches.files.list, key_id)
             if purpose is None or item.purpose == purpose]
    if order == "desc":
        items.reverse()
    if after is not None:
        cursor = FileId.parse(after, param="after")
        ids = [item.id for item in items]
        items = items[ids.index(cursor) + 1:] if cursor in ids else []
    return page_of([_view(item) for item in items[:limit]], len(items) > limit)


def _limit(raw: str | None, *, default: int, most: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise bad_request(f"limit must be between 1 and {most}.", param="limit")
    return int(raw)


async def _found(request: Request[Any, Any, Any], svc: Services, batches: Batches, file_id: str
                 ) -> tuple[str, FileObject]:
    key_id, _ = await key_of(request, svc)
    parsed = FileId.parse(file_id, param="file_id")
    item = await asyncio.to_thread(batches.files.get, key_id, parsed)
    if item is None:
        raise missing_file()
    return key_id, item


@get("/v1/files/{file_id:str}", summary="One file of this key", opt=documented(errors=_ERRORS))
async def retrieve_file(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep,
                        file_id: FromPath[str]) -> dict[str, Any]:
    return _view((await _found(request, svc, batches, file_id))[1])


@get("/v1/files/{file_id:str}/content", summary="A file's bytes", opt=documented(errors=_ERRORS))
async def file_content(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep,
                       file_id: FromPath[str]) -> File:
    key_id, item = await _found(request, svc, batches, file_id)
    path = batches.files.content_path(key_id, FileId.trusted(item.id))
    return File(path=path, filename=item.filename, media_type="application/octet-stream",
                content_disposition_type="attachment")


@delete("/v1/files/{file_id:str}", summary="Delete a file of this key", status_code=200,
        opt=documented(errors=_ERRORS))
async def delete_file(request: Request[Any, Any, Any], svc: Services, batches: BatchesDep,
                      file_id: FromPath[str]) -> dict[str, Any]:
    key_id, item = await _found(request, svc, batches, file_id)
    if not await asyncio.to_thread(batches.files.delete, key_id, FileId.trusted(item.id)):
        raise missing_file()
    return {"id": item.id, "object": "file", "deleted": True}


def files_router(max_file_bytes: int) -> Router:
    """The Files API; an upload may be ``max_file_bytes`` (plus the form around it)."""
    upload = post("/v1/files", summary="Upload a file (multipart: file, purpose=batch)", status_code=200,
                  request_max_body_size=max_file_bytes + _MULTIPART_SLACK,
                  opt=documented(answers={200: None}, errors=(*_ERRORS, 413)))(upload_file)
    return Router(path="/", route_handlers=[upload, list_files, retrieve_file, file_content, delete_file])
