"""The retriever service: collections, ingestion, search and embeddings over one store and its indexes.

Two worker threads own the blocking work so the event loop never waits on it:
``rag-store`` runs every SQLite and FAISS operation (one owner, no locks) and
``rag-embed`` runs parsing, tokenizing and the embedding model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from appliance.core.errors import APIError, bad_request, not_found
from appliance.core.ids import CollectionName, DocumentId
from rag.chunker import Chunk, chunk_sections, embedding_text
from rag.embedding import Embedder, Vectors
from rag.extract import ParsedDocument, extract
from rag.index import ApproxParams, CollectionIndex, Mirror, gpu_mirror
from rag.metrics import CollectionStats, RagMetrics
from rag.settings import RagSettings
from rag.store import ChunkHit, CollectionRow, DocumentRow, DocumentStore, DuplicateDocument, NewDocument

__all__ = ["Progress", "RagService", "Upload"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Upload:
    data: bytes
    format: str
    title: str = ""
    filename: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def document_json(row: DocumentRow, duplicate: bool = False) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "document",
        "collection": row.collection,
        "title": row.title,
        "chunks": row.chunk_count,
        "sha256": row.sha256,
        "format": row.format,
        "bytes": row.bytes,
        "metadata": row.metadata,
        "created_at": int(row.created_at),
        "duplicate": duplicate,
    }


def _hit_json(hit: ChunkHit, score: float) -> dict[str, Any]:
    return {
        "document_id": hit.document_id,
        "title": hit.title,
        "chunk_id": hit.chunk_id,
        "chunk_index": hit.chunk_index,
        "text": hit.text,
        "heading_path": hit.heading_path,
        "score": round(float(score), 6),
    }


class RagService:
    def __init__(self, settings: RagSettings, embedder: Embedder, metrics: RagMetrics) -> None:
        self.settings = settings
        self.embedder = embedder
        self.metrics = metrics
        self._params = ApproxParams(
            settings.approx_threshold, settings.hnsw_m, settings.hnsw_ef_construction, settings.hnsw_ef_search
        )
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="rag-store")
        self._embed_thread = ThreadPoolExecutor(1, thread_name_prefix="rag-embed")
        # HNSW builds past approx_threshold (minutes for a large collection) run here, not on rag-store.
        self._build_thread = ThreadPoolExecutor(1, thread_name_prefix="rag-build")
        self._store: DocumentStore | None = None
        self._indexes: dict[str, CollectionIndex] = {}
        self._models: dict[str, str] = {}  # collection → the embedding model its vectors came from
        self._mirror: Mirror | None = None  # where searches run when not on the CPU index (a GPU copy)

    # -- threads and lifecycle -----------------------------------------------------------------

    async def _on_store(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store_thread, partial(fn, *args))

    async def _on_embedder(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._embed_thread, partial(fn, *args))

    @property
    def store(self) -> DocumentStore:
        if self._store is None:
            raise RuntimeError("the service is not open")
        return self._store

    def _index_path(self, name: str) -> Path:
        return self.settings.rag_dir / "indexes" / f"{name}.faiss"

    async def open(self) -> None:
        await self._on_store(self._open)

    def _open(self) -> None:
        import faiss

        if self.settings.compute_threads:
            faiss.omp_set_num_threads(self.settings.compute_threads)
        self._mirror = gpu_mirror(self.settings.faiss_gpu, int(faiss.get_num_gpus()))
        if self._mirror is not None:
            log.info("searching GPU copies of the indexes", extra={"gpus": int(faiss.get_num_gpus())})
        (self.settings.rag_dir / "indexes").mkdir(parents=True, exist_ok=True)
        self._store = DocumentStore(self.settings.rag_dir / "store.sqlite3")
        names = set()
        for row in self._store.collections():
            names.add(row.name)
            self._models[row.name] = row.model
            self._indexes[row.name] = self._load_index(row)
        for path in (self.settings.rag_dir / "indexes").iterdir():
            if (path.suffix == ".faiss" and path.stem not in names) or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # left by a crash mid-delete or mid-write

    def _load_index(self, row: CollectionRow) -> CollectionIndex:
        path = self._index_path(row.name)
        index = CollectionIndex.load(path, row.dimension, self._params, self._mirror, self._build_thread)
        if index is None:
            index = CollectionIndex(row.dimension, self._params, mirror=self._mirror, builder=self._build_thread)
        added, dropped = index.reconcile(
            self.store.chunk_ids(row.name), lambda ids: self.store.embeddings(row.name, ids)
        )
        if added or dropped or not path.exists():
            log.info(
                "index reconciled with the store", extra={"collection": row.name, "added": added, "dropped": dropped}
            )
            index.save(path)
        index.start_build()  # a flat index past the threshold: killed mid-build last time
        return index

    async def flush(self) -> None:
        await self._on_store(self._flush)

    def _flush(self) -> None:
        for name, index in list(self._indexes.items()):
            index.poll()  # persist a finished background build even when no request comes
            if index.dirty:
                index.save(self._index_path(name))

    async def close(self) -> None:
        if self._store is not None:
            await self.flush()
            await self._on_store(self.store.close)
            self._store = None
        self._store_thread.shutdown(wait=True)
        self._embed_thread.shutdown(wait=True)
        # A build still running is dropped (the flat index was saved; the next start builds again).
        self._build_thread.shutdown(wait=False, cancel_futures=True)

    # -- collections ---------------------------------------------------------------------------

    def _collection_json(self, row: CollectionRow) -> dict[str, Any]:
        index = self._indexes.get(row.name)
        path = self._index_path(row.name)
        return {
            "name": row.name,
            "object": "collection",
            "documents": row.documents,
            "chunks": row.chunks,
            "bytes": row.bytes,
            "index_type": index.kind if index else "flat",
            "index_vectors": index.size if index else 0,
            "index_bytes": path.stat().st_size if path.exists() else 0,
            "dimension": row.dimension,
            "model": row.model,
            "created_at": int(row.created_at),
        }

    async def create_collection(self, name: CollectionName) -> dict[str, Any]:
        return await self._on_store(self._create_collection, name)

    def _create_collection(self, name: str) -> dict[str, Any]:
        if not self.store.create_collection(name, self.embedder.dimension, self.embedder.model_name):
            raise APIError(409, f"Collection {name!r} already exists.", param="name", code="collection_exists")
        index = CollectionIndex(self.embedder.dimension, self._params, mirror=self._mirror, builder=self._build_thread)
        index.save(self._index_path(name))
        self._models[name] = self.embedder.model_name
        self._indexes[name] = index
        return self._collection_json(self.store.collections(name)[0])

    async def collections(self) -> list[dict[str, Any]]:
        return await self._on_store(lambda: [self._collection_json(r) for r in self.store.collections()])

    async def collection(self, name: CollectionName) -> dict[str, Any]:
        return await self._on_store(lambda: self._collection_json(self._row(name)))

    def _row(self, name: str) -> CollectionRow:
        rows = self.store.collections(name)
        if not rows:
            raise not_found(f"Collection {name!r} does not exist.", param="collection", code="collection_not_found")
        return rows[0]

    async def delete_collection(self, name: CollectionName) -> dict[str, Any]:
        return await self._on_store(self._delete_collection, name)

    def _delete_collection(self, name: str) -> dict[str, Any]:
        if not self.store.delete_collection(name):
            raise not_found(f"Collection {name!r} does not exist.", param="collection", code="collection_not_found")
        self._indexes.pop(name, None)
        self._models.pop(name, None)
        self._index_path(name).unlink(missing_ok=True)
        return {"name": name, "object": "collection", "deleted": True}

    @property
    def collection_count(self) -> int:
        """Without touching the store thread, which may be busy building an index."""
        return len(self._indexes)

    async def stats(self) -> list[CollectionStats]:
        def collect() -> list[CollectionStats]:
            return [
                CollectionStats(
                    r.name, r.documents, r.chunks, self._indexes[r.name].size if r.name in self._indexes else 0
                )
                for r in self.store.collections()
            ]

        return await self._on_store(collect)

    # -- documents -----------------------------------------------------------------------------

    def collection_exists(self, name: CollectionName) -> None:
        """Raise 400/404 for a bad or unknown collection name (cheap; no store access)."""
        self._index(name)

    def _index(self, name: str) -> CollectionIndex:
        index = self._indexes.get(name)
        if index is None:
            raise not_found(f"Collection {name!r} does not exist.", param="collection", code="collection_not_found")
        return index

    def _same_model(self, name: str) -> None:
        built_with = self._models.get(name, self.embedder.model_name)
        if built_with != self.embedder.model_name:
            raise APIError(
                409,
                f"Collection {name!r} was embedded with {built_with!r}, not "
                f"{self.embedder.model_name!r}; re-create it and ingest its documents again.",
                code="embedding_model_mismatch",
            )

    async def ingest(self, name: CollectionName, upload: Upload, progress: Progress | None = None) -> dict[str, Any]:
        """Store a document durably and index it; returns its JSON (``duplicate`` when already there)."""
        self._index(name)
        self._same_model(name)
        sha256 = hashlib.sha256(upload.data).hexdigest()
        existing = await self._on_store(self.store.find_by_sha256, name, sha256)
        if existing is not None:
            return document_json(existing, duplicate=True)
        parsed, chunks = await self._on_embedder(self._prepare, upload)
        vectors = await self._encode_chunks(parsed.title, chunks, progress)
        doc = NewDocument(
            f"doc_{uuid.uuid4().hex[:24]}", parsed.title, sha256, parsed.format, len(upload.data), upload.metadata
        )
        try:
            row = await self._on_store(self._commit, name, doc, chunks, vectors)
        except DuplicateDocument:
            existing = await self._on_store(self.store.find_by_sha256, name, sha256)
            if existing is None:
                raise
            return document_json(existing, duplicate=True)
        except KeyError:
            raise not_found(f"Collection {name!r} was deleted.", code="collection_not_found") from None
        self.metrics.ingested_chunks.inc(len(chunks))
        self.metrics.ingested_documents.inc()
        return document_json(row)

    def _prepare(self, upload: Upload) -> tuple[ParsedDocument, list[Chunk]]:
        fallback = upload.title or Path(upload.filename).stem or "untitled"
        parsed = extract(upload.data, upload.format, fallback)
        if upload.title:
            parsed = ParsedDocument(upload.title, parsed.format, parsed.sections)
        chunks = chunk_sections(
            parsed.sections, self.embedder.token_offsets, self.settings.chunk_tokens, self.settings.chunk_overlap
        )
        if not chunks:
            raise bad_request("The document contains no text.", code="empty_document")
        return parsed, chunks

    async def _encode_chunks(self, title: str, chunks: list[Chunk], progress: Progress | None) -> Vectors:
        texts = [embedding_text(title, chunk) for chunk in chunks]
        # Batches keep a query's embedding from waiting behind a whole large document.
        step = self.settings.embed_batch_size
        parts = []
        for start in range(0, len(texts), step):
            parts.append(await self._timed_encode(texts[start : start + step]))
            if progress is not None:
                progress(min(start + step, len(texts)), len(texts))
        return np.concatenate(parts) if parts else np.zeros((0, self.embedder.dimension), dtype=np.float32)

    async def _timed_encode(self, texts: list[str], query: bool = False) -> Vectors:
        started = time.perf_counter()
        vectors = await self._on_embedder(self.embedder.encode_queries if query else self.embedder.encode, texts)
        self.metrics.embed_seconds.observe(time.perf_counter() - started)
        return vectors

    def _commit(self, name: str, doc: NewDocument, chunks: list[Chunk], vectors: Vectors) -> DocumentRow:
        row, ids = self.store.add_document(name, doc, chunks, vectors)
        index = self._indexes.get(name)
        if index is not None:
            index.add(ids, vectors)
        return row

    async def documents(self, name: CollectionName) -> list[dict[str, Any]]:
        self._index(name)
        return [document_json(r) for r in await self._on_store(self.store.documents, name)]

    async def document(self, name: CollectionName, document_id: DocumentId) -> dict[str, Any]:
        self._index(name)
        row = await self._on_store(self.store.document, name, document_id)
        if row is None:
            raise not_found(f"Document {document_id!r} does not exist in {name!r}.", code="document_not_found")
        return document_json(row)

    async def delete_document(self, name: CollectionName, document_id: DocumentId) -> dict[str, Any]:
        self._index(name)
        return await self._on_store(self._delete_document, name, document_id)

    def _delete_document(self, name: str, document_id: str) -> dict[str, Any]:
        ids = self.store.delete_document(name, document_id)
        if ids is None:
            raise not_found(f"Document {document_id!r} does not exist in {name!r}.", code="document_not_found")
        index = self._indexes.get(name)
        if index is not None:
            index.remove(ids)
            if index.needs_rebuild():
                index.rebuild(self.store.embeddings(name))
        return {"id": document_id, "object": "document", "deleted": True}

    # -- search and embeddings -----------------------------------------------------------------

    async def search(self, name: CollectionName, query: str, top_k: int) -> list[dict[str, Any]]:
        self._index(name)
        self._same_model(name)
        if not query.strip():
            raise bad_request("query must not be empty.", param="query")
        if not 1 <= top_k <= self.settings.max_top_k:
            raise bad_request(f"top_k must be between 1 and {self.settings.max_top_k}.", param="top_k")
        vector = await self._timed_encode([query], query=True)
        return await self._on_store(self._search, name, vector, top_k)

    def _search(self, name: str, vector: Vectors, top_k: int) -> list[dict[str, Any]]:
        started = time.perf_counter()
        index = self._index(name)
        scores, ids = index.search(vector, top_k)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        hits = self.store.chunks([i for i, _ in found])
        results = [_hit_json(hits[i], s) for i, s in found if i in hits]
        self.metrics.search_seconds.observe(time.perf_counter() - started)
        return results

    async def embed(self, texts: list[str]) -> tuple[Vectors, int]:
        vectors = await self._timed_encode(texts)
        tokens = await self._on_embedder(self.embedder.count_tokens, texts)
        return vectors, tokens
