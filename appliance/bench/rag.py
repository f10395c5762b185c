"""``appliance bench rag``: the RAG service against the raw embedding model and exact search, in one run.

* ``ingest_efficiency``: chunks/s ingested through the service's HTTP API
  (``python -m rag``: parse, chunk, embed, SQLite commit, index) divided by
  chunks/s of a bare ``SentenceTransformer.encode`` on the very same chunk texts,
  same model and threads (raw is measured before and after; their mean is used).
* ``query_p50_ms``: ``POST /collections/bulk/search`` (real query embedding +
  index search + chunk lookup) on a collection of ``--bulk`` chunks: the real
  corpus chunks plus synthetic vectors mixed from real chunk embeddings.
* ``flat_over_approx``: exact (flat) search time over HNSW search time on the
  same vectors and queries, at the smallest efSearch whose recall@10 against
  exact is at least 0.95 (``approx_recall_at_10``).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from appliance.bench import harness

_VOCABULARY = (
    "river mountain engine harbour market winter garden library bridge forest signal copper glass "
    "weather orchard railway lantern compass valley island factory voyage canal museum mineral "
    "harvest theatre bicycle telescope furnace meadow quarry village castle journal ferry cathedral "
    "the of and to in is was for on that by with as at from it this an are be or which their "
    "built carried measured grew opened crossed repaired painted counted traded studied described"
)
WORDS = tuple(_VOCABULARY.split())
EF_START = 16  # efSearch is doubled from here until recall@10 >= 0.95: the smallest such power of two


def corpus(docs: int, seed: int) -> list[dict[str, str]]:
    """Deterministic Markdown documents of a few sections each (about 5 chunks of 192 tokens)."""
    rng = random.Random(seed)
    out = []
    for n in range(docs):
        sections = []
        for s in range(3):
            sentences = [
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 18))).capitalize() + "."
                for _ in range(rng.randint(14, 22))
            ]
            sections.append(f"## Part {s + 1} of record {n}\n\n" + " ".join(sentences))
        out.append({"title": f"Record {n}", "text": f"# Record {n}\n\n" + "\n\n".join(sections), "format": "markdown"})
    return out


@contextmanager
def rag_service(data_dir: Path, threads: int, **extra: str) -> Iterator[tuple[str, str]]:
    port, token = harness.free_port(), secrets.token_urlsafe(16)
    env = {
        "APPLIANCE_DATA_DIR": str(data_dir),
        "APPLIANCE_RAG_PORT": str(port),
        "APPLIANCE_INTERNAL_TOKEN": token,
        "APPLIANCE_RAG_COMPUTE_THREADS": str(threads),
        "APPLIANCE_LOG_LEVEL": "WARNING",
        **{f"APPLIANCE_RAG_{k.upper()}": v for k, v in extra.items()},
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with harness.service(
        harness.python("rag"), env, log=data_dir / "rag-bench.log", ready=f"{url}/health", timeout=300
    ):
        yield url, token


def chunk_texts(embedder: Any, docs: list[dict[str, str]], size: int, overlap: int) -> list[str]:
    """Exactly what the service embeds for these documents."""
    from rag.chunker import chunk_sections, embedding_text
    from rag.extract import extract

    texts = []
    for doc in docs:
        parsed = extract(doc["text"].encode(), doc["format"], doc["title"])
        for chunk in chunk_sections(parsed.sections, embedder.token_offsets, size, overlap):
            texts.append(embedding_text(doc["title"], chunk))
    return texts


def raw_rate(model: Any, texts: list[str], batch: int) -> float:
    started = time.perf_counter()
    model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
    return len(texts) / (time.perf_counter() - started)


def service_rate(url: str, token: str, docs: list[dict[str, str]], concurrency: int) -> tuple[float, int]:
    """Chunks/s through the HTTP API, ``concurrency`` uploads in flight (the embed thread stays busy)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with httpx.Client(
        base_url=url,
        headers=harness.internal_headers(token),
        timeout=600,
        limits=httpx.Limits(max_connections=concurrency),
    ) as http:
        http.post("/collections", json={"name": "warmup"}).raise_for_status()
        http.post("/collections/warmup/documents", json={"title": "w", "text": "warm up the model"})
        http.post("/collections", json={"name": "ingest"}).raise_for_status()

        def upload(doc: dict[str, str]) -> int:
            response = http.post("/collections/ingest/documents", json=doc)
            response.raise_for_status()
            return int(response.json()["chunks"])

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            chunks = sum(pool.map(upload, docs))
        return chunks / (time.perf_counter() - started), chunks


def synthetic(real: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Unit vectors mixed from three real chunk embeddings plus a little noise."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(real), (n, 3))
    weights = rng.dirichlet((1.0, 1.0, 1.0), n).astype(np.float32)
    out = np.einsum("nk,nkd->nd", weights, real[picks]) + 0.004 * rng.standard_normal((n, real.shape[1]))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    vectors: np.ndarray = out.astype(np.float32)
    return vectors


def timed_search(index: Any, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
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


def build_bulk(data_dir: Path, texts: list[str], vectors: np.ndarray, bulk: int, params: Any) -> Any:
    """A store and saved index holding the real chunks plus synthetic ones, as the service lays them out."""
    from rag.chunker import Chunk
    from rag.index import CollectionIndex
    from rag.store import DocumentStore, NewDocument

    store = DocumentStore(data_dir / "rag" / "store.sqlite3")
    store.create_collection("bulk", vectors.shape[1], "all-MiniLM-L6-v2")
    real_chunks = [Chunk(i, t, (), 0) for i, t in enumerate(texts)]
    _, real_ids = store.add_document(
        "bulk", NewDocument("doc_real", "real", "real", "markdown", 0, {}), real_chunks, vectors
    )
    extra = synthetic(vectors, max(0, bulk - len(texts)), seed=7)
    all_ids, all_vectors = [real_ids], [vectors]
    for part, start in enumerate(range(0, len(extra), 10_000)):
        block = extra[start : start + 10_000]
        chunks = [Chunk(i, f"synthetic chunk {start + i}", (), 0) for i in range(len(block))]
        doc = NewDocument(f"doc_syn{part}", f"synthetic {part}", f"syn{part}", "text", 0, {})
        _, ids = store.add_document("bulk", doc, chunks, block)
        all_ids.append(ids)
        all_vectors.append(block)
    store.close()
    index = CollectionIndex(vectors.shape[1], params)
    index.rebuild([(np.concatenate(all_ids), np.concatenate(all_vectors))])
    (data_dir / "rag" / "indexes").mkdir(parents=True, exist_ok=True)
    index.save(data_dir / "rag" / "indexes" / "bulk.faiss")
    return index, np.concatenate(all_ids), np.concatenate(all_vectors)


def query_latency(url: str, token: str, queries: list[str]) -> float:
    import httpx

    with httpx.Client(base_url=url, headers=harness.internal_headers(token), timeout=60) as http:
        for query in queries[:3]:
            http.post("/collections/bulk/search", json={"query": query, "top_k": 10}).raise_for_status()
        times = []
        for query in queries:
            started = time.perf_counter()
            http.post("/collections/bulk/search", json={"query": query, "top_k": 10}).raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _sums(http: Any) -> dict[str, float]:
    """``*_sum``/``*_count`` of the service's embed and search histograms from /metrics."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(("appliance_rag_embed_seconds_", "appliance_rag_search_seconds_")) and name.endswith(
            ("_sum", "_count")
        ):
            out[name] = float(value)
    return out


def service_breakdown(url: str, token: str, queries: list[str]) -> dict[str, float]:
    """Inside the service per search: embedding (with its thread hop), index search + chunk lookup; and the
    bare HTTP round trip (GET /health) — the rest of query_p50_ms is request parsing and the JSON answer."""
    import httpx

    with httpx.Client(base_url=url, headers=harness.internal_headers(token), timeout=60) as http:
        health = _p50_ms(lambda: http.get("/health").raise_for_status(), len(queries))
        before = _sums(http)
        for query in queries:
            http.post("/collections/bulk/search", json={"query": query, "top_k": 10}).raise_for_status()
        after = _sums(http)

    def mean_ms(kind: str) -> float:
        count = after[f"appliance_rag_{kind}_seconds_count"] - before[f"appliance_rag_{kind}_seconds_count"]
        total = after[f"appliance_rag_{kind}_seconds_sum"] - before[f"appliance_rag_{kind}_seconds_sum"]
        return round(1000 * total / max(count, 1), 2)

    return {
        "service_embed_mean_ms": mean_ms("embed"),
        "service_search_mean_ms": mean_ms("search"),
        "http_health_p50_ms": health,
    }


def approx_vs_flat(
    index: Any, ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, ef_start: int
) -> dict[str, Any]:
    import faiss

    from rag.index import recall_at_k

    flat = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(vectors, ids)
    flat_ms, truth = timed_search(flat, queries, 10)
    ef = ef_start
    while True:
        index.set_ef_search(ef)
        approx_ms, found = timed_search(index.index, queries, 10)
        recall = recall_at_k(truth, found, 10)
        if recall >= 0.95 or ef >= 4096:
            break
        ef *= 2
    return {
        "flat_search_ms": round(flat_ms, 3),
        "approx_search_ms": round(approx_ms, 3),
        "approx_ef_search": ef,
        "approx_recall_at_10": round(recall, 4),
        "flat_over_approx": round(flat_ms / approx_ms, 2),
    }


def _p50_ms(fn: Any, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def embed_breakdown(reference: Any, fast: Any, query: str, repeat: int = 50) -> dict[str, float]:
    """Where one short query's embedding time goes: sentence-transformers' pieces against ONNX Runtime's."""
    import torch

    model = reference.model
    features = model.tokenize([query]) if not hasattr(model, "preprocess") else model.preprocess([query])
    features = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
    encoder = model[0].auto_model

    def forward() -> None:
        with torch.inference_mode():
            encoder(**features)

    out = {
        "st_encode_ms": _p50_ms(lambda: reference.encode([query]), repeat),
        "st_tokenize_ms": _p50_ms(lambda: model.tokenizer([query], padding=True, return_tensors="pt"), repeat),
        "torch_forward_ms": _p50_ms(forward, repeat),
        "torch_threads": torch.get_num_threads(),
    }
    # OpenMP barriers are what collapse when another process holds a core: the same with one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out["st_encode_1thread_ms"] = _p50_ms(lambda: reference.encode([query]), repeat)
        out["torch_forward_1thread_ms"] = _p50_ms(forward, repeat)
    finally:
        torch.set_num_threads(threads)
    if fast is not None:
        out["onnx_tokenize_ms"] = _p50_ms(lambda: fast._feeds([query]), repeat)
        out["onnx_query_ms"] = _p50_ms(lambda: fast.encode_queries([query]), repeat)
    return out


def shared_onnx_cache(base: Path, threads: int) -> tuple[Any, Path | None]:
    """Export once for all the bench's services (each links it as its data_dir/rag/onnx); None without ONNX."""
    from rag.embedder import EmbedderOptions, load_embedder
    from rag.onnx_embedder import OnnxEmbedder
    from rag.onnx_model import OnnxUnavailable

    cache = base / "onnx-cache"
    try:
        fast = load_embedder(EmbedderOptions(backend="onnx", cache_dir=cache, threads=threads))
    except OnnxUnavailable:
        return None, None
    return (fast, cache) if isinstance(fast, OnnxEmbedder) else (None, None)


def _link_cache(data_dir: Path, cache: Path | None) -> Path:
    if cache is not None:
        (data_dir / "rag").mkdir(parents=True, exist_ok=True)
        (data_dir / "rag" / "onnx").symlink_to(cache, target_is_directory=True)
    return data_dir


def measure_ingest(args: argparse.Namespace, reference: Any, fast: Any, cache: Path | None) -> dict[str, Any]:
    from rag.settings import RagSettings

    defaults = RagSettings(data_dir=Path(args.data_dir))
    model = reference.model
    docs = corpus(args.docs, seed=1)
    texts = chunk_texts(reference, docs, defaults.chunk_tokens, defaults.chunk_overlap)
    model.encode(texts[:8])  # warm-up
    raw_before = raw_rate(model, texts, defaults.embed_batch_size)
    with rag_service(_link_cache(Path(args.data_dir) / "ingest", cache), args.threads) as (url, token):
        served, served_chunks = service_rate(url, token, docs, args.concurrency)
    raw_after = raw_rate(model, texts, defaults.embed_batch_size)
    raw = (raw_before + raw_after) / 2
    result = {
        "device": reference.device,
        "threads": args.threads or os.cpu_count(),
        "chunks": len(texts),
        "raw_encode_chunks_s": round(raw, 2),
        "raw_encode_spread": round(abs(raw_before - raw_after) / raw, 3),
        "service_ingest_chunks_s": round(served, 2),
        "service_chunks": served_chunks,
        "ingest_concurrency": args.concurrency,
        "ingest_efficiency": round(served / raw, 3),
    }
    if fast is not None:
        started = time.perf_counter()
        fast.encode(texts)
        result["onnx_encode_chunks_s"] = round(len(texts) / (time.perf_counter() - started), 2)
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from rag.embedder import EmbedderOptions, load_embedder
    from rag.index import ApproxParams
    from rag.settings import RagSettings

    defaults = RagSettings(data_dir=Path(args.data_dir))
    base = Path(args.data_dir)
    # The reference is always sentence-transformers on torch; the service runs its default backend.
    reference = load_embedder(EmbedderOptions(backend="torch", threads=args.threads))
    fast, cache = shared_onnx_cache(base, args.threads)
    result = measure_ingest(args, reference, fast, cache)
    if args.bulk <= 0:
        return result
    texts = chunk_texts(reference, corpus(args.docs, seed=1), defaults.chunk_tokens, defaults.chunk_overlap)
    vectors = reference.encode(texts)
    params = ApproxParams(
        threshold=min(defaults.approx_threshold, args.bulk - 1),
        m=defaults.hnsw_m,
        ef_construction=defaults.hnsw_ef_construction,
        ef_search=defaults.hnsw_ef_search,
    )
    started = time.perf_counter()
    index, ids, bulk_vectors = build_bulk(_link_cache(base / "bulk", cache), texts, vectors, args.bulk, params)
    result["bulk_chunks"] = len(ids)
    result["approx_build_s"] = round(time.perf_counter() - started, 1)
    queries = [" ".join(random.Random(i).choice(WORDS) for _ in range(8)) for i in range(args.queries)]
    query_vectors = reference.encode(queries)
    result.update(approx_vs_flat(index, ids, bulk_vectors, query_vectors, EF_START))
    breakdown = embed_breakdown(reference, fast, queries[0])
    result["query_embed_p50_ms"] = breakdown["st_encode_ms"]
    result["query_breakdown"] = breakdown
    del reference, fast
    with rag_service(base / "bulk", args.threads, hnsw_ef_search=str(result["approx_ef_search"])) as (url, token):
        result["query_p50_ms"] = round(query_latency(url, token, queries), 2)
        result["query_breakdown"].update(service_breakdown(url, token, queries))
    result["targets"] = {"ingest_efficiency": ">= 0.8", "query_p50_ms": "<= 20", "approx_recall_at_10": ">= 0.95"}
    return result


def _parser() -> argparse.ArgumentParser:
    parser = harness.parser("rag", __doc__)
    parser.add_argument("--docs", type=int, default=24, help="documents ingested (about 5 chunks each)")
    parser.add_argument(
        "--bulk", type=int, default=100_000, help="chunks in the query-latency collection (0: ingest part only)"
    )
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=1, help="uploads in flight during the ingest test")
    parser.add_argument("--threads", type=int, default=0, help="torch/FAISS threads (0 = all cores)")
    parser.add_argument("--data-dir", default="", help="where to put the bench's stores (default: a temp dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.data_dir:
        result = measure(args)
    else:
        import shutil

        args.data_dir = tempfile.mkdtemp(prefix="bench-rag-")
        try:
            result = measure(args)
        finally:
            shutil.rmtree(args.data_dir, ignore_errors=True)
    return harness.emit(result, args.json, _render)


def _render(result: Mapping[str, Any]) -> str:
    lines = [
        f"embedding on {result['device']}, {result['threads']} threads, {result['chunks']} chunks",
        f"ingest   raw encode {result['raw_encode_chunks_s']:.1f} chunks/s (onnx "
        f"{result.get('onnx_encode_chunks_s', '-')})   service "
        f"{result['service_ingest_chunks_s']:.1f} chunks/s ({result['ingest_concurrency']} in flight)   "
        f"ingest_efficiency = {result['ingest_efficiency']}",
    ]
    if "bulk_chunks" in result:
        lines += [
            f"search   {result['bulk_chunks']} chunks: flat {result['flat_search_ms']} ms, HNSW "
            f"{result['approx_search_ms']} ms (efSearch {result['approx_ef_search']}, recall@10 "
            f"{result['approx_recall_at_10']})   flat_over_approx = {result['flat_over_approx']}",
            f"query    sentence-transformers embed p50 {result['query_embed_p50_ms']} ms   through the service "
            f"(embed + search + lookup) query_p50_ms = {result['query_p50_ms']}",
            "         " + "   ".join(f"{k} {v}" for k, v in result["query_breakdown"].items()),
        ]
    return "\n".join(lines)
