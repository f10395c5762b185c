"""Schemathesis against the gateway's own OpenAPI document, with a real admin key.

The gateway process runs for real (real Redis); behind it the instant fake upstream
answers as balancer and RAG, so thousands of cases finish in a minute or two. The
document is the one the gateway serves at ``/schema/openapi.json``, unmodified: request
bodies are the wire models the handlers validate with, every error is the OpenAI error
shape, streaming 200s are ``text/event-stream``.

Checks on every response: no response >= 500, and the response conforms to the document
(status code documented for the operation, content type documented, body matches the
schema). Then a stateful run follows the document's links (create a key, read it, revoke
it; create a collection, read it, upload to it, search it).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
    use_after_free,
)

from tests.support.figures import record_figures
from tests.support.stack import FAKE_MODEL, LoopbackAppliance, appliance_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

MAX_EXAMPLES = 60  # per operation with parameters; operations with nothing to vary run once
BODY_EXAMPLES = {"POST /v1/chat/completions": 700, "POST /v1/completions": 400, "POST /v1/embeddings": 250,
                 "POST /admin/keys": 250}
GATEWAY_OWN_500 = '"code":"internal_error"'  # the gateway's own unhandled-error body (not an upstream's 5xx)
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]
CASES: dict[str, int] = {"total": 0, "5xx": 0}


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("fuzz"), upstream="fake") as stack:
        yield stack


@pytest.fixture(scope="module")
def fuzz_document(fuzz_stack: LoopbackAppliance) -> dict[str, Any]:
    """The document exactly as the gateway serves it."""
    with urllib.request.urlopen(f"{fuzz_stack.gateway}/schema/openapi.json", timeout=10) as response:
        document: dict[str, Any] = json.loads(response.read())
    assert len(document["paths"]) >= 10, "the gateway published too few operations"
    return document


@pytest.fixture(scope="module")
def fuzz_results(fuzz_stack: LoopbackAppliance, fuzz_document: dict[str, Any]) -> dict[str, list[str]]:
    """Run every operation's cases once; collect server errors and schema violations separately."""
    schema = schemathesis.openapi.from_dict(fuzz_document)
    headers = {"Authorization": f"Bearer {fuzz_stack.admin_key}"}
    results: dict[str, list[str]] = {"server_errors": [], "upstream_5xx": [], "schema_violations": [],
                                     "operations": []}

    for result in schema.get_all_operations():
        operation = result.ok()
        results["operations"].append(operation.label)

        @given(case=operation.as_strategy())
        @settings(max_examples=BODY_EXAMPLES.get(operation.label, MAX_EXAMPLES), deadline=None, database=None,
                  derandomize=True, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzz_stack.gateway, headers=headers, timeout=15)
            CASES["total"] += 1
            if response.status_code >= 500:
                CASES["5xx"] += 1
                curl = case.as_curl_command()
                # The fake upstream is not under test: its own 5xx, passed through, is reported apart.
                kind = "server_errors" if GATEWAY_OWN_500 in response.text.replace(" ", "") else "upstream_5xx"
                results[kind].append(f"{operation.label} -> {response.status_code}: {curl}")
            try:
                case.validate_response(response, checks=CONFORMANCE)
            except (Exception, BaseExceptionGroup) as exc:  # recorded; asserted by its own test
                results["schema_violations"].append(f"{operation.label} [{response.status_code}]: {str(exc)[:600]}")

        run()
    record_figures("fuzz_gateway_openapi", operations=len(results["operations"]), cases_tried=CASES["total"],
                   responses_5xx=CASES["5xx"], schema_violations=len(results["schema_violations"]),
                   max_examples=BODY_EXAMPLES | {"other operations": MAX_EXAMPLES},
                   server_errors=[e[:300] for e in results["server_errors"][:5]],
                   fake_upstream_5xx=[e[:300] for e in results["upstream_5xx"][:5]],
                   violations=sorted({v.split("]")[0] + "]" for v in results["schema_violations"]}))
    return results


def test_gateway_openapi_fuzz_no_server_error(fuzz_results: dict[str, list[str]]) -> None:
    assert CASES["total"] >= 2000, CASES
    assert not fuzz_results["server_errors"], "\n".join(fuzz_results["server_errors"][:20])
    assert not fuzz_results["upstream_5xx"], "\n".join(fuzz_results["upstream_5xx"][:20])


def test_gateway_openapi_responses_match_the_document(fuzz_results: dict[str, list[str]]) -> None:
    assert not fuzz_results["schema_violations"], "\n".join(sorted(set(fuzz_results["schema_violations"]))[:20])


STATEFUL_SCENARIOS = 120  # each up to 8 linked calls


def test_gateway_stateful_workflows_follow_the_links(
    fuzz_stack: LoopbackAppliance, fuzz_document: dict[str, Any]
) -> None:
    """Sequences along the document's links (create a key → read → revoke; create a collection → upload →
    read the document → search → delete): every step conforms to the document, none is a 5xx, and a
    deleted collection or document is gone afterwards (``use_after_free``)."""
    # The Batch API's operations have no links to follow (a batch needs a JSONL file uploaded first, which the
    # generator cannot write); the per-operation run covers them, here they would only crowd out the workflows.
    schema = schemathesis.openapi.from_dict(fuzz_document).exclude(path_regex="^/v1/(files|batches)")
    # Valid bodies only: the proxied routes pass bodies through untouched, so invalid ones would test the
    # fake upstream's validation, not the gateway (the per-operation run above covers the gateway's own).
    schema.config.generation.update(modes=[GenerationMode.POSITIVE])
    call = {"base_url": fuzz_stack.gateway, "headers": {"Authorization": f"Bearer {fuzz_stack.admin_key}"},
            "timeout": 15}
    steps: list[str] = []
    failures: list[str] = []

    class GatewayWorkflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return call

        def validate_response(self, response: Any, case: schemathesis.Case, additional_checks: Any = None,
                              **kwargs: Any) -> None:
            steps.append(f"{case.operation.label} [{response.status_code}]")
            if response.status_code >= 500:
                failures.append(f"{steps[-1]}: {response.text[:200]}")
            # DELETE /admin/keys/{id} revokes: the key stays readable, marked revoked (an audit trail), so
            # "deleted means 404" holds for collections and documents only.
            checks = [*CONFORMANCE, *([use_after_free] if case.path.startswith("/v1/") else [])]
            try:
                case.validate_response(response, checks=checks, transport_kwargs=kwargs or None,
                                       recorder=self.recorder)
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{steps[-1]}: {str(exc)[:400]}")

    GatewayWorkflow.run(settings=settings(max_examples=STATEFUL_SCENARIOS, stateful_step_count=8, deadline=None,
                                          database=None, derandomize=True, suppress_health_check=list(HealthCheck)))
    linked = [s for s in steps if "{" in s.split()[1]]  # steps on operations reached through a link
    record_figures("fuzz_gateway_stateful", scenarios=STATEFUL_SCENARIOS, steps=len(steps),
                   steps_on_linked_operations=len(linked), distinct_steps=len(set(steps)), failures=len(failures))
    assert len(steps) >= STATEFUL_SCENARIOS
    assert any(s.startswith("GET /admin/keys/{key_id} [200]") for s in steps), sorted(set(steps))
    assert not failures, "\n".join(sorted(set(failures))[:20])


# -- hand cases: each hostile input gets a 4xx, never a 5xx, a hang or a crash -----------------------------

def _chat(messages: Any, **extra: Any) -> dict[str, Any]:
    return {"model": FAKE_MODEL, "messages": messages, **extra}


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


HAND_CASES: dict[str, bytes] = {
    "11 MB body": json.dumps(_chat([{"role": "user", "content": "a" * (11 << 20)}])).encode(),
    "10,000 messages": json.dumps(_chat([{"role": "user", "content": "hi"}] * 10_000)).encode(),
    "deeply nested content": json.dumps(_chat([{"role": "user", "content": "x"}]))
    .replace('"content": "x"', '"content": ' + "[" * 50_000 + "]" * 50_000).encode(),
    "nested lists in content": json.dumps(_chat([{"role": "user", "content": _nested(200)}])).encode(),
    "max_tokens 1e9": json.dumps(_chat([{"role": "user", "content": "hi"}], max_tokens=1_000_000_000)).encode(),
    "invalid UTF-8": b'{"model": "fake-model", "messages": [{"role": "user", "content": "\xff\xfe\xc0"}]}',
    "not JSON": b"\x00\x01{{{",
    "JSON array, not object": b"[1, 2, 3]",
}


@pytest.mark.parametrize("name", list(HAND_CASES))
def test_hostile_body_gets_4xx(fuzz_stack: LoopbackAppliance, name: str) -> None:
    headers = {"Authorization": f"Bearer {fuzz_stack.admin_key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=fuzz_stack.gateway, timeout=30) as client:
        response = client.post("/v1/chat/completions", content=HAND_CASES[name], headers=headers)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        assert set(response.json()) == {"error"}
        assert client.get("/healthz").status_code == 200


def test_100kb_of_headers_gets_4xx(fuzz_stack: LoopbackAppliance) -> None:
    headers = {"Authorization": f"Bearer {fuzz_stack.admin_key}",
               **{f"X-Junk-{i}": "v" * 1000 for i in range(100)}}
    with httpx.Client(base_url=fuzz_stack.gateway, timeout=30) as client:
        response = client.post("/v1/chat/completions", json=_chat([{"role": "user", "content": "hi"}]),
                               headers=headers)
        assert response.status_code == 431, response.status_code
        assert response.json()["error"]["code"] == "headers_too_large"
        assert client.get("/healthz").status_code == 200


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_oversize_bodies_are_refused_before_buffering(fuzz_stack: LoopbackAppliance) -> None:
    """Ten 11 MB chat bodies and three 80 MB uploads: all 413, and the gateway's memory stays flat."""
    pid = fuzz_stack.services["gateway"].pid
    key = fuzz_stack.admin_key
    before = _rss_kib(pid)

    def chunks(total: int) -> Iterator[bytes]:
        block = b"a" * (1 << 20)
        for _ in range(total >> 20):
            yield block

    statuses = []
    with httpx.Client(base_url=fuzz_stack.gateway, timeout=60) as client:
        for _ in range(10):
            statuses.append(_post_quietly(client, "/v1/chat/completions", 11 << 20, chunks(11 << 20), key))
        for _ in range(3):
            statuses.append(_post_quietly(client, "/v1/collections/docs/documents", 80 << 20, chunks(80 << 20), key))
    growth_mib = (_rss_kib(pid) - before) / 1024
    record_figures("fuzz_oversize_bodies", statuses=sorted(set(statuses)), gateway_rss_growth_mib=round(growth_mib, 1))
    assert set(statuses) == {413}, statuses
    assert growth_mib < 32, f"gateway grew {growth_mib:.0f} MiB while refusing oversize bodies"


def test_oversize_chunked_upload_is_refused_without_buffering_it(fuzz_stack: LoopbackAppliance) -> None:
    """Three 80 MB uploads with no Content-Length (chunked): the limit cannot be checked up front, so the
    gateway must refuse while streaming, not after holding the upload in memory."""
    pid = fuzz_stack.services["gateway"].pid
    before = _rss_kib(pid)
    statuses, peak = [], before

    def chunks(total: int) -> Iterator[bytes]:
        nonlocal peak
        block = b"a" * (1 << 20)
        for _ in range(total >> 20):
            peak = max(peak, _rss_kib(pid))
            yield block

    headers = {"Authorization": f"Bearer {fuzz_stack.admin_key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=fuzz_stack.gateway, timeout=60) as client:
        # The collection exists, so the upstream reads the upload instead of answering 404 at once.
        assert client.post("/v1/collections", json={"name": "chunked"}, headers=headers).status_code < 300
        for _ in range(3):
            try:
                statuses.append(client.post("/v1/collections/chunked/documents", content=chunks(80 << 20),
                                            headers=headers).status_code)
            except (httpx.RemoteProtocolError, httpx.WriteError) as exc:
                statuses.append(413 if "413" in str(exc) else -1)
    growth_mib = (peak - before) / 1024
    record_figures("fuzz_oversize_chunked_upload", statuses=statuses, gateway_rss_peak_growth_mib=round(growth_mib, 1))
    assert set(statuses) == {413}, statuses
    assert growth_mib < 32, f"gateway grew {growth_mib:.0f} MiB while refusing chunked oversize uploads"


@pytest.mark.parametrize("case", ["authorization", "request id", "path", "query"])
def test_invalid_utf8_outside_the_body_is_not_a_server_error(fuzz_stack: LoopbackAppliance, case: str) -> None:
    """Raw bytes that are not UTF-8 in headers, path and query: a 4xx (or a normal answer), never a 5xx."""
    import http.client

    key = f"Bearer {fuzz_stack.admin_key}".encode()
    method, target, headers = {
        "authorization": ("GET", "/v1/models", {b"Authorization": b"Bearer sk-app-\xff\xfe\xc0"}),
        "request id": ("GET", "/v1/models", {b"Authorization": key, b"X-Request-Id": b"\xff\xfe\xc0zzz"}),
        "path": ("GET", "/v1/collections/%FF%FE/documents", {b"Authorization": key}),
        "query": ("GET", "/admin/usage?day=%FF%FE&key_id=%C0", {b"Authorization": key}),
    }[case]
    host, port = fuzz_stack.gateway.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        status, body, request_id = response.status, response.read(), response.getheader("x-request-id") or ""
    finally:
        connection.close()
    assert status < 500, (case, status, body[:300])
    if status >= 400:
        assert set(json.loads(body)) == {"error"}, body[:300]
    # "zzz" cannot occur in the gateway's own hex ids (an "abc" marker once matched a random uuid)
    assert "\ufffd" not in request_id and "zzz" not in request_id, "a malformed request id must not be echoed"
    with httpx.Client(base_url=fuzz_stack.gateway, timeout=10) as client:
        assert client.get("/healthz").status_code == 200


def _post_quietly(client: httpx.Client, path: str, length: int, body: Iterator[bytes], key: str) -> int:
    """POST with a declared Content-Length; a server that refuses early may close before reading it all."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "Content-Length": str(length)}
    try:
        return client.post(path, content=body, headers=headers).status_code
    except (httpx.RemoteProtocolError, httpx.WriteError) as exc:
        return 413 if "413" in str(exc) else -1


@pytest.mark.parametrize("raw_path", ["/v1/collections/../../workers", "/v1/collections/%2e%2e/%2e%2e/workers",
                                      "/v1/collections/docs/..%2f..%2fworkers", "/v1/collections/a\\..\\b"])
def test_collections_path_traversal_is_refused(fuzz_stack: LoopbackAppliance, raw_path: str) -> None:
    """Raw (un-normalised) paths: the proxy must not forward a path that leaves ``/collections``."""
    import http.client

    host, port = fuzz_stack.gateway.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", raw_path, headers={"Authorization": f"Bearer {fuzz_stack.admin_key}"})
        response = connection.getresponse()
        status, body = response.status, response.read()
    finally:
        connection.close()
    assert status in (400, 404), (raw_path, status, body[:200])
    assert b"workers" not in body or b"error" in body
