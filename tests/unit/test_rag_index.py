"""The FAISS index: exact search, HNSW recall against exact, deletes, atomic save and crash reconciliation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rag.index import ApproxParams, CollectionIndex, gpu_mirror, recall_at_k

Ids = npt.NDArray[np.int64]


def clustered(n: int, dim: int, seed: int, clusters: int = 64) -> npt.NDArray[np.float32]:
    """Unit vectors around random centres: closer to real embeddings than uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def test_hnsw_recall_at_10_is_at_least_095_against_exact() -> None:
    dim, n = 48, 10_000
    vectors = clustered(n, dim, seed=1)
    queries = clustered(200, dim, seed=2)
    ids = np.arange(1, n + 1, dtype=np.int64)
    exact = CollectionIndex(dim, ApproxParams(threshold=n + 1))
    approx = CollectionIndex(dim, ApproxParams(threshold=1000))
    exact.add(ids, vectors)
    approx.add(ids, vectors)
    assert exact.kind == "flat" and approx.kind == "hnsw"
    _, truth = exact.search(queries, 10)
    _, found = approx.search(queries, 10)
    assert recall_at_k(truth, found, 10) >= 0.95
    brute = np.argsort(-(queries @ vectors.T), axis=1)[:, :10] + 1
    assert recall_at_k(brute, truth, 10) == 1.0  # "exact" really is exact


def test_flat_remove_and_hnsw_filters_deleted_until_rebuild() -> None:
    dim = 16
    vectors = clustered(300, dim, seed=3)
    ids = np.arange(10, 310, dtype=np.int64)
    for threshold in (1000, 50):
        index = CollectionIndex(dim, ApproxParams(threshold=threshold, max_deleted_ratio=0.5))
        index.add(ids, vectors)
        gone = ids[:100]
        index.remove(gone)
        assert index.size == 200
        _, found = index.search(vectors[:100], 5)
        assert not set(found.ravel().tolist()) & set(gone.tolist())
        assert (found >= 0).all()


def test_crossing_the_threshold_converts_without_losing_vectors() -> None:
    dim = 8
    index = CollectionIndex(dim, ApproxParams(threshold=100))
    vectors = clustered(150, dim, seed=4)
    index.add(np.arange(100, dtype=np.int64), vectors[:100])
    assert index.kind == "flat"
    index.add(np.arange(100, 150, dtype=np.int64), vectors[100:])
    assert index.kind == "hnsw" and index.size == 150
    assert sorted(index.ids().tolist()) == list(range(150))


def fetcher(all_ids: Ids, all_vectors: npt.NDArray[np.float32]):  # type: ignore[no-untyped-def]
    def fetch(wanted: Ids | None) -> Iterator[tuple[Ids, npt.NDArray[np.float32]]]:
        mask = np.ones(len(all_ids), bool) if wanted is None else np.isin(all_ids, wanted)
        yield all_ids[mask], all_vectors[mask]

    return fetch


def test_save_load_and_reconcile_with_the_store(tmp_path: Path) -> None:
    """A stale index file (crash before the flush) is brought back in line with the store."""
    dim, path = 12, tmp_path / "c.faiss"
    vectors = clustered(120, dim, seed=5)
    ids = np.arange(1, 121, dtype=np.int64)
    for threshold in (1000, 10):
        index = CollectionIndex(dim, ApproxParams(threshold=threshold))
        index.add(ids[:80], vectors[:80])
        index.save(path)
        assert not index.dirty and not list(tmp_path.glob(".*.tmp"))
        # The store moved on after the save: ids 1-20 deleted, 81-120 added.
        store_ids = ids[20:]
        loaded = CollectionIndex.load(path, dim, ApproxParams(threshold=threshold))
        assert loaded is not None and loaded.kind == index.kind
        added, dropped = loaded.reconcile(store_ids, fetcher(ids, vectors))
        assert (added, dropped) == (40, 20)
        assert loaded.size == 100
        _, found = loaded.search(vectors[:20], 3)
        assert not set(found.ravel().tolist()) & set(range(1, 21))
        _, found = loaded.search(vectors[100:101], 1)
        assert found[0, 0] == 101


def test_unreadable_or_mismatched_index_files_are_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "c.faiss"
    path.write_bytes(b"garbage from a torn write")
    assert CollectionIndex.load(path, 8, ApproxParams()) is None
    CollectionIndex(16, ApproxParams()).save(path)
    assert CollectionIndex.load(path, 8, ApproxParams()) is None
    assert CollectionIndex.load(tmp_path / "missing.faiss", 8, ApproxParams()) is None


# -- the GPU search copy: selection and bookkeeping, exercised with a CPU copier (no GPU here) --------------


def test_gpu_copy_is_chosen_only_when_allowed_and_faiss_sees_a_gpu() -> None:
    import faiss

    assert gpu_mirror("off", 4) is None
    assert gpu_mirror("auto", 0) is None
    assert callable(gpu_mirror("auto", 1))
    assert faiss.get_num_gpus() == 0  # faiss-cpu: the service searches its CPU indexes here


class CountingCopier:
    """Stands in for faiss.index_cpu_to_gpu: a CPU clone, counting full copies."""

    def __init__(self) -> None:
        self.copies = 0

    def __call__(self, index: object) -> object:
        import faiss

        self.copies += 1
        return faiss.clone_index(index)


def test_searches_use_the_copy_which_follows_adds_and_is_rebuilt_after_removes() -> None:
    dim = 16
    vectors = clustered(400, dim, seed=7)
    ids = np.arange(1, 401, dtype=np.int64)
    copier = CountingCopier()
    plain = CollectionIndex(dim, ApproxParams(threshold=10_000))
    mirrored = CollectionIndex(dim, ApproxParams(threshold=10_000), mirror=copier)
    for index in (plain, mirrored):
        index.add(ids[:200], vectors[:200])
    assert mirrored.search(vectors[:5], 5)[1].tolist() == plain.search(vectors[:5], 5)[1].tolist()
    assert mirrored.mirrored and copier.copies == 1
    for index in (plain, mirrored):
        index.add(ids[200:], vectors[200:])
    assert mirrored.search(vectors[300:305], 5)[1].tolist() == plain.search(vectors[300:305], 5)[1].tolist()
    assert copier.copies == 1  # adds went to the copy too
    for index in (plain, mirrored):
        index.remove(ids[300:310])
    assert not mirrored.mirrored  # a GPU flat index cannot remove ids: dropped, rebuilt on the next search
    _, found = mirrored.search(vectors[300:310], 5)
    assert copier.copies == 2 and not set(found.ravel().tolist()) & set(range(301, 311))
    assert found.tolist() == plain.search(vectors[300:310], 5)[1].tolist()
    assert mirrored.search(vectors[:1], 2100)[1].shape == (1, 390)  # past the GPU's k limit: the CPU index
    assert copier.copies == 2


def test_hnsw_collections_search_an_exact_copy_and_filter_deleted() -> None:
    dim = 16
    vectors = clustered(600, dim, seed=8)
    ids = np.arange(1, 601, dtype=np.int64)
    copier = CountingCopier()
    exact = CollectionIndex(dim, ApproxParams(threshold=10_000))
    approx = CollectionIndex(dim, ApproxParams(threshold=100, max_deleted_ratio=0.9), mirror=copier)
    for index in (exact, approx):
        index.add(ids, vectors)
    assert approx.kind == "hnsw"
    for index in (exact, approx):
        index.remove(ids[:50])
    _, truth = exact.search(vectors[:60], 10)
    _, found = approx.search(vectors[:60], 10)
    assert found.tolist() == truth.tolist() and copier.copies == 1  # exact: not HNSW's approximation
    assert not set(found.ravel().tolist()) & set(range(1, 51))
    for index in (exact, approx):
        index.remove(ids[50:60])  # after the copy was made: filtered by id, no new copy
    _, found = approx.search(vectors[:60], 10)
    assert found.tolist() == exact.search(vectors[:60], 10)[1].tolist() and copier.copies == 1


def test_a_single_query_search_leaves_the_callers_openmp_threads_as_they_were() -> None:
    import faiss

    index = CollectionIndex(8, ApproxParams(threshold=50))
    vectors = clustered(100, 8, seed=9)
    index.add(np.arange(1, 101, dtype=np.int64), vectors)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        assert index.search(vectors[:1], 1)[1].tolist() == [[1]]  # searched with one thread …
        assert faiss.omp_get_max_threads() == 2  # … and the owner thread's setting (for builds) is back
    finally:
        faiss.omp_set_num_threads(before)


# -- crossing the threshold builds HNSW off the owner thread ---------------------------------------------


class ManualBuilder(Executor):
    """An executor that runs its jobs only when told: the moment the build finishes is the test's choice."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.jobs.append((future, fn, args))
        return future

    def finish(self) -> None:
        for future, fn, args in self.jobs:
            future.set_result(fn(*args))
        self.jobs.clear()


def test_the_flat_index_answers_while_hnsw_builds_and_changes_meanwhile_are_replayed() -> None:
    dim = 16
    vectors = clustered(400, dim, seed=10)
    ids = np.arange(1, 401, dtype=np.int64)
    builder = ManualBuilder()
    index = CollectionIndex(dim, ApproxParams(threshold=200), builder=builder)
    exact = CollectionIndex(dim, ApproxParams(threshold=10_000))
    for target in (index, exact):
        target.add(ids[:250], vectors[:250])  # past the threshold: the build starts, the upload does not wait
    assert index.kind == "flat" and index.building and len(builder.jobs) == 1
    assert index.search(vectors[:20], 10)[1].tolist() == exact.search(vectors[:20], 10)[1].tolist()
    for target in (index, exact):  # while it builds: more vectors, and removals old and new
        target.add(ids[250:], vectors[250:])
        target.remove(np.concatenate([ids[:30], ids[300:310]]))
    assert len(builder.jobs) == 1 and index.size == exact.size == 360
    builder.finish()
    _, found = index.search(vectors, 10)  # the next operation swaps the finished build in
    assert index.kind == "hnsw" and not index.building and index.dirty and index.size == 360
    gone = set(range(1, 31)) | set(range(301, 311))
    assert not set(found.ravel().tolist()) & gone
    _, truth = exact.search(vectors, 10)
    assert recall_at_k(truth, found, 10) >= 0.95


def test_a_failed_build_leaves_the_collection_flat_and_a_later_add_tries_again() -> None:
    dim = 8
    vectors = clustered(300, dim, seed=11)
    builder = ManualBuilder()
    index = CollectionIndex(dim, ApproxParams(threshold=100), builder=builder)
    index.add(np.arange(1, 151, dtype=np.int64), vectors[:150])
    future, _, _ = builder.jobs.pop()
    future.set_exception(MemoryError("no room"))
    assert not index.poll() and index.kind == "flat" and not index.building and index.size == 150
    index.add(np.arange(151, 301, dtype=np.int64), vectors[150:])
    assert index.building
    builder.finish()
    assert index.poll() and index.kind == "hnsw" and index.size == 300
