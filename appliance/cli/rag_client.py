"""A small typed client of the RAG service's HTTP API, for the CLI (``appliance ingest``) and tools.

It speaks only the wire format of :mod:`appliance.core.rag_wire` and imports nothing from ``rag/``.

Synchronous (httpx); the transport is a constructor parameter. Errors come back
as :class:`RagClientError` carrying the service's OpenAI-shaped error.
"""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from appliance.core.hop import INTERNAL_TOKEN_HEADER, REQUEST_ID_HEADER
from appliance.core.rag_wire import DEFAULT_TOP_K, SUPPORTED_SUFFIXES, Job, NewCollection, SearchQuery

__all__ = ["SUPPORTED_SUFFIXES", "IngestProgress", "RagClient", "RagClientError", "ingest_path"]


class RagClientError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True)
class IngestProgress:
    """One step of ``ingest_path``: per file, ``state`` goes uploading → indexing* → done/duplicate/failed."""

    path: Path
    file_index: int  # 1-based position among the files found
    files_total: int
    state: str  # uploading | indexing | done | duplicate | failed | skipped
    fraction: float = 0.0  # of this file's chunks embedded
    document: dict[str, Any] | None = None
    error: str | None = None


class RagClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 300.0,
        request_id: str | None = None,
    ) -> None:
        headers = {INTERNAL_TOKEN_HEADER: token}
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RagClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise RagClientError(response.status_code, str(error.get("message")), error.get("code"))
            except (ValueError, KeyError, TypeError):
                raise RagClientError(response.status_code, response.text[:200]) from None
        body: dict[str, Any] = response.json()
        body.setdefault("_status", response.status_code)
        return body

    def collections(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/collections")["collections"])

    def create_collection(self, name: str) -> dict[str, Any]:
        return self._call("POST", "/collections", json=NewCollection.model_construct(name=name).model_dump())

    def ensure_collection(self, name: str) -> None:
        try:
            self.create_collection(name)
        except RagClientError as exc:
            if exc.status != 409:
                raise

    def delete_collection(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/collections/{name}")

    def documents(self, collection: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/collections/{collection}/documents")["documents"])

    def delete_document(self, collection: str, document_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/collections/{collection}/documents/{document_id}")

    def search(self, collection: str, query: str, top_k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
        body = self._call(
            "POST", f"/collections/{collection}/search", json=SearchQuery(query=query, top_k=top_k).model_dump()
        )
        return list(body["results"])

    def upload(self, collection: str, path: Path, *, background: bool = False) -> dict[str, Any]:
        """201/200 → the document; 202 → the job (poll :meth:`job`)."""
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        with path.open("rb") as handle:
            return self._call(
                "POST",
                f"/collections/{collection}/documents",
                params={"background": "1"} if background else None,
                files={"file": (path.name, handle, mime)},
            )

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    raise FileNotFoundError(f"{path} does not exist")


def ingest_path(
    client: RagClient, path: Path, collection: str, *, create: bool = True, poll_interval_s: float = 0.5
) -> Iterator[IngestProgress]:
    """Upload a file or every supported file under a folder, yielding progress as it goes.

    Unsupported files are reported as ``skipped``; a failing file is reported as
    ``failed`` and the others still go. Creates the collection unless ``create`` is False.
    """
    if create:
        client.ensure_collection(collection)
    files = _files(path)
    total = len(files)
    for number, file in enumerate(files, 1):
        step = IngestProgress(file, number, total, state="uploading")
        if file.suffix.lower() not in SUPPORTED_SUFFIXES:
            yield replace(step, state="skipped", error="unsupported file type")
            continue
        yield step
        try:
            answer = client.upload(collection, file)
            if answer.get("_status") == 202:
                answer = yield from _follow_job(client, answer["job_id"], step, poll_interval_s)
        except (RagClientError, OSError, httpx.HTTPError) as exc:
            yield replace(step, state="failed", error=str(exc))
            continue
        answer.pop("_status", None)
        state = "duplicate" if answer.get("duplicate") else "done"
        yield replace(step, state=state, fraction=1.0, document=answer)


def _follow_job(
    client: RagClient, job_id: str, step: IngestProgress, poll_interval_s: float
) -> Generator[IngestProgress, None, dict[str, Any]]:
    while True:
        job = Job.model_validate(client.job(job_id))
        if job.state == "succeeded":
            return dict(job.result or {})
        if job.state == "failed":
            error = job.error or {}
            raise RagClientError(int(error.get("status", 500)), str(error.get("message")), error.get("code"))
        yield replace(step, state="indexing", fraction=job.progress)
        time.sleep(poll_interval_s)
