"""``appliance bench rag`` end to end on a tiny workload, and the RAG package's own commands it relies on.

The bench reaches the service over HTTP only and takes its raw references from ``python -m
appliance.bench._rag_reference`` (a process of its own: tests/unit/test_layering.py keeps ``rag`` imports out of
every other bench module); here the two
halves have to agree: the chunks the reference encodes are the ones the service ingests, and the
collection ``appliance.bench._rag_reference search`` writes is the one the service then serves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# The figures of `appliance bench rag --json`.
FIGURES = set(
    [
        "device",
        "threads",
        "chunks",
        "raw_encode_chunks_s",
        "raw_encode_spread",
        "service_ingest_chunks_s",
        "service_chunks",
        "ingest_concurrency",
        "ingest_efficiency",
        "bulk_chunks",
        "approx_build_s",
        "flat_search_ms",
        "approx_search_ms",
        "approx_ef_search",
        "approx_recall_at_10",
        "flat_over_approx",
        "query_embed_p50_ms",
        "query_breakdown",
        "query_p50_ms",
        "targets",
    ]
)
BREAKDOWN = set(
    [
        "st_encode_ms",
        "st_tokenize_ms",
        "torch_forward_ms",
        "torch_threads",
        "st_encode_1thread_ms",
        "torch_forward_1thread_ms",
        "service_embed_mean_ms",
        "service_search_mean_ms",
        "http_health_p50_ms",
    ]
)


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False)


def test_bench_rag_end_to_end_on_a_tiny_workload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    tiny = ["--docs", "3", "--bulk", "600", "--queries", "6", "--threads", "1", "--json"]
    done = _run("-m", "appliance.bench", "rag", *tiny, "--data-dir", str(run), timeout=840)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert set(result) >= FIGURES, FIGURES - set(result)
    assert set(result["query_breakdown"]) >= BREAKDOWN
    # the reference chunked the documents exactly as the service did (else ingest_efficiency compares apples and
    # pears)
    assert result["chunks"] == result["service_chunks"] > 3
    assert result["raw_encode_chunks_s"] > 0 and result["service_ingest_chunks_s"] > 0
    # the collection the reference wrote is what the service searched (a 404 there fails the bench run)
    assert result["bulk_chunks"] == 600
    assert result["query_breakdown"]["service_search_mean_ms"] > 0
    ef = result["approx_ef_search"]
    assert ef >= 16 and ef & (ef - 1) == 0  # a power of two, doubled from 16
    assert 0 <= result["approx_recall_at_10"] <= 1
    assert result["approx_recall_at_10"] >= 0.95 or ef == 4096
    # the references ran in their own processes, with the service's settings, and logged there
    assert (run / "ingest" / "rag-reference.log").is_file() and (run / "bulk" / "rag-reference.log").is_file()
    assert (run / "bulk" / "rag" / "indexes" / "bulk.faiss").is_file()
    # `python -m rag.export` (what `appliance images build` runs) finds the export the run made and reuses it
    done = _run("-m", "rag.export", str(run / "onnx-cache"))
    assert done.returncode == 0, done.stderr[-2000:]
    export = json.loads(done.stdout)
    assert export["exported"] is False and export["model"] == "all-MiniLM-L6-v2"
    assert Path(export["encoder"]).is_file() and Path(export["encoder"]).parent.parent == (run / "onnx-cache").resolve()
    # and `appliance images build` copies it from there for the RAG image, through that command
    from appliance.runtime.compose import images as compose_images

    build = tmp_path / "build"
    build.mkdir()
    (build / "onnx-cache").symlink_to(run / "onnx-cache", target_is_directory=True)
    monkeypatch.setattr(compose_images, "BUILD_DIR", build)
    said: list[str] = []
    baked = compose_images.ensure_onnx_export(said.append)
    assert baked == build / "onnx" / "encoder.onnx" and said == []  # found in the cache, not exported again
    assert baked.read_bytes() == Path(export["encoder"]).read_bytes()


def test_measure_refuses_bad_arguments_without_a_traceback(tmp_path: Path) -> None:
    workload = tmp_path / "workload.json"
    workload.write_text(json.dumps({"documents": [{"title": "t", "text": "some text"}], "queries": ["q"]}))
    for args, words in (
        (["search", str(workload), "--bulk", "1"], "--bulk must be at least 2"),
        (["search", str(workload), "--bulk", "10", "--collection", "Not A Name"], "--collection a valid name"),
        (["frobnicate", str(workload)], "invalid choice"),
    ):
        done = _run("-m", "appliance.bench._rag_reference", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr and "Traceback" not in done.stderr and not done.stdout


def test_export_names_the_reason_when_the_model_cannot_be_exported(tmp_path: Path) -> None:
    done = _run("-m", "rag.export", str(tmp_path / "cache"), "--model", str(tmp_path / "no-such-model"))
    assert done.returncode == 1
    assert done.stderr.startswith("rag.export: ") and "modules.json" in done.stderr and not done.stdout
    assert "Traceback" not in done.stderr
