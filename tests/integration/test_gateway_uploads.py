"""Document uploads through the gateway to the real RAG service: streamed, never held whole.

The gateway passes an upload on as it arrives and enforces its size limit while streaming.
These tests use the real RAG service (real embedding model) so that what "refused" means is
checked where it matters: an upload cut off at the gateway's limit must not be half-ingested.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.figures import record_figures
from tests.support.stack import LoopbackAppliance, appliance_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LIMIT = 1 << 20  # the gateway's max_upload_bytes here; the RAG service's own limit stays at 64 MiB


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(
        tmp_path_factory.mktemp("uploads"),
        upstream="fake",
        rag="real",
        gateway_settings={"max_upload_bytes": str(LIMIT)},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def api(stack: LoopbackAppliance) -> Iterator[httpx.Client]:
    key = stack.create_key("uploader", ("collections",))
    with httpx.Client(base_url=stack.gateway, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        assert client.post("/v1/collections", json={"name": "manuals"}).status_code == 201
        yield client


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_multipart_upload_under_the_limit_is_streamed_through_and_searchable(api: httpx.Client) -> None:
    text = "The pump's pressure relief valve opens at 6 bar. " + "Routine maintenance notes. " * 20_000
    assert LIMIT // 2 < len(text) < LIMIT
    reply = api.post(
        "/v1/collections/manuals/documents",
        files={"file": ("pump.txt", text.encode(), "text/plain")},
        data={"title": "Pump"},
    )
    assert reply.status_code == 201, reply.text[:300]
    document = reply.json()
    assert document["chunks"] >= 1
    assert api.get(f"/v1/collections/manuals/documents/{document['id']}").status_code == 200
    hits = api.post("/v1/collections/manuals/search", json={"query": "relief valve pressure", "top_k": 3}).json()
    assert any(hit["document_id"] == document["id"] for hit in hits["results"])


def test_chunked_upload_over_the_limit_is_refused_and_nothing_is_ingested(
    stack: LoopbackAppliance, api: httpx.Client
) -> None:
    before = api.get("/v1/collections/manuals/documents").json()["documents"]
    pid = stack.services["gateway"].pid
    rss_before, peak = _rss_kib(pid), 0

    def body() -> Iterator[bytes]:  # a generator: httpx sends it chunked, with no Content-Length
        nonlocal peak
        yield b'{"title": "too big", "text": "'
        for _ in range(8 * LIMIT // (64 << 10)):
            peak = max(peak, _rss_kib(pid))
            yield b"lorem ipsum " * ((64 << 10) // 12)
        yield b'"}'

    try:
        status = api.post(
            "/v1/collections/manuals/documents", content=body(), headers={"Content-Type": "application/json"}
        ).status_code
    except (httpx.RemoteProtocolError, httpx.WriteError) as exc:
        status = 413 if "413" in str(exc) else -1
    after = api.get("/v1/collections/manuals/documents").json()["documents"]
    health = httpx.get(f"{stack.rag}/health", timeout=10)
    record_figures(
        "gateway_chunked_upload_over_limit",
        sent_mib=8,
        limit_mib=LIMIT >> 20,
        status=status,
        documents_before=len(before),
        documents_after=len(after),
        gateway_rss_peak_growth_mib=round((peak - rss_before) / 1024, 1),
    )
    assert status == 413
    assert [d["id"] for d in after] == [d["id"] for d in before], "a cut-off upload must not be ingested"
    assert health.status_code == 200 and json.loads(health.content)["status"] == "ok"
    assert (
        api.post("/v1/collections/manuals/documents", json={"title": "small", "text": "still works"}).status_code == 201
    )
