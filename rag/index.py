"""One FAISS index per collection: exact inner product while small, HNSW past a threshold.

Vectors are L2-normalised, so inner product is cosine similarity. The index
is a cache of the document store: on load it is reconciled with the store's
chunk ids (missing vectors re-added from stored embeddings, vectors of deleted
chunks dropped), so whatever moment a crash hit, the loaded index agrees with
the last committed store. Files are written to a temp file, fsynced and
renamed; nothing is pickled.

With a GPU (``faiss.get_num_gpus() > 0`` and ``faiss_gpu = auto``), searches go
to an exact flat copy of the vectors on the GPU (exact beats HNSW there even at
millions of vectors); the CPU index stays the one that is saved and reconciled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.core.durable import fsync_path
from rag.embedding import Vectors

__all__ = ["GPU_MAX_K", "ApproxParams", "CollectionIndex", "Mirror", "gpu_mirror", "recall_at_k"]

log = logging.getLogger(__name__)

Ids = npt.NDArray[np.int64]
# Copies a CPU flat index (IndexIDMap over IndexFlatIP) to where searches should run; returns the copy.
Mirror = Callable[[Any], Any]
GPU_MAX_K = 2048  # faiss GPU flat search answers at most this many neighbours


@dataclass(frozen=True)
class ApproxParams:
    threshold: int = 50_000
    m: int = 32
    ef_construction: int = 80
    ef_search: int = 512
    # Rebuild an HNSW index once this share of its vectors belongs to deleted chunks.
    max_deleted_ratio: float = 0.2


def _faiss() -> Any:
    import faiss

    return faiss


@contextmanager
def _one_thread_when(condition: bool) -> Iterator[None]:
    """One query gains nothing from OpenMP threads, and on a busy host waking them costs more than the search
    itself. Per calling thread, so builds keep theirs."""
    if not condition:
        yield
        return
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def gpu_mirror(setting: str, num_gpus: int) -> Mirror | None:
    """The search copier for ``faiss_gpu``: to GPU 0 when allowed and faiss sees a GPU, else None (CPU)."""
    if setting != "auto" or num_gpus <= 0:
        return None
    resources: list[Any] = []  # one StandardGpuResources (scratch memory, streams) per service, made on first use

    def to_gpu(index: Any) -> Any:
        faiss = _faiss()
        if not resources:
            resources.append(faiss.StandardGpuResources())
        return faiss.index_cpu_to_gpu(resources[0], 0, index)

    return to_gpu


class CollectionIndex:
    """A collection's vectors, keyed by chunk id. Not thread-safe: one owner thread."""

    def __init__(
        self,
        dimension: int,
        params: ApproxParams,
        kind: str = "flat",
        mirror: Mirror | None = None,
        builder: Executor | None = None,
    ) -> None:
        self.dimension = dimension
        self.params = params
        self.kind = kind
        self.index = self._empty(kind)
        # HNSW cannot remove vectors: deleted chunk ids are filtered until the next rebuild.
        self.deleted: set[int] = set()
        self.dirty = False
        self._to_mirror = mirror
        self._mirror: Any = None  # the search copy; dropped on a change it cannot follow, rebuilt on next search
        # Crossing the threshold builds the HNSW index on ``builder`` (None: right here) while the flat one
        # keeps answering; what changes meanwhile is journaled and replayed onto it when it is swapped in.
        self._builder = builder
        self._pending: Future[Any] | None = None
        self._journal: list[tuple[Ids, Vectors | None]] = []  # (ids, vectors) added, (ids, None) removed

    def _empty(self, kind: str) -> Any:
        faiss = _faiss()
        if kind == "flat":
            return faiss.IndexIDMap(faiss.IndexFlatIP(self.dimension))
        inner = faiss.IndexHNSWFlat(self.dimension, self.params.m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = self.params.ef_construction
        inner.hnsw.efSearch = self.params.ef_search
        return faiss.IndexIDMap(inner)

    @property
    def size(self) -> int:
        """Live vectors (deleted ones excluded)."""
        return int(self.index.ntotal) - len(self.deleted)

    def ids(self) -> Ids:
        return np.asarray(_faiss().vector_to_array(self.index.id_map), dtype=np.int64)

    def add(self, ids: Ids, vectors: Vectors) -> None:
        if len(ids) == 0:
            return
        self.poll()
        over = self.kind == "flat" and self.index.ntotal + len(ids) > self.params.threshold
        if over and self._builder is None:
            self._convert([*self._all_vectors(), (ids, vectors)], "hnsw")
        else:
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            self.index.add_with_ids(vectors, ids)
            if self._mirror is not None:
                self._mirror.add_with_ids(vectors, ids)
            if self._pending is not None:
                self._journal.append((ids.copy(), vectors.copy()))
            elif over:
                self.start_build()
        self.dirty = True

    def start_build(self) -> None:
        """Build the HNSW index off this thread from a copy of the vectors (when past the threshold)."""
        if self._builder is None or self._pending is not None or self.kind != "flat":
            return
        if self.index.ntotal <= self.params.threshold:
            return
        parts = self._all_vectors()  # copies: the flat index goes on changing meanwhile
        log.info("building hnsw index in the background", extra={"vectors": sum(len(i) for i, _ in parts)})
        self._journal = []
        self._pending = self._builder.submit(self._build, parts)

    def _build(self, parts: list[tuple[Ids, Vectors]]) -> Any:
        """On the builder thread: touches nothing of ``self`` but its parameters."""
        index = self._empty("hnsw")
        for ids, vectors in parts:
            index.add_with_ids(vectors, ids)
        return index

    @property
    def building(self) -> bool:
        return self._pending is not None

    def poll(self) -> bool:
        """Swap in a finished background build, replaying the journal onto it; True when it did."""
        if self._pending is None or not self._pending.done():
            return False
        pending, journal = self._pending, self._journal
        self._pending, self._journal = None, []
        try:
            index = pending.result()
        except Exception:  # e.g. out of memory: stay flat; the next add past the threshold tries again
            log.exception("background hnsw build failed; the collection stays flat")
            return False
        deleted: set[int] = set()
        for ids, vectors in journal:
            if vectors is None:
                deleted.update(int(i) for i in ids)
            else:
                index.add_with_ids(vectors, ids)
        self.kind, self.index, self.deleted, self._mirror = "hnsw", index, deleted, None
        self.dirty = True
        return True

    def remove(self, ids: Ids) -> None:
        if len(ids) == 0:
            return
        self.poll()
        if self._pending is not None:
            self._journal.append((np.array(ids, dtype=np.int64), None))
        if self.kind == "flat":
            self.index.remove_ids(_faiss().IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
            self._mirror = None  # GPU flat indexes cannot remove ids
        else:
            self.deleted.update(int(i) for i in ids)  # filtered in search(), from the mirror too
        self.dirty = True

    def needs_rebuild(self) -> bool:
        total = int(self.index.ntotal)
        return bool(self.deleted) and len(self.deleted) > self.params.max_deleted_ratio * max(total, 1)

    def rebuild(self, batches: Iterable[tuple[Ids, Vectors]]) -> None:
        """Replace the content with ``batches`` (from the store), choosing flat or HNSW by size."""
        parts = list(batches)
        total = sum(len(ids) for ids, _ in parts)
        self._convert(parts, "hnsw" if total > self.params.threshold else "flat")
        self.dirty = True

    def _convert(self, parts: list[tuple[Ids, Vectors]], kind: str) -> None:
        log.info("building %s index", kind, extra={"vectors": sum(len(i) for i, _ in parts)})
        self.kind = kind
        self.index = self._empty(kind)
        self.deleted = set()
        self._mirror = None
        self._pending, self._journal = None, []  # a build still running is now stale: its result is dropped
        for ids, vectors in parts:
            if len(ids):
                self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)

    def _all_vectors(self) -> list[tuple[Ids, Vectors]]:
        ids = self.ids()
        if len(ids) == 0:
            return []
        vectors = self.index.index.reconstruct_n(0, int(self.index.ntotal))
        keep = ~np.isin(ids, np.fromiter(self.deleted, dtype=np.int64)) if self.deleted else slice(None)
        return [(ids[keep], np.asarray(vectors, dtype=np.float32)[keep])]

    def search(self, queries: Vectors, k: int) -> tuple[npt.NDArray[np.float32], Ids]:
        """Top ``k`` (scores, chunk ids) per query, best first; missing slots are id -1."""
        self.poll()
        n = len(queries)
        fetch = min(int(self.index.ntotal), k + len(self.deleted))
        if fetch == 0:
            return np.zeros((n, 0), dtype=np.float32), np.zeros((n, 0), dtype=np.int64)
        with _one_thread_when(n == 1):
            scores, ids = self._searcher(fetch).search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
        if not self.deleted:
            return scores[:, :k], ids[:, :k]
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        out_ids = np.full((n, k), -1, dtype=np.int64)
        for row in range(n):
            keep = [j for j, i in enumerate(ids[row]) if i >= 0 and int(i) not in self.deleted][:k]
            out_scores[row, : len(keep)] = scores[row, keep]
            out_ids[row, : len(keep)] = ids[row, keep]
        return out_scores, out_ids

    @property
    def mirrored(self) -> bool:
        """Whether searches currently run on the mirror (e.g. the GPU copy)."""
        return self._mirror is not None

    def _searcher(self, fetch: int) -> Any:
        if self._to_mirror is None or fetch > GPU_MAX_K:
            return self.index
        if self._mirror is None:
            faiss = _faiss()
            flat = faiss.IndexIDMap(faiss.IndexFlatIP(self.dimension))
            for ids, vectors in self._all_vectors():
                flat.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
            self._mirror = self._to_mirror(flat)
        return self._mirror

    def set_ef_search(self, ef: int) -> None:
        if self.kind == "hnsw":
            _faiss().downcast_index(self.index.index).hnsw.efSearch = ef

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Atomically replace ``path`` (temp file, fsync, rename, fsync of the directory)."""
        faiss = _faiss()
        tmp = path.with_name(f".{path.name}.tmp")
        # Vectors of deleted chunks may stay in an HNSW file: reconcile() drops them on load.
        faiss.write_index(self.index, str(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
        self.dirty = False

    @classmethod
    def load(
        cls,
        path: Path,
        dimension: int,
        params: ApproxParams,
        mirror: Mirror | None = None,
        builder: Executor | None = None,
    ) -> CollectionIndex | None:
        """The saved index, or None when it is missing, unreadable or of another dimension."""
        if not path.is_file():
            return None
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))  # already downcast; keep this owning wrapper alive
            inner = faiss.downcast_index(index.index)
        except (RuntimeError, AttributeError) as exc:
            log.warning(
                "index file unreadable, rebuilding from the store", extra={"path": str(path), "error": str(exc)}
            )
            return None
        if index.d != dimension or not hasattr(index, "id_map"):
            return None
        kind = "hnsw" if isinstance(inner, faiss.IndexHNSWFlat) else "flat"
        loaded = cls(dimension, params, kind, mirror, builder)
        loaded.index = index
        loaded.set_ef_search(params.ef_search)
        return loaded

    def reconcile(self, store_ids: Ids, fetch: Any) -> tuple[int, int]:
        """Agree with the store: add what is missing (``fetch(ids)`` yields batches), drop the rest."""
        mine = self.ids()
        missing = np.setdiff1d(store_ids, mine, assume_unique=True)
        extra = np.setdiff1d(mine, store_ids, assume_unique=True)
        self.remove(extra)
        if len(missing):
            for ids, vectors in fetch(missing):
                self.add(ids, vectors)
        if self.needs_rebuild():
            self.rebuild(fetch(None))
        return len(missing), len(extra)


def recall_at_k(exact: Ids, approx: Ids, k: int) -> float:
    """Mean share of the exact top-k found in the approximate top-k."""
    hits = 0
    total = 0
    for truth, found in zip(exact[:, :k], approx[:, :k], strict=True):
        want = {int(i) for i in truth if i >= 0}
        hits += len(want & {int(i) for i in found})
        total += len(want)
    return hits / total if total else 1.0
