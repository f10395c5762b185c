"""HTTP handlers: embeddings, collections, documents, search, jobs, health and metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from typing import Any

import numpy as np
from aiohttp import web

from appliance.core import strict_json
from appliance.core.errors import bad_request, not_found, rate_limited
from appliance.core.hop import KEY_ID_HEADER
from appliance.core.ids import CollectionName, DocumentId, JobId, KeyId
from appliance.core.metrics import CONTENT_TYPE, render
from appliance.core.rag_wire import SearchQuery
from appliance.core.wire import EmbeddingRequest, parse_request
from rag.embedder import Vectors
from rag.jobs import Job
from rag.service import RagService, Upload
from rag.state import STATE
from rag.uploads import read_upload

__all__ = ["add_routes"]

_MAX_INPUTS = 2048


def _service(request: web.Request) -> RagService:
    return request.app[STATE].ready()


# Names in the path are parsed with the gateway's own patterns (appliance.core.ids): aiohttp has already
# percent-decoded them, so "payroll%0A" arrives as "payroll\n" and is refused, never trimmed into "payroll".
def _collection(request: web.Request) -> CollectionName:
    return CollectionName.parse(request.match_info["name"], param="collection")


def _document_id(request: web.Request) -> DocumentId:
    return DocumentId.parse(request.match_info["document_id"], param="document_id")


def _uploader(request: web.Request) -> str:
    """The key the gateway says is uploading ("" when the operator calls this service directly)."""
    raw = request.headers.get(KEY_ID_HEADER)
    return "" if raw is None else KeyId.parse(raw, param=KEY_ID_HEADER)


async def _body(request: web.Request) -> Any:
    try:
        return await request.json(loads=strict_json.loads)  # lone surrogates: a 400 here, not a 500 later
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.") from None


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.service is None:
        status = "failed" if state.failure else "loading"
        return web.json_response({"status": status, "error": state.failure}, status=503, headers={"Retry-After": "2"})
    embedder = state.service.embedder
    return web.json_response(
        {
            "status": "ok",
            "model": embedder.model_name,
            "dimension": embedder.dimension,
            "collections": state.service.collection_count,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.service is not None:
        # The store thread may be busy building an index: then serve the last counts.
        with contextlib.suppress(TimeoutError):
            state.metrics.set_collections(await asyncio.wait_for(state.service.stats(), 2.0))
    return web.Response(body=render(state.metrics.registry), headers={"Content-Type": CONTENT_TYPE})


# -- embeddings ----------------------------------------------------------------------------------


def _inputs(value: object) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise bad_request("input must be a string or a list of strings (token ids are not supported).", param="input")
    if not texts or len(texts) > _MAX_INPUTS:
        raise bad_request(f"input must hold 1 to {_MAX_INPUTS} strings.", param="input")
    if any(not t for t in texts):
        raise bad_request("input strings must not be empty.", param="input")
    return texts


def _encode_vector(vector: Vectors, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vector]


async def embeddings(request: web.Request) -> web.Response:
    service = _service(request)
    body = parse_request(EmbeddingRequest, await _body(request))
    name = service.embedder.model_name
    if body.model != name and not body.model.endswith(f"/{name}"):
        raise not_found(
            f"The model {body.model!r} does not exist; this service embeds with {name!r}.",
            param="model",
            code="model_not_found",
        )
    if body.dimensions is not None and body.dimensions != service.embedder.dimension:
        raise bad_request(f"dimensions must be {service.embedder.dimension} for {name}.", param="dimensions")
    texts = _inputs(body.input)
    vectors, tokens = await service.embed(texts)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return web.json_response(
        {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )


async def models(request: web.Request) -> web.Response:
    service = _service(request)
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": service.embedder.model_name, "object": "model", "created": 0, "owned_by": "appliance"}],
        }
    )


# -- collections and documents -------------------------------------------------------------------


async def list_collections(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "collections": await _service(request).collections()})


async def create_collection(request: web.Request) -> web.Response:
    body = await _body(request)
    name = body.get("name") if isinstance(body, dict) else None
    if name is None:
        raise bad_request("name is required.", param="name")
    collection = CollectionName.parse(name, param="name")
    return web.json_response(await _service(request).create_collection(collection), status=201)


async def get_collection(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).collection(_collection(request)))


async def delete_collection(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).delete_collection(_collection(request)))


async def upload_document(request: web.Request) -> web.Response:
    service = _service(request)
    state = request.app[STATE]
    name = _collection(request)
    owner = _uploader(request)
    service.collection_exists(name)
    upload = await read_upload(request, state.settings.max_upload_bytes)
    background = request.query.get("background", "").lower() in ("1", "true", "yes")
    if background or len(upload.data) > state.settings.job_threshold_bytes:
        if owner and state.jobs.in_flight(owner) >= state.settings.max_jobs_per_key:
            raise rate_limited(f"This key already has {state.settings.max_jobs_per_key} upload jobs queued or "
                               "running; wait for one to finish (GET /v1/jobs/{id}).", 5.0)
        job = state.jobs.submit(name, upload.filename, lambda job: _ingest_job(service, name, upload, job), owner)
        return web.json_response(
            {"job_id": job.id, **job.to_json()}, status=202, headers={"Location": f"/jobs/{job.id}"}
        )
    document = await service.ingest(name, upload)
    return web.json_response(document, status=200 if document["duplicate"] else 201)


async def _ingest_job(service: RagService, name: CollectionName, upload: Upload, job: Job) -> dict[str, Any]:
    return await service.ingest(name, upload, progress=job.report)


async def get_job(request: web.Request) -> web.Response:
    job_id = JobId.parse(request.match_info["job_id"], param="job_id")
    job = request.app[STATE].jobs.get(job_id)
    if job is None:
        raise not_found(f"Job {job_id!r} does not exist.", code="job_not_found")
    return web.json_response(job.to_json())


async def list_documents(request: web.Request) -> web.Response:
    documents = await _service(request).documents(_collection(request))
    return web.json_response({"object": "list", "documents": documents})


async def get_document(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).document(_collection(request), _document_id(request)))


async def delete_document(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).delete_document(_collection(request), _document_id(request)))


async def search(request: web.Request) -> web.Response:
    query = parse_request(SearchQuery, await _body(request))
    results = await _service(request).search(_collection(request), query.query, query.top_k)
    return web.json_response({"object": "list", "results": results})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/collections", list_collections)
    app.router.add_post("/collections", create_collection)
    app.router.add_get("/collections/{name}", get_collection)
    app.router.add_delete("/collections/{name}", delete_collection)
    app.router.add_get("/collections/{name}/documents", list_documents)
    app.router.add_post("/collections/{name}/documents", upload_document)
    app.router.add_get("/collections/{name}/documents/{document_id}", get_document)
    app.router.add_delete("/collections/{name}/documents/{document_id}", delete_document)
    app.router.add_post("/collections/{name}/search", search)
    app.router.add_get("/jobs/{job_id}", get_job)
