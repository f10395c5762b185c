"""``python -m appliance.bench._rag_reference``: the references ``appliance bench rag`` holds the RAG service
against, measured in a process of their own: the only bench module that imports ``rag``, and no other module
imports it (tests/unit/test_layering.py), so the bench itself reaches the service over HTTP only.

Settings are read as ``python -m rag`` reads them (``APPLIANCE_RAG_*``, ``APPLIANCE_DATA_DIR``,
``appliance.toml``): the same model, threads, chunk size and batch size as the service measured. Each
command prints one JSON object on stdout (progress and library noise go to stderr)::

    python -m appliance.bench._rag_reference encode WORKLOAD [--onnx]
    python -m appliance.bench._rag_reference search WORKLOAD --bulk N [--collection NAME] [--onnx]

``WORKLOAD`` is a JSON file ``{"documents": [TextDocument, ...], "queries": [str, ...]}``: the documents as
``POST /collections/{name}/documents`` takes them (:class:`appliance.core.rag_wire.TextDocument`).

* ``encode``: the documents chunked exactly as the service chunks them, then a bare sentence-transformers
  ``encode`` (torch) of those chunk texts: ``raw_encode_chunks_s``; with ``--onnx`` also ONNX Runtime's
  (``onnx_encode_chunks_s``), exported once into the data dir's ONNX cache, which the service then reuses.
* ``search``: writes a collection (``bulk`` by default) of ``N`` chunks (the real chunks plus unit vectors
  mixed from their embeddings) into the data dir's store and index file, as the service lays them out, so that a
  service started on that data dir serves it; measures exact (flat) against HNSW search on those vectors
  for the queries (the smallest efSearch, doubled from 16, whose recall@10 against exact is >= 0.95), and
  where one query's embedding time goes (sentence-transformers' pieces, ONNX Runtime's with ``--onnx``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.core.entry import load_or_exit
from appliance.core.rag_wire import TextDocument, is_collection_name
from rag.chunker import Chunk, chunk_sections, embedding_text
from rag.embedder import SentenceTransformerEmbedder, load_embedder
from rag.embedding import Embedder, EmbedderOptions, Vectors
from rag.extract import extract
from rag.index import ApproxParams, CollectionIndex, recall_at_k
from rag.settings import RagSettings
from rag.store import DocumentStore, NewDocument

__all__ = ["EF_START", "RECALL_TARGET", "approx_vs_flat", "build_bulk", "chunk_texts", "main", "synthetic"]

EF_START = 16  # efSearch is doubled from here until recall@10 reaches RECALL_TARGET: the smallest such power of two
EF_MAX = 4096
RECALL_TARGET = 0.95

Ids = npt.NDArray[np.int64]


def chunk_texts(embedder: Embedder, docs: list[TextDocument], settings: RagSettings) -> list[str]:
    """Exactly what the service embeds for these documents (uploaded as JSON: a given title wins over the
    document's own)."""
    texts: list[str] = []
    for doc in docs:
        given = doc.title.strip()
        parsed = extract(doc.text.encode(), doc.format, given or "untitled")
        title = given or parsed.title
        chunks = chunk_sections(parsed.sections, embedder.token_offsets, settings.chunk_tokens, settings.chunk_overlap)
        texts.extend(embedding_text(title, chunk) for chunk in chunks)
    return texts


def _options(settings: RagSettings, backend: str) -> EmbedderOptions:
    return EmbedderOptions(
        settings.embedding_model,
        settings.embedding_device,
        settings.embed_batch_size,
        settings.compute_threads,
        backend,
        settings.onnx_cache_dir,
        settings.query_threads,
        settings.query_int8,
    )


def reference(settings: RagSettings) -> SentenceTransformerEmbedder:
    """sentence-transformers on torch with the service's model, device, batch size and threads."""
    model = load_embedder(_options(settings, "torch"))
    if not isinstance(model, SentenceTransformerEmbedder):
        raise TypeError(f"the torch backend loaded {type(model).__name__}")
    return model


def onnx(settings: RagSettings) -> tuple[Any, str]:
    """The service's ONNX embedder (exported into its cache on first use), or None and why not."""
    from rag.onnx_embedder import OnnxEmbedder
    from rag.onnx_model import OnnxUnavailable

    try:
        fast = load_embedder(_options(settings, "onnx"))
    except OnnxUnavailable as exc:
        return None, str(exc)
    return (fast, "") if isinstance(fast, OnnxEmbedder) else (None, "not an ONNX embedder")


def _rate(encode: Callable[[list[str]], object], texts: list[str]) -> float:
    encode(texts[:8])  # warm-up
    started = time.perf_counter()
    encode(texts)
    return len(texts) / (time.perf_counter() - started)


def measure_encode(settings: RagSettings, docs: list[TextDocument], with_onnx: bool) -> dict[str, Any]:
    model = reference(settings)
    texts = chunk_texts(model, docs, settings)
    st = model.model

    def raw(batch: list[str]) -> object:
        return st.encode(batch, batch_size=settings.embed_batch_size, normalize_embeddings=True, convert_to_numpy=True)

    result: dict[str, Any] = {
        "device": model.device,
        "chunks": len(texts),
        "embed_batch_size": settings.embed_batch_size,
        "raw_encode_chunks_s": round(_rate(raw, texts), 2),
    }
    if with_onnx:
        fast, why = onnx(settings)
        if fast is None:
            result["onnx_unavailable"] = why
        else:
            result["onnx_encode_chunks_s"] = round(_rate(fast.encode, texts), 2)
    return result


def synthetic(real: Vectors, n: int, seed: int) -> Vectors:
    """Unit vectors mixed from three real chunk embeddings plus a little noise."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(real), (n, 3))
    weights = rng.dirichlet((1.0, 1.0, 1.0), n).astype(np.float32)
    out = np.einsum("nk,nkd->nd", weights, real[picks]) + 0.004 * rng.standard_normal((n, real.shape[1]))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    vectors: Vectors = out.astype(np.float32)
    return vectors


def build_bulk(
    settings: RagSettings, collection: str, *, model: str, texts: list[str], vectors: Vectors, bulk: int
) -> tuple[CollectionIndex, Ids, Vectors]:
    """The store and saved index of ``collection``: the real chunks plus synthetic ones up to ``bulk``, HNSW
    with the service's parameters (past a threshold below ``bulk``, whatever the configured one)."""
    params = ApproxParams(
        threshold=min(settings.approx_threshold, bulk - 1),
        m=settings.hnsw_m,
        ef_construction=settings.hnsw_ef_construction,
        ef_search=settings.hnsw_ef_search,
    )
    settings.rag_dir.mkdir(parents=True, exist_ok=True)
    store = DocumentStore(settings.rag_dir / "store.sqlite3")
    try:
        store.create_collection(collection, vectors.shape[1], model)
        real_chunks = [Chunk(i, t, (), 0) for i, t in enumerate(texts)]
        _, real_ids = store.add_document(
            collection, NewDocument("doc_real", "real", "real", "markdown", 0, {}), real_chunks, vectors
        )
        extra = synthetic(vectors, max(0, bulk - len(texts)), seed=7)
        all_ids, all_vectors = [real_ids], [vectors]
        for part, start in enumerate(range(0, len(extra), 10_000)):
            block = extra[start : start + 10_000]
            chunks = [Chunk(i, f"synthetic chunk {start + i}", (), 0) for i in range(len(block))]
            doc = NewDocument(f"doc_syn{part}", f"synthetic {part}", f"syn{part}", "text", 0, {})
            _, ids = store.add_document(collection, doc, chunks, block)
            all_ids.append(ids)
            all_vectors.append(block)
    finally:
        store.close()
    ids, every = np.concatenate(all_ids), np.concatenate(all_vectors)
    index = CollectionIndex(vectors.shape[1], params)
    index.rebuild([(ids, every)])
    (settings.rag_dir / "indexes").mkdir(parents=True, exist_ok=True)
    index.save(settings.rag_dir / "indexes" / f"{collection}.faiss")
    return index, ids, every


def timed_search(index: Any, queries: Vectors, k: int) -> tuple[float, Ids]:
    """Median ms per single-query search, and the ids found; one OpenMP thread, as the service searches."""
    import faiss

    times, found = [], []
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for q in queries:
            started = time.perf_counter()
            _, ids = index.search(q[None, :], k)
            times.append((time.perf_counter() - started) * 1000)
            found.append(ids[0])
    finally:
        faiss.omp_set_num_threads(before)
    return statistics.median(times), np.array(found)


def approx_vs_flat(index: CollectionIndex, ids: Ids, vectors: Vectors, queries: Vectors) -> dict[str, Any]:
    """Exact search against HNSW at the smallest efSearch (doubled from EF_START) reaching RECALL_TARGET."""
    import faiss

    flat = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(vectors, ids)
    flat_ms, truth = timed_search(flat, queries, 10)
    ef = EF_START
    while True:
        index.set_ef_search(ef)
        approx_ms, found = timed_search(index.index, queries, 10)
        recall = recall_at_k(truth, found, 10)
        if recall >= RECALL_TARGET or ef >= EF_MAX:
            break
        ef *= 2
    return {
        "flat_search_ms": round(flat_ms, 3),
        "approx_search_ms": round(approx_ms, 3),
        "approx_ef_search": ef,
        "approx_recall_at_10": round(recall, 4),
        "flat_over_approx": round(flat_ms / approx_ms, 2),
    }


def _p50_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    return round(1000 * statistics.median(timeit.repeat(fn, repeat=repeat, number=1)), 2)


def embed_breakdown(model: SentenceTransformerEmbedder, fast: Any, query: str, repeat: int = 50) -> dict[str, Any]:
    """Where one short query's embedding time goes: sentence-transformers' pieces against ONNX Runtime's."""
    import torch

    st = model.model
    features = st.tokenize([query]) if not hasattr(st, "preprocess") else st.preprocess([query])
    features = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
    encoder = st[0].auto_model

    def forward() -> None:
        with torch.inference_mode():
            encoder(**features)

    out: dict[str, Any] = {
        "st_encode_ms": _p50_ms(lambda: model.encode([query]), repeat),
        "st_tokenize_ms": _p50_ms(lambda: st.tokenizer([query], padding=True, return_tensors="pt"), repeat),
        "torch_forward_ms": _p50_ms(forward, repeat),
        "torch_threads": torch.get_num_threads(),
    }
    # OpenMP barriers are what collapse when another process holds a core: the same with one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out["st_encode_1thread_ms"] = _p50_ms(lambda: model.encode([query]), repeat)
        out["torch_forward_1thread_ms"] = _p50_ms(forward, repeat)
    finally:
        torch.set_num_threads(threads)
    if fast is not None:
        out["onnx_tokenize_ms"] = _p50_ms(lambda: fast._feeds([query]), repeat)
        out["onnx_query_ms"] = _p50_ms(lambda: fast.encode_queries([query]), repeat)
    return out


def measure_search(
    settings: RagSettings, args: argparse.Namespace, docs: list[TextDocument], queries: list[str]
) -> dict[str, Any]:
    model = reference(settings)
    texts = chunk_texts(model, docs, settings)
    vectors = model.encode(texts)
    started = time.perf_counter()
    index, ids, every = build_bulk(
        settings, args.collection, model=model.model_name, texts=texts, vectors=vectors, bulk=args.bulk
    )
    result: dict[str, Any] = {"bulk_chunks": len(ids), "approx_build_s": round(time.perf_counter() - started, 1)}
    result.update(approx_vs_flat(index, ids, every, model.encode(queries)))
    fast = onnx(settings)[0] if args.onnx else None
    breakdown = embed_breakdown(model, fast, queries[0])
    result["query_embed_p50_ms"] = breakdown["st_encode_ms"]
    result["query_breakdown"] = breakdown
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.bench._rag_reference", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("encode", "search"):
        command = commands.add_parser(name)
        command.add_argument("workload", type=Path, help='JSON {"documents": [...], "queries": [...]}')
        command.add_argument("--onnx", action="store_true", help="also measure ONNX Runtime (exported once)")
        if name == "search":
            command.add_argument("--bulk", type=int, required=True, help="chunks in the collection written")
            command.add_argument("--collection", default="bulk", help="the collection written (a new one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    workload = json.loads(args.workload.read_text(encoding="utf-8"))
    docs = [TextDocument.model_validate(doc) for doc in workload["documents"]]
    queries = [str(query) for query in workload.get("queries", [])]
    settings = load_or_exit(RagSettings, "appliance.bench._rag_reference")
    if args.command == "encode":
        result = measure_encode(settings, docs, args.onnx)
    else:
        if args.bulk < 2 or not queries or not is_collection_name(args.collection):
            sys.stderr.write(
                "_rag_reference search: --bulk must be at least 2, --collection a valid name, and the workload "
                "needs queries\n"
            )
            return 2
        result = measure_search(settings, args, docs, queries)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
