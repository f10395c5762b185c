"""The RAG service's wire format, in one home: used by ``rag/`` (which enforces it), the gateway (which
documents and forwards it, and checks a chat request's ``rag.collection``) and the CLI (which uploads files).

* the collection-name rule (:data:`COLLECTION_NAME_PATTERN`, :func:`validate_collection_name`);
* the document formats and the file suffixes / media types that map to them;
* the request bodies (:class:`NewCollection`, :class:`TextDocument`, :class:`FileDocument`,
  :class:`SearchQuery`) and the answers (:class:`Document`, :class:`SearchHit`, :class:`SearchResults`,
  :class:`Job`). docs/CONTRACTS.md describes the same API in prose.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from appliance.core.ids import CollectionName

__all__ = [
    "COLLECTION_NAME_PATTERN",
    "DEFAULT_TOP_K",
    "FORMAT_BY_MEDIA_TYPE",
    "FORMAT_BY_SUFFIX",
    "JSON_FORMATS",
    "SUPPORTED_SUFFIXES",
    "Document",
    "FileDocument",
    "Job",
    "NewCollection",
    "SearchHit",
    "SearchQuery",
    "SearchResults",
    "TextDocument",
    "format_of",
    "is_collection_name",
    "validate_collection_name",
]

# 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit: safe as a file name and in a URL path.
# Matched whole (appliance.core.ids.CollectionName); this anchored form is for JSON Schema and pydantic.
COLLECTION_NAME_PATTERN = CollectionName.anchored()

FORMAT_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}
FORMAT_BY_MEDIA_TYPE = {
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "application/pdf": "pdf",
}
SUPPORTED_SUFFIXES = frozenset(FORMAT_BY_SUFFIX)
JSON_FORMATS = ("text", "markdown", "html")  # a JSON upload carries text; a PDF comes as a file
DEFAULT_TOP_K = 4


def is_collection_name(name: object) -> TypeGuard[str]:
    return CollectionName.matches(name)


def validate_collection_name(name: object, param: str = "name") -> CollectionName:
    """The typed name, or an OpenAI-shaped 400 (``invalid_collection_name``)."""
    return CollectionName.parse(name, param=param)


def format_of(filename: str | None, media_type: str | None) -> str | None:
    """A document's format from its file name, else (no suffix at all) its media type; None when unknown."""
    suffix = PurePath(filename or "").suffix.lower()
    if suffix:
        return FORMAT_BY_SUFFIX.get(suffix)
    return FORMAT_BY_MEDIA_TYPE.get((media_type or "").split(";")[0].strip().lower())


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class NewCollection(_Body):
    """``POST /collections``."""

    name: StrictStr = Field(pattern=COLLECTION_NAME_PATTERN)


class TextDocument(_Body):
    """``POST /collections/{name}/documents`` as JSON."""

    text: StrictStr = Field(min_length=1)
    title: StrictStr = ""
    format: Literal["text", "markdown", "html"] = "text"
    metadata: dict[str, Any] | None = None


class FileDocument(_Body):
    """``POST /collections/{name}/documents`` as multipart/form-data (documented; the service reads it streamed)."""

    file: bytes = Field(description="The document: .txt, .md, .pdf or .html (by name, else by media type)")
    title: str = ""
    metadata: str | None = Field(default=None, description="A JSON object, as text")


class SearchQuery(_Body):
    """``POST /collections/{name}/search``; the service bounds ``top_k`` by its ``max_top_k`` setting."""

    query: StrictStr
    top_k: StrictInt = DEFAULT_TOP_K


class Document(_Body):
    id: str
    object: Literal["document"] = "document"
    collection: str
    title: str
    chunks: int
    sha256: str
    format: str
    bytes: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: int
    duplicate: bool = False


class SearchHit(_Body):
    document_id: str
    title: str
    chunk_id: int
    chunk_index: int
    text: str
    heading_path: list[str] = Field(default_factory=list)
    score: float


class SearchResults(_Body):
    object: Literal["list"] = "list"
    results: list[SearchHit]


class Job(_Body):
    id: str
    object: Literal["job"] = "job"
    collection: str
    filename: str
    state: Literal["queued", "running", "succeeded", "failed"]
    progress: float
    chunks_done: int
    chunks_total: int
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created_at: int
