"""``kill -9`` the RAG service at 20 random moments while documents are being ingested.

After every kill the service must start again from its data directory, and every
document it acknowledged (2xx) must be listed and found by search (the FAISS index is
reconciled with the document store). A restart takes a few seconds because the
embedding model runs on ONNX Runtime from the export cached in the data directory
(no torch import); only the first start exports it.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.figures import record_figures
from tests.support.stack import LoopbackAppliance, appliance_stack

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

KILLS = 20
TOP_K = 1000  # above any number of documents this test can ingest, so search must return every one
COLLECTION = "crashy"


@pytest.fixture
def rag_only(tmp_path: Path) -> Iterator[LoopbackAppliance]:
    with appliance_stack(
        tmp_path, upstream="none", workers=0, rag="real", rag_settings={"max_top_k": str(TOP_K)}
    ) as stack:
        yield stack


class Ingest(threading.Thread):
    """Posts documents back to back (paced at ≤ 10/s so 20 rounds stay far under TOP_K on a fast machine);
    remembers each one acknowledged with a 2xx."""

    def __init__(self, stack: LoopbackAppliance, start_at: int) -> None:
        super().__init__(daemon=True)
        self.stack, self.next, self.acked, self.halt = stack, start_at, dict[str, str](), threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.stack.rag, headers=self.stack.internal_headers(), timeout=10) as client:
            while not self.halt.is_set():
                word = f"canary{self.next:05d}"
                self.next += 1
                text = f"Document {word}. " + " ".join(f"{word} line {i} of the ingest test." for i in range(3))
                try:
                    response = client.post(f"/collections/{COLLECTION}/documents", json={"title": word, "text": text})
                except httpx.HTTPError:
                    continue
                if response.is_success:
                    self.acked[response.json()["id"]] = word
                self.halt.wait(0.1)


def test_kill_9_during_ingest_loses_no_acknowledged_document(rag_only: LoopbackAppliance) -> None:
    stack, rng, began = rag_only, random.Random(20), time.monotonic()
    headers = stack.internal_headers()
    assert httpx.post(f"{stack.rag}/collections", json={"name": COLLECTION}, headers=headers).status_code in (200, 201)
    acked: dict[str, str] = {}
    restarts = []
    for _ in range(KILLS):
        ingest = Ingest(stack, len(acked) * 10 + 1000 * len(restarts))
        ingest.start()
        deadline = time.monotonic() + 60  # the first documents after a start wait for the model's warm-up
        while len(ingest.acked) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # then a random moment in the middle of the stream of writes
        stack.services["rag"].signal(signal.SIGKILL)
        ingest.halt.set()
        ingest.join(15)
        acked.update(ingest.acked)
        started = time.monotonic()
        stack.restart("rag")
        restarts.append(round(time.monotonic() - started, 1))
    with httpx.Client(base_url=stack.rag, headers=headers, timeout=30) as client:
        listed = {d["id"] for d in client.get(f"/collections/{COLLECTION}/documents").json()["documents"]}
        # The documents differ only by a number, which embeddings barely see: search with a top_k above
        # the collection's size, so the check is "is it in the index", not "does it rank first".
        results = client.post(
            f"/collections/{COLLECTION}/search", json={"query": "ingest test document", "top_k": TOP_K}
        ).json()["results"]
    in_index = {r["document_id"] for r in results}
    not_found = sorted(word for doc_id, word in acked.items() if doc_id not in in_index)
    missing = sorted(set(acked) - listed)
    record_figures(
        "chaos_rag_kill9_ingest",
        kills=KILLS,
        acknowledged_documents=len(acked),
        acknowledged_lost=len(missing),
        not_in_index=len(not_found),
        restart_s=restarts,
        restart_max_s=max(restarts),
        kill_loop_s=round(time.monotonic() - began, 1),
    )
    assert len(acked) >= 3 * KILLS, "too few documents were acknowledged between kills to test anything"
    assert len(results) < TOP_K, "top_k no longer covers the whole collection: lower the ingest rate"
    assert not missing, missing[:10]
    assert not not_found, not_found
