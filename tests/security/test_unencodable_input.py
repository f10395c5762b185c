"""Text that cannot be encoded (a JSON ``"\\ud800"``: a lone UTF-16 surrogate) is a 400 at every service.

``json.loads`` accepts such a string and the first ``.encode()`` of it (tokenizer, SQLite, a log
line, an SSE event) raises: before issue 16.8 the worker and the RAG service answered 500. Each
service is probed directly on the shared real stack (gateway, balancer, worker, RAG), then asked
whether it still serves. Hypothesis draws bodies whose text may hold any code point.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.stack import LoopbackAppliance

pytestmark = pytest.mark.integration

LONE = "\ud800"  # json.dumps sends it as the six characters \ud800, as a client would


def _body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()  # ASCII: lone surrogates travel as \uXXXX escapes


def _chat(model: str, content: str) -> bytes:
    return _body({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": content}]})


@pytest.fixture(scope="module")
def clients(security_stack: LoopbackAppliance) -> Iterator[dict[str, httpx.Client]]:
    key = security_stack.create_key("surrogates", ("chat", "embeddings", "collections"))
    internal = {**security_stack.internal_headers(), "Content-Type": "application/json"}
    made = {
        "gateway": httpx.Client(
            base_url=security_stack.gateway,
            timeout=60,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        ),
        "admin": httpx.Client(
            base_url=security_stack.gateway,
            timeout=60,
            headers={"Authorization": f"Bearer {security_stack.admin_key}", "Content-Type": "application/json"},
        ),
        "balancer": httpx.Client(base_url=security_stack.balancer, timeout=60, headers=internal),
        "worker": httpx.Client(base_url=security_stack.workers[0], timeout=60, headers=internal),
        "rag": httpx.Client(base_url=security_stack.rag, timeout=60, headers=internal),
    }
    yield made
    for client in made.values():
        client.close()


def _cases(model: str, embedder: str, text: str) -> list[tuple[str, str, bytes]]:
    """Requests whose only fault, with ``text = LONE``, is that text (with ``"ok"`` they are not 400s)."""
    chat_stop = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}], "stop": [text]}
    return [
        ("gateway", "/v1/chat/completions", _chat(model, text)),
        ("gateway", "/v1/completions", _body({"model": model, "prompt": f"a{text}b", "max_tokens": 2})),
        ("gateway", "/v1/embeddings", _body({"model": embedder, "input": ["ok", text]})),
        ("admin", "/admin/keys", _body({"name": f"k{text}", "scopes": ["chat"]})),
        ("balancer", "/v1/chat/completions", _chat(model, text)),
        ("balancer", "/v1/completions", _body({"model": model, "prompt": text, "max_tokens": 2})),
        ("worker", "/v1/chat/completions", _chat(model, text)),
        ("worker", "/v1/chat/completions", _body(chat_stop)),
        ("worker", "/v1/completions", _body({"model": model, "prompt": text, "max_tokens": 2, "stream": True})),
        ("rag", "/v1/embeddings", _body({"model": embedder, "input": text})),
        ("rag", "/collections", _body({"name": f"c-{text}"})),
        ("rag", "/collections/docs/search", _body({"query": text, "top_k": 2})),
    ]


def _is_openai_error(response: httpx.Response) -> bool:
    error = response.json().get("error")
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


def test_a_lone_surrogate_is_a_400_at_every_service(
    security_stack: LoopbackAppliance, clients: dict[str, httpx.Client]
) -> None:
    embedder = clients["rag"].get("/v1/models").json()["data"][0]["id"]
    wrong = []
    for text in (LONE, "ok"):
        for service, path, body in _cases(security_stack.model, embedder, text):
            response = clients[service].post(path, content=body)
            bad = (
                response.status_code != 400 or not _is_openai_error(response)
                if text == LONE
                else response.status_code == 400 or response.status_code >= 500
            )
            if bad:
                wrong.append((repr(text), service, path, response.status_code, response.text[:200]))
    assert not wrong, wrong


# Any code point, lone surrogates included (st.text() leaves them out).
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=ANY_TEXT, service=st.sampled_from(["gateway", "balancer", "worker", "rag"]))
@example(content="\ud800", service="worker")
@example(content="a\udfffb", service="rag")
def test_any_text_is_never_a_5xx(
    security_stack: LoopbackAppliance, clients: dict[str, httpx.Client], content: str, service: str
) -> None:
    if service == "rag":
        embedder = clients["rag"].get("/v1/models").json()["data"][0]["id"]
        path, payload = "/v1/embeddings", {"model": embedder, "input": content}
    else:
        path = "/v1/chat/completions"
        payload: dict[str, Any] = {
            "model": security_stack.model,
            "max_tokens": 1,  # type: ignore[no-redef]
            "messages": [{"role": "user", "content": content}],
        }
    response = clients[service].post(path, content=_body(payload))
    try:
        json.loads(json.dumps(content)).encode()  # what the service decodes (a split pair reads as one)
    except UnicodeEncodeError:
        assert response.status_code == 400, (service, response.status_code, response.text)
    else:
        assert response.status_code == 200, (service, response.status_code, response.text)
