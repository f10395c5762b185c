"""A document upload whose JSON holds a lone surrogate (``"\\ud800"``) is a 4xx, through the gateway and at the
RAG service itself, never a 500; and the service still serves afterwards.

The JSON path of ``POST /v1/collections/{name}/documents`` (``{"title", "text", "metadata"}``) and the
multipart form's ``title`` and ``metadata`` fields are tried, on the real gateway and RAG service
(``rag_stack``: real Redis, real RAG with the real embedding model, fake balancer).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.stack import LoopbackAppliance

# Every case was a 500 before rag/uploads.py parsed uploads with strict_json and guarded a form field's text().
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

LONE = "\ud800"  # json.dumps sends it as the six characters \ud800, as a client would
COLLECTION = "surrogate-uploads"


def _body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()  # ASCII: lone surrogates travel as \uXXXX escapes


@pytest.fixture(scope="module")
def clients(rag_stack: LoopbackAppliance) -> Iterator[dict[str, httpx.Client]]:
    key = rag_stack.create_key("surrogate-uploads", ("collections",))
    made = {
        "gateway": httpx.Client(
            base_url=f"{rag_stack.gateway}/v1", timeout=120, headers={"Authorization": f"Bearer {key}"}
        ),
        "rag": httpx.Client(base_url=rag_stack.rag, timeout=120, headers=rag_stack.internal_headers()),
    }
    created = made["gateway"].post("/collections", json={"name": COLLECTION})
    assert created.status_code in (200, 201), created.text
    yield made
    for client in made.values():
        client.close()


JSON_BODIES = {
    "text": {"title": "t", "text": f"a{LONE}b"},
    "title": {"title": f"x{LONE}", "text": "fine text"},
    "metadata-value": {"title": "t", "text": "fine text", "metadata": {"k": LONE}},
    "metadata-key": {"title": "t", "text": "fine text", "metadata": {LONE: "v"}},
    "metadata-as-string": {"title": "t", "text": "fine text", "metadata": json.dumps({"k": LONE})},
}


def _is_openai_error(response: httpx.Response) -> bool:
    error = response.json().get("error")
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


@pytest.mark.parametrize("service", ["gateway", "rag"])
def test_a_json_upload_with_a_lone_surrogate_is_a_4xx(clients: dict[str, httpx.Client], service: str) -> None:
    wrong = []
    for where, payload in JSON_BODIES.items():
        response = clients[service].post(
            f"/collections/{COLLECTION}/documents", content=_body(payload), headers={"Content-Type": "application/json"}
        )
        if not 400 <= response.status_code < 500 or not _is_openai_error(response):
            wrong.append((where, response.status_code, response.text[:80]))
    assert not wrong, wrong
    fine = clients[service].post(
        f"/collections/{COLLECTION}/documents", json={"title": f"fine {service}", "text": f"fine text {service}"}
    )
    assert fine.status_code in (200, 201), fine.text


@pytest.mark.parametrize("field", ["title", "metadata"])
def test_a_form_upload_with_a_lone_surrogate_is_a_4xx(clients: dict[str, httpx.Client], field: str) -> None:
    value = json.dumps({"k": LONE}) if field == "metadata" else f"x{LONE}".encode("utf-8", "surrogatepass")
    response = clients["gateway"].post(
        f"/collections/{COLLECTION}/documents",
        files={"file": ("doc.txt", b"some plain text", "text/plain")},
        data={field: value},
    )
    assert 400 <= response.status_code < 500 and _is_openai_error(response), (response.status_code, response.text)
