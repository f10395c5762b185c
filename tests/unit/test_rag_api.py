"""The RAG service's HTTP API in-process, with a tiny deterministic embedder (no model needed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from rag.app import create_app
from rag.embedder import HashEmbedder
from rag.settings import RagSettings
from tests.support.rag_corpus import CORPUS, make_pdf

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOKEN = "unit-test-token-padded-to-32-characters"
HEADERS = {"X-Internal-Token": TOKEN}


def settings(tmp_path: Path, **overrides: Any) -> RagSettings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "internal_token": TOKEN,
        "chunk_tokens": 40,
        "chunk_overlap": 8,
        "max_upload_bytes": 64 * 1024,
        "job_threshold_bytes": 16 * 1024,
        "index_flush_interval_s": 0.1,
    }
    values.update(overrides)
    return RagSettings(**values)


async def started(app_settings: RagSettings, embedder: HashEmbedder | None = None) -> TestClient[Any, Any]:
    app = create_app(app_settings, embedder=embedder or HashEmbedder())
    client = TestClient(TestServer(app), headers=HEADERS)
    await client.start_server()
    for _ in range(200):
        if (await client.get("/health")).status == 200:
            return client
        await asyncio.sleep(0.01)
    await client.close()
    raise AssertionError("service never became ready")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    c = await started(settings(tmp_path))
    yield c
    await c.close()


def form(name: str, data: bytes, content_type: str = "application/octet-stream", **fields: str) -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field("file", data, filename=name, content_type=content_type)
    for key, value in fields.items():
        body.add_field(key, value)
    return body


async def upload(client: TestClient[Any, Any], collection: str, path: Path) -> dict[str, Any]:
    response = await client.post(f"/collections/{collection}/documents", data=form(path.name, path.read_bytes()))
    assert response.status == 201, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def search(client: TestClient[Any, Any], collection: str, query: str, top_k: int = 3) -> list[dict[str, Any]]:
    response = await client.post(f"/collections/{collection}/search", json={"query": query, "top_k": top_k})
    assert response.status == 200, await response.text()
    results: list[dict[str, Any]] = (await response.json())["results"]
    return results


async def test_token_is_required_except_for_health_and_metrics(client: TestClient[Any, Any]) -> None:
    for path in ("/collections", "/v1/models"):
        response = await client.get(path, headers={"X-Internal-Token": "wrong"})
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_api_key"
    anonymous = client.session
    url = client.make_url
    async with anonymous.get(url("/health"), headers={"X-Internal-Token": ""}) as response:
        assert response.status == 200
    async with anonymous.get(url("/metrics"), headers={"X-Internal-Token": ""}) as response:
        assert response.status == 200


async def test_collections_lifecycle_and_name_rules(client: TestClient[Any, Any]) -> None:
    assert (await client.post("/collections", json={"name": "docs"})).status == 201
    again = await client.post("/collections", json={"name": "docs"})
    assert again.status == 409
    for bad in ("../etc", "Docs", "", "a" * 64, "-x", "a/b", "a.b"):
        response = await client.post("/collections", json={"name": bad})
        assert response.status == 400, bad
        assert (await response.json())["error"]["param"] == "name"
    for path in ("/collections/..%2Fetc/documents", "/collections/UPPER", "/collections/a.b/search"):
        response = await (client.get(path) if not path.endswith("search") else client.post(path, json={}))
        assert response.status == 400, path
    listed = (await (await client.get("/collections")).json())["collections"]
    assert [c["name"] for c in listed] == ["docs"]
    assert listed[0]["index_type"] == "flat" and listed[0]["documents"] == 0
    assert (await client.get("/collections/nope")).status == 404
    assert (await client.delete("/collections/docs")).status == 200
    assert (await client.get("/collections/docs")).status == 404
    assert (await client.delete("/collections/docs")).status == 404


async def test_every_format_is_ingested_with_heading_paths(client: TestClient[Any, Any]) -> None:
    await client.post("/collections", json={"name": "kb"})
    docs = {p.name: await upload(client, "kb", p) for p in sorted(CORPUS.iterdir())}
    pdf = make_pdf(
        [
            "The Rosetta Stone was found in 1799 near the town of Rashid.",
            "Its decree is written in hieroglyphic, demotic and Greek scripts.",
        ],
        title="Rosetta Stone",
    )
    response = await client.post("/collections/kb/documents", data=form("rosetta.pdf", pdf))
    assert response.status == 201
    assert (await response.json())["title"] == "Rosetta Stone"
    assert docs["volcanoes.html"]["title"] == "Volcanoes: How They Erupt"
    assert docs["honeybees.md"]["format"] == "markdown"

    hits = await search(client, "kb", "waggle dance angle of the waggle run")
    assert hits[0]["document_id"] == docs["honeybees.md"]["id"]
    assert hits[0]["heading_path"] == ["Honey Bees", "Communication", "The Waggle Dance"]
    hits = await search(client, "kb", "hieroglyphic demotic Greek scripts")
    assert hits[0]["title"] == "Rosetta Stone" and hits[0]["heading_path"] == ["page 1"]
    hits = await search(client, "kb", "trackingPixel console log")
    assert all("trackingPixel" not in h["text"] and "console" not in h["text"] for h in hits)
    info = await (await client.get("/collections/kb")).json()
    assert info["documents"] == 6 and info["chunks"] == info["index_vectors"] > 6


async def test_reupload_is_detected_and_delete_removes_from_results(client: TestClient[Any, Any]) -> None:
    await client.post("/collections", json={"name": "kb"})
    bees = await upload(client, "kb", CORPUS / "honeybees.md")
    await upload(client, "kb", CORPUS / "lighthouses.txt")
    again = await client.post("/collections/kb/documents", data=form("copy.md", (CORPUS / "honeybees.md").read_bytes()))
    assert again.status == 200
    body = await again.json()
    assert body["duplicate"] is True and body["id"] == bees["id"]
    assert len((await (await client.get("/collections/kb/documents")).json())["documents"]) == 2

    assert (await search(client, "kb", "queen lays eggs worker bees"))[0]["document_id"] == bees["id"]
    assert (await client.delete(f"/collections/kb/documents/{bees['id']}")).status == 200
    assert all(h["document_id"] != bees["id"] for h in await search(client, "kb", "queen lays eggs", 10))
    assert (await client.get(f"/collections/kb/documents/{bees['id']}")).status == 404
    assert (await client.delete(f"/collections/kb/documents/{bees['id']}")).status == 404


async def test_bad_inputs_get_the_right_status(client: TestClient[Any, Any]) -> None:
    await client.post("/collections", json={"name": "kb"})
    cases = [
        (form("slides.pptx", b"PK\x03\x04"), 415),
        (form("notes", b"hello", content_type="application/zip"), 415),
        (form("empty.txt", b"   \n  "), 400),
        (form("binary.txt", b"\x00\x01\x02" * 10), 400),
        (form("latin1.txt", "caf\xe9".encode("latin-1")), 400),
        (form("broken.pdf", b"%PDF-1.4 this is not really a pdf"), 400),
        (form("huge.txt", b"word " * 20_000), 413),
    ]
    for data, status in cases:
        response = await client.post("/collections/kb/documents", data=data)
        body = await response.json()
        assert response.status == status, (status, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    empty_pdf = await client.post("/collections/kb/documents", data=form("blank.pdf", make_pdf([])))
    assert empty_pdf.status == 400 and "no text" in (await empty_pdf.json())["error"]["message"]
    assert (await client.post("/collections/missing/documents", data=form("a.txt", b"hello"))).status == 404
    assert (
        await client.post("/collections/kb/documents", data=b"raw", headers={"Content-Type": "text/plain"})
    ).status == 415
    assert (await client.post("/collections/kb/documents", json={"title": "t", "text": ""})).status == 400
    assert (await client.post("/collections/kb/search", json={"query": "x", "top_k": 0})).status == 400
    assert (await client.post("/collections/kb/search", json={"top_k": 3})).status == 400
    assert (await client.get("/collections/kb/documents/doc_nope")).status == 404
    assert (await client.get("/jobs/job_nope")).status == 404
    assert (await client.get("/no/such/route")).status == 404


async def test_json_documents_and_large_uploads_as_jobs(client: TestClient[Any, Any]) -> None:
    await client.post("/collections", json={"name": "kb"})
    response = await client.post(
        "/collections/kb/documents",
        json={
            "title": "Tides",
            "text": "# Tides\n\nTides are caused by the gravity of the Moon and the Sun.",
            "format": "markdown",
            "metadata": {"source": "unit"},
        },
    )
    assert response.status == 201
    doc = await response.json()
    assert doc["metadata"] == {"source": "unit"} and doc["title"] == "Tides"

    big = "\n\n".join(f"Paragraph {i} about glaciers, moraines and crevasses number {i}." for i in range(400))
    response = await client.post("/collections/kb/documents", data=form("glaciers.txt", big.encode()))
    assert response.status == 202
    job_id = (await response.json())["job_id"]
    for _ in range(500):
        job = await (await client.get(f"/jobs/{job_id}")).json()
        if job["state"] in ("succeeded", "failed"):
            break
        assert 0.0 <= job["progress"] <= 1.0
        await asyncio.sleep(0.02)
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0 and job["result"]["chunks"] > 10
    hits = await search(client, "kb", "moraines crevasses glaciers")
    assert hits[0]["document_id"] == job["result"]["id"]


async def test_embeddings_are_openai_shaped(client: TestClient[Any, Any]) -> None:
    response = await client.post("/v1/embeddings", json={"model": "hash-embedder", "input": ["a b", "c"]})
    body = await response.json()
    assert response.status == 200
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert len(body["data"][0]["embedding"]) == 64 and body["usage"]["prompt_tokens"] == 3
    assert (await client.post("/v1/embeddings", json={"model": "other", "input": "x"})).status == 404
    assert (await client.post("/v1/embeddings", json={"model": "hash-embedder", "input": [1, 2]})).status == 400
    assert (await client.post("/v1/embeddings", json={"model": "hash-embedder", "input": []})).status == 400
    b64 = await (
        await client.post("/v1/embeddings", json={"model": "hash-embedder", "input": "x", "encoding_format": "base64"})
    ).json()
    assert isinstance(b64["data"][0]["embedding"], str)


async def test_restart_keeps_documents_and_metrics_count_them(tmp_path: Path) -> None:
    first = await started(settings(tmp_path))
    await first.post("/collections", json={"name": "kb"})
    doc = await upload(first, "kb", CORPUS / "sourdough.md")
    await first.close()
    second = await started(settings(tmp_path))
    try:
        hits = await search(second, "kb", "starter flour water lactic acid")
        assert hits[0]["document_id"] == doc["id"]
        metrics = await (await second.get("/metrics")).text()
        assert 'appliance_rag_documents{collection="kb"} 1.0' in metrics
        assert f'appliance_rag_chunks{{collection="kb"}} {float(doc["chunks"])}' in metrics
    finally:
        await second.close()


async def test_switches_to_hnsw_past_the_threshold_and_survives_restart(tmp_path: Path) -> None:
    app_settings = settings(tmp_path, approx_threshold=20)
    first = await started(app_settings)
    await first.post("/collections", json={"name": "kb"})
    ids = [(await upload(first, "kb", p))["id"] for p in sorted(CORPUS.iterdir())]
    text = "\n\n".join(f"Filler paragraph {i} on quarries and marble and granite slabs." for i in range(60))
    await first.post("/collections/kb/documents", json={"title": "Quarry", "text": text})
    info = await (await first.get("/collections/kb")).json()
    assert info["index_type"] == "hnsw" and info["index_vectors"] == info["chunks"] > 20
    assert (await first.delete(f"/collections/kb/documents/{ids[0]}")).status == 200
    await first.close()
    second = await started(app_settings)
    try:
        info = await (await second.get("/collections/kb")).json()
        assert info["index_type"] == "hnsw" and info["index_vectors"] == info["chunks"]
        hits = await search(second, "kb", "Fresnel lens prisms lighthouse", 10)
        assert hits[0]["title"] == "lighthouses"  # plain text: titled by its file name
        assert all(h["document_id"] != ids[0] for h in hits)
    finally:
        await second.close()


async def test_client_ingest_path_reports_progress_jobs_skips_and_failures(tmp_path: Path) -> None:
    from appliance.cli.rag_client import RagClient, ingest_path

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("# Alpha\n\nAlpha particles are helium nuclei.")
    (folder / "b.txt").write_text("\n".join(f"Beta line {i} on orbital decay." for i in range(1500)))  # > 16 KiB
    (folder / "c.txt").write_text("   ")
    (folder / "d.xlsx").write_bytes(b"PK")
    (folder / "e.md").write_text("# Alpha\n\nAlpha particles are helium nuclei.")  # same bytes as a.md
    c = await started(settings(tmp_path / "data"))
    try:

        def run() -> list[Any]:
            with RagClient(str(c.make_url("")), TOKEN) as rag:
                return list(ingest_path(rag, folder, "new", poll_interval_s=0.01))

        steps = await asyncio.to_thread(run)
    finally:
        await c.close()
    final = {s.path.name: s.state for s in steps if s.state not in ("uploading", "indexing")}
    assert final == {"a.md": "done", "b.txt": "done", "c.txt": "failed", "d.xlsx": "skipped", "e.md": "duplicate"}
    big = [s for s in steps if s.path.name == "b.txt"]
    assert big[-1].document is not None and big[-1].document["chunks"] > 10
    assert all(0.0 <= s.fraction <= 1.0 for s in steps) and {s.files_total for s in steps} == {5}


async def test_a_collection_refuses_queries_from_another_embedding_model(tmp_path: Path) -> None:
    first = await started(settings(tmp_path))
    await first.post("/collections", json={"name": "kb"})
    await upload(first, "kb", CORPUS / "sourdough.md")
    await first.close()
    second = await started(settings(tmp_path), HashEmbedder(name="another-model"))
    try:
        response = await second.post("/collections/kb/search", json={"query": "starter"})
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "embedding_model_mismatch"
    finally:
        await second.close()
