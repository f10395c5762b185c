"""``appliance bench rag``: the RAG service against the raw embedding model and exact search, in one run.

The service is reached over HTTP only; the raw references are measured by ``python -m
appliance.bench._rag_reference`` (a process of its own, with the service's settings), so this module imports
nothing of ``rag``.

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
import json
import os
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.bench import harness
from appliance.core.rag_wire import Document, NewCollection, SearchQuery, TextDocument

_VOCABULARY = (
    "river mountain engine harbour market winter garden library bridge forest signal copper glass "
    "weather orchard railway lantern compass valley island factory voyage canal museum mineral "
    "harvest theatre bicycle telescope furnace meadow quarry village castle journal ferry cathedral "
    "the of and to in is was for on that by with as at from it this an are be or which their "
    "built carried measured grew opened crossed repaired painted counted traded studied described"
)
WORDS = tuple(_VOCABULARY.split())
BULK = "bulk"  # the collection of --bulk chunks that ``_rag_reference search`` writes and the service then serves


def corpus(docs: int, seed: int) -> list[TextDocument]:
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
        text = f"# Record {n}\n\n" + "\n\n".join(sections)
        out.append(TextDocument(title=f"Record {n}", text=text, format="markdown"))
    return out


def _env(data_dir: Path, threads: int, token: str = "", **settings: object) -> dict[str, str]:
    """The RAG settings of one data dir, for the service and for ``appliance.bench._rag_reference`` alike."""
    return harness.service_env("rag", data_dir, token, compute_threads=threads, **settings)


@contextmanager
def rag_service(data_dir: Path, threads: int, **extra: object) -> Iterator[tuple[str, str]]:
    port, token = harness.free_port(), secrets.token_urlsafe(32)
    env = _env(data_dir, threads, token, port=port, **extra)
    url = f"http://127.0.0.1:{port}"
    with harness.service(
        harness.python("rag"), env, log=data_dir / "rag-bench.log", ready=f"{url}/health", timeout=300
    ):
        yield url, token


def reference(command: str, workload: Path, data_dir: Path, threads: int, *args: str) -> dict[str, Any]:
    """``python -m appliance.bench._rag_reference COMMAND``: the raw references, in their own process with the
    service's settings."""
    harness.progress("rag", f"appliance.bench._rag_reference {command} {' '.join(args)}".strip())
    argv = harness.python("appliance.bench._rag_reference", command, str(workload), *args)
    return harness.run_json(argv, _env(data_dir, threads), log=data_dir / "rag-reference.log", timeout=1800)


def _body(model: Any) -> dict[str, Any]:
    """A request body of the RAG wire format (``appliance.core.rag_wire``) as JSON."""
    body: dict[str, Any] = model.model_dump(mode="json", exclude_none=True)
    return body


def service_rate(url: str, token: str, docs: list[TextDocument], concurrency: int) -> tuple[float, int]:
    """Chunks/s through the HTTP API, ``concurrency`` uploads in flight (the embed thread stays busy)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with httpx.Client(
        base_url=url,
        headers=harness.internal_headers(token),
        timeout=600,
        limits=httpx.Limits(max_connections=concurrency),
    ) as http:
        http.post("/collections", json=_body(NewCollection(name="warmup"))).raise_for_status()
        warm = TextDocument(title="w", text="warm up the model")
        http.post("/collections/warmup/documents", json=_body(warm)).raise_for_status()
        http.post("/collections", json=_body(NewCollection(name="ingest"))).raise_for_status()
        bodies = [_body(doc) for doc in docs]

        def upload(body: dict[str, Any]) -> int:
            response = http.post("/collections/ingest/documents", json=body)
            response.raise_for_status()
            return Document.model_validate(response.json()).chunks

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            chunks = sum(pool.map(upload, bodies))
        return chunks / (time.perf_counter() - started), chunks


def _median_ms(call: Callable[[], object], repeat: int) -> float:
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def _search(http: Any, body: dict[str, Any]) -> None:
    http.post(f"/collections/{BULK}/search", json=body).raise_for_status()


def _searches(queries: list[str]) -> list[dict[str, Any]]:
    return [_body(SearchQuery(query=query, top_k=10)) for query in queries]


def query_latency(url: str, token: str, queries: list[str]) -> float:
    import httpx

    bodies = _searches(queries)
    with httpx.Client(base_url=url, headers=harness.internal_headers(token), timeout=60) as http:
        for body in bodies[:3]:
            _search(http, body)
        times = []
        for body in bodies:
            started = time.perf_counter()
            _search(http, body)
            times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


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
        health = _median_ms(lambda: http.get("/health").raise_for_status(), len(queries))
        before = _sums(http)
        for body in _searches(queries):
            _search(http, body)
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


def _link_cache(data_dir: Path, cache: Path) -> Path:
    """Every data dir of the run shares one ONNX export (``appliance.bench._rag_reference encode --onnx`` makes it)."""
    (data_dir / "rag").mkdir(parents=True, exist_ok=True)
    (data_dir / "rag" / "onnx").symlink_to(cache, target_is_directory=True)
    return data_dir


def measure_ingest(args: argparse.Namespace, base: Path, workload: Path, docs: list[TextDocument]) -> dict[str, Any]:
    ingest = _link_cache(base / "ingest", base / "onnx-cache")
    before = reference("encode", workload, ingest, args.threads, "--onnx")
    with rag_service(ingest, args.threads) as (url, token):
        served, served_chunks = service_rate(url, token, docs, args.concurrency)
    after = reference("encode", workload, ingest, args.threads)
    raw_before, raw_after = before["raw_encode_chunks_s"], after["raw_encode_chunks_s"]
    raw = (raw_before + raw_after) / 2
    result = {
        "device": before["device"],
        "threads": args.threads or os.cpu_count(),
        "chunks": before["chunks"],
        "raw_encode_chunks_s": round(raw, 2),
        "raw_encode_spread": round(abs(raw_before - raw_after) / raw, 3),
        "service_ingest_chunks_s": round(served, 2),
        "service_chunks": served_chunks,
        "ingest_concurrency": args.concurrency,
        "ingest_efficiency": round(served / raw, 3),
    }
    if "onnx_encode_chunks_s" in before:
        result["onnx_encode_chunks_s"] = before["onnx_encode_chunks_s"]
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(args.data_dir)
    (base / "onnx-cache").mkdir(parents=True, exist_ok=True)
    docs = corpus(args.docs, seed=1)
    queries = [" ".join(random.Random(i).choice(WORDS) for _ in range(8)) for i in range(args.queries)]
    workload = base / "workload.json"
    workload.write_text(json.dumps({"documents": [_body(doc) for doc in docs], "queries": queries}))
    result = measure_ingest(args, base, workload, docs)
    if args.bulk <= 0:
        return result
    bulk = _link_cache(base / "bulk", base / "onnx-cache")
    onnx = ("--onnx",) if "onnx_encode_chunks_s" in result else ()
    result.update(
        reference("search", workload, bulk, args.threads, "--bulk", str(args.bulk), "--collection", BULK, *onnx)
    )
    with rag_service(bulk, args.threads, hnsw_ef_search=result["approx_ef_search"]) as (url, token):
        result["query_p50_ms"] = query_latency(url, token, queries)
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
