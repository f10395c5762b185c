"""The real RAG service (``python -m rag``, real all-MiniLM-L6-v2) over one data directory:
retrieval quality, duplicates, embeddings, delete, a graceful restart, then ``kill -9`` mid-ingest.

Three process starts in all (the model import dominates start-up), so the tests run in file order.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from appliance.cli.rag_client import RagClient, ingest_path
from tests.support.processes import Service
from tests.support.rag_corpus import CORPUS, make_pdf
from tests.support.rag_service import TOKEN, rag_process

pytestmark = pytest.mark.integration

# Small chunks and a low HNSW threshold so the crash phase converts the index mid-ingest;
# one compute thread keeps torch from spinning against other processes on a small host.
SETTINGS = {
    "chunk_tokens": "64",
    "chunk_overlap": "8",
    "approx_threshold": "60",
    "index_flush_interval_s": "0.05",
    "compute_threads": "1",
}
QUESTIONS = {
    "How do bees tell each other where the flowers are?": "honeybees.md",
    "Who invented the lens that lighthouses use to make a beam?": "lighthouses.txt",
    "Why are some volcanic eruptions so violent?": "volcanoes.html",
    "What did Lincoln say about government of the people?": "gettysburg.txt",
    "How often do I need to feed my starter?": "sourdough.md",
    "Where was the Rosetta Stone discovered?": "rosetta.pdf",
}
BEES = "How do bees tell each other where the flowers are?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    docs = tmp_path_factory.mktemp("docs")
    for path in CORPUS.iterdir():
        shutil.copy(path, docs / path.name)
    (docs / "rosetta.pdf").write_bytes(
        make_pdf(
            [
                "The Rosetta Stone is a granodiorite stele found in 1799 by French soldiers",
                "near the town of Rashid (Rosetta) in the Nile Delta of Egypt. Its decree of",
                "196 BC is written in hieroglyphic, demotic and ancient Greek, which let",
                "Jean-Francois Champollion decipher Egyptian hieroglyphs in 1822.",
            ],
            title="The Rosetta Stone",
        )
    )
    (docs / "notes.docx").write_bytes(b"PK\x03\x04 not supported")
    return docs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rag-data")


@pytest.fixture(scope="module")
def first(data_dir: Path) -> Iterator[tuple[Service, str]]:
    with rag_process(data_dir, **SETTINGS) as started:
        yield started


@pytest.fixture(scope="module")
def client(first: tuple[Service, str]) -> Iterator[RagClient]:
    with RagClient(first[1], TOKEN) as rag:
        yield rag


@pytest.fixture(scope="module")
def ingested(client: RagClient, folder: Path) -> dict[str, dict[str, Any]]:
    steps = list(ingest_path(client, folder, "library"))
    final = {s.path.name: s for s in steps if s.state in ("done", "duplicate", "failed", "skipped")}
    assert final["notes.docx"].state == "skipped"
    assert {name: s.state for name, s in final.items() if name != "notes.docx"} == {
        name: "done" for name in QUESTIONS.values()
    }
    assert all(s.file_index <= s.files_total == 7 for s in steps)
    return {name: s.document for name, s in final.items() if s.document is not None}


def test_the_right_document_comes_first(client: RagClient, ingested: dict[str, dict[str, Any]]) -> None:
    for question, expected in QUESTIONS.items():
        results = client.search("library", question, top_k=3)
        assert results[0]["document_id"] == ingested[expected]["id"], (question, results[0]["title"])
        assert results[0]["score"] >= results[-1]["score"]
    waggle = client.search("library", "waggle dance direction and distance of food", top_k=1)[0]
    assert waggle["heading_path"] == ["Honey Bees", "Communication", "The Waggle Dance"]
    assert waggle["title"] == "Honey Bees"


def test_reupload_is_not_duplicated(client: RagClient, folder: Path, ingested: dict[str, dict[str, Any]]) -> None:
    again = client.upload("library", folder / "honeybees.md")
    assert again["duplicate"] is True and again["id"] == ingested["honeybees.md"]["id"]
    assert len(client.documents("library")) == len(QUESTIONS)


def test_embeddings_with_the_official_openai_client(first: tuple[Service, str]) -> None:
    openai = OpenAI(base_url=f"{first[1]}/v1", api_key="unused", default_headers={"X-Internal-Token": TOKEN})
    answer = openai.embeddings.create(
        model="all-MiniLM-L6-v2",
        input=["The cat sat on the mat.", "A kitten was sitting on the rug.", "Quarterly tax filing deadlines."],
    )
    vectors = np.array([item.embedding for item in answer.data])
    assert vectors.shape == (3, 384) and answer.usage.prompt_tokens > 10
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_delete_removes_the_document_from_results(client: RagClient, ingested: dict[str, dict[str, Any]]) -> None:
    bees = ingested["honeybees.md"]["id"]
    assert client.search("library", BEES, top_k=1)[0]["document_id"] == bees
    client.delete_document("library", bees)
    assert all(hit["document_id"] != bees for hit in client.search("library", BEES, top_k=10))


@pytest.fixture(scope="module")
def second(first: tuple[Service, str], client: RagClient, data_dir: Path) -> Iterator[tuple[Service, str]]:
    first[0].stop()  # SIGTERM: a graceful shutdown flushes the index
    with rag_process(data_dir, **SETTINGS) as started:
        yield started


def check_library(url: str, ingested: dict[str, dict[str, Any]]) -> None:
    with RagClient(url, TOKEN) as rag:
        kept = {name: doc["id"] for name, doc in ingested.items() if name != "honeybees.md"}
        assert sorted(d["id"] for d in rag.documents("library")) == sorted(kept.values())
        library = next(c for c in rag.collections() if c["name"] == "library")
        assert library["index_vectors"] == library["chunks"] > 0
        for question, expected in QUESTIONS.items():
            hits = rag.search("library", question, top_k=3)
            if expected == "honeybees.md":
                assert all(h["document_id"] != ingested[expected]["id"] for h in hits)
            else:
                assert hits[0]["document_id"] == kept[expected], question


def test_graceful_restart_keeps_everything(second: tuple[Service, str], ingested: dict[str, dict[str, Any]]) -> None:
    check_library(second[1], ingested)


TOPICS = [
    "astronomy",
    "botany",
    "chemistry",
    "geology",
    "medicine",
    "music",
    "navigation",
    "oceans",
    "physics",
    "poetry",
    "railways",
    "textiles",
    "weather",
    "zoology",
]


def note(n: int) -> dict[str, str]:
    topic = TOPICS[n % len(TOPICS)]
    body = " ".join(f"Fact {i} of note {n}: {topic} record number {n * 100 + i}." for i in range(12))
    return {"title": f"note-{n}", "text": f"Archive note {n} about {topic}.\n\n{body}"}


def uploader(url: str, start: int, acked: dict[str, str], stop: threading.Event) -> None:
    with httpx.Client(base_url=url, headers={"X-Internal-Token": TOKEN}, timeout=60) as http:
        n = start
        while not stop.is_set():
            try:
                response = http.post("/collections/notes/documents", json=note(n))
            except httpx.HTTPError:
                return  # the service died under this request: it was never acknowledged
            if response.status_code == 201:
                acked[response.json()["id"]] = f"note-{n}"
            n += 2


def test_kill_9_during_ingest_keeps_every_acknowledged_document(
    second: tuple[Service, str], data_dir: Path, ingested: dict[str, dict[str, Any]]
) -> None:
    service, url = second
    httpx.post(f"{url}/collections", json={"name": "notes"}, headers={"X-Internal-Token": TOKEN}).raise_for_status()
    acked: dict[str, str] = {}
    stop = threading.Event()
    threads = [threading.Thread(target=uploader, args=(url, s, acked, stop), daemon=True) for s in (0, 1)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while len(acked) < 24 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(service.pid, signal.SIGKILL)  # both uploaders have a request in flight
    service.proc.wait(10)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert len(acked) >= 24

    with (
        rag_process(data_dir, **SETTINGS) as (_, url),
        httpx.Client(base_url=url, headers={"X-Internal-Token": TOKEN}, timeout=60) as http,
    ):
        stored = {d["id"]: d["title"] for d in http.get("/collections/notes/documents").json()["documents"]}
        assert acked.items() <= stored.items()  # every acknowledged document survived
        notes = http.get("/collections/notes").json()
        assert notes["index_type"] == "hnsw" and notes["index_vectors"] == notes["chunks"] > 60
        for doc_id, title in list(acked.items())[-3:]:
            n = int(title.split("-")[1])
            hits = http.post(
                "/collections/notes/search",
                json={
                    "query": f"Archive note {n} about {TOPICS[n % len(TOPICS)]}: record number {n * 100 + 7}",
                    "top_k": 5,
                },
            ).json()["results"]
            assert doc_id in {h["document_id"] for h in hits}
        check_library(url, ingested)
    assert not list((data_dir / "rag" / "indexes").glob(".*.tmp"))
