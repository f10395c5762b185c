"""The gateway's OpenAPI document, as built by its app factory (no server needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.core.wire import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.openapi import json_schema_to_spec
from gateway.routes.admin import NewKey

ERROR_REF = {"$ref": "#/components/schemas/Error"}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    tmp: Path = tmp_path_factory.mktemp("openapi")
    return create_app(GatewaySettings(internal_token="t" * 32, data_dir=tmp)).openapi_schema.to_schema()


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict) and "responses" in op
    ]


def _without_null_defaults(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_null_defaults(v) for k, v in schema.items() if not (k == "default" and v is None)}
    if isinstance(schema, list):
        return [_without_null_defaults(v) for v in schema]
    return schema


def test_every_error_answer_is_the_openai_error_body(document: dict[str, Any]) -> None:
    for method, path, op in _operations(document):
        errors = {status: r for status, r in op["responses"].items() if int(status) >= 400}
        assert {"431", "500"} <= set(errors), (method, path)
        if path != "/readyz":  # its 503 is the readiness report
            for status, response in errors.items():
                assert response["content"]["application/json"]["schema"] == ERROR_REF, (method, path, status)
    error = document["components"]["schemas"]["Error"]
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert error["required"] == ["error"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1/chat/completions", ChatCompletionRequest),
        ("/v1/completions", CompletionRequest),
        ("/v1/embeddings", EmbeddingRequest),
        ("/admin/keys", NewKey),
    ],
)
def test_request_bodies_are_the_models_the_handlers_validate_with(
    document: dict[str, Any], path: str, model: Any
) -> None:
    body = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
    expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in {**expected.pop("$defs", {}), model.__name__: expected}.items():
        assert document["components"]["schemas"][name] == _without_null_defaults(definition), name


def test_generation_routes_document_their_streams(document: dict[str, Any]) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        ok = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}
        data = ok["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
        assert {"const": "[DONE]"} in data
        assert {"type": "string", "contentMediaType": "application/json", "contentSchema": ERROR_REF} in data


def test_collections_are_routed_on_the_rag_services_paths_only(document: dict[str, Any]) -> None:
    routed = {(m, p) for m, p, _ in _operations(document) if p.startswith(("/v1/collections", "/v1/jobs"))}
    assert routed == {
        ("GET", "/v1/collections"),
        ("POST", "/v1/collections"),
        ("GET", "/v1/collections/{name}"),
        ("DELETE", "/v1/collections/{name}"),
        ("GET", "/v1/collections/{name}/documents"),
        ("POST", "/v1/collections/{name}/documents"),
        ("GET", "/v1/collections/{name}/documents/{document_id}"),
        ("DELETE", "/v1/collections/{name}/documents/{document_id}"),
        ("POST", "/v1/collections/{name}/search"),
        ("GET", "/v1/jobs/{job_id}"),
    }
    upload = document["paths"]["/v1/collections/{name}/documents"]["post"]
    assert set(upload["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"200", "201", "202", "413", "415"} <= set(upload["responses"])


def test_an_unknown_json_schema_keyword_fails_the_build() -> None:
    with pytest.raises(ValueError, match="dependentSchemas"):
        json_schema_to_spec({"type": "object", "dependentSchemas": {}})
