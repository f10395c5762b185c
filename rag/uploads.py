"""Read a document upload (multipart ``file`` or JSON ``{"title", "text", "metadata"}``) within a size limit."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import BodyPartReader, web

from appliance.core import strict_json
from appliance.core.errors import bad_request, payload_too_large, unsupported_media_type
from appliance.core.rag_wire import JSON_FORMATS
from rag.extract import detect_format
from rag.service import Upload

__all__ = ["read_upload"]

_FORM_SLACK = 64 * 1024  # multipart headers and small fields around the file


def _too_large(limit: int) -> Exception:
    return payload_too_large(f"The document is larger than the limit of {limit} bytes.")


async def read_upload(request: web.Request, limit: int) -> Upload:
    if request.content_length is not None and request.content_length > limit + _FORM_SLACK:
        raise _too_large(limit)
    if request.content_type == "application/json":
        return _from_json(await _json(request), limit)
    if request.content_type == "multipart/form-data":
        return await _from_form(request, limit)
    raise unsupported_media_type(
        "Send the document as multipart/form-data (field 'file') or as JSON {'title', 'text', 'metadata'}."
    )


async def _json(request: web.Request) -> Any:
    try:
        return await request.json(loads=strict_json.loads)  # lone surrogates: a 400 here, not a 500 in SQLite
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.") from None


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = strict_json.loads(value)
        except json.JSONDecodeError:
            raise bad_request("metadata must be a JSON object.", param="metadata") from None
    if not isinstance(value, dict):
        raise bad_request("metadata must be a JSON object.", param="metadata")
    return value


def _from_json(body: Any, limit: int) -> Upload:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    text, title, fmt = body.get("text"), body.get("title", ""), body.get("format", "text")
    if not isinstance(text, str) or not text.strip():
        raise bad_request("text must be a non-empty string.", param="text", code="empty_document")
    if not isinstance(title, str):
        raise bad_request("title must be a string.", param="title")
    if fmt not in JSON_FORMATS:
        raise bad_request(f"format must be one of {', '.join(JSON_FORMATS)}.", param="format")
    data = text.encode("utf-8")
    if len(data) > limit:
        raise _too_large(limit)
    return Upload(data, fmt, title=title.strip(), metadata=_metadata(body.get("metadata")))


async def _from_form(request: web.Request, limit: int) -> Upload:
    reader = await request.multipart()
    data: bytes | None = None
    filename, content_type, title, metadata = "", "", "", None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise bad_request("Nested multipart bodies are not supported.")
        if part.name == "file":
            filename = part.filename or ""
            content_type = part.headers.get("Content-Type", "")
            detect_format(filename, content_type)  # refuse an unsupported type before reading it
            data = await _read_part(part, limit)
        elif part.name == "title":
            title = (await _form_text(part)).strip()
        elif part.name == "metadata":
            metadata = await _form_text(part)
        else:
            await part.release()
    if data is None:
        raise bad_request("The form has no 'file' field.", param="file")
    if not data.strip():
        raise bad_request("The document is empty.", param="file", code="empty_document")
    fmt = detect_format(filename, content_type)
    return Upload(data, fmt, title=title, filename=filename, metadata=_metadata(metadata))


async def _form_text(part: BodyPartReader) -> str:
    try:
        return await part.text()
    except (UnicodeDecodeError, LookupError):  # not UTF-8 (or an unknown charset): a 400, not a 500
        raise bad_request(f"{part.name} must be UTF-8 text.", param=part.name) from None


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    buffer = bytearray()
    while chunk := await part.read_chunk(64 * 1024):
        buffer.extend(chunk)
        if len(buffer) > limit:
            raise _too_large(limit)
    return bytes(buffer)
