"""What the gateway's OpenAPI document (``/schema``) says: the bodies handlers parse, what they answer.

The handlers read raw bodies and validate them with the shared wire models themselves, so that a bad
body is an OpenAI-shaped 400 carrying the model's own message, and only once the key is known to be
good. Litestar therefore sees no ``data`` parameter and cannot describe a body. Each handler states
in its ``opt`` (built by :func:`documented`) the model it parses, its success answers, whether its
200 may be server-sent events, and the error statuses it can answer; :func:`complete_openapi` writes
that into the document once Litestar has built it, from the models' own JSON Schemas. Every error
answer is documented as :class:`Error`, ``{"error": {"message", "type", "param", "code"}}``, which is
what the gateway sends (Litestar's default ``{status_code, detail}`` never goes out).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from litestar.openapi.spec import Link, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Reference, RequestBody, Schema
from litestar.routes import HTTPRoute
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.openapi.spec import OpenAPI, Operation

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "EmbeddingList",
    "Error",
    "ModelList",
    "TextCompletion",
    "complete_openapi",
    "documented",
    "json_schema_to_spec",
    "link",
]

_OPT = "openapi"
JSON = "application/json"
SSE = "text/event-stream"

_WHY = {
    200: "OK.",
    201: "Created.",
    202: "Accepted: a large upload is ingested in the background; poll the job at Location.",
    400: "The request is malformed or fails validation.",
    401: "Missing, malformed, unknown, revoked or expired API key.",
    403: "The key lacks the scope for this route, or may not use this model.",
    404: "No such model, key, collection, document or job (or one this key may not see).",
    409: "The collection already exists (or was built with another embedding model).",
    413: "The request body is over the limit; refused before it is read in full.",
    415: "The upload is neither multipart/form-data nor JSON, or its file type is not supported.",
    429: "A rate limit of this key was reached; see Retry-After and the X-RateLimit-* headers.",
    431: "The request headers exceed 32 KiB.",
    500: "An unexpected error in the gateway or a worker.",
    502: "An upstream service answered something that is not a valid response.",
    503: "A dependency (balancer, workers, RAG service or the key store) is unavailable; see Retry-After.",
    504: "The worker did not answer in time.",
}
# Every operation can answer these: the access middleware checks headers before routing; a bug is a 500.
EVERY_ROUTE = (431, 500)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    """The one error body of every service (OpenAI-compatible)."""

    error: ErrorDetail


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextCompletion(_Open):
    id: str
    object: str
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, int] | None = None


class ChatCompletion(TextCompletion):
    citations: list[dict[str, Any]] | None = None  # with "rag": the retrieved passages the answer may cite


class ChatCompletionChunk(ChatCompletion):
    """One streamed event; the last content chunk of a RAG answer carries the citations."""


class EmbeddingList(_Open):
    object: str
    data: list[dict[str, Any]]
    model: str
    usage: dict[str, int]


class ModelList(_Open):
    object: str
    data: list[dict[str, Any]]


class ModelObject(_Open):
    id: str
    object: str
    created: int
    owned_by: str
    context_length: int | None = None  # appliance: tokens per request (prompt and answer), the worker's limit
    max_tokens: int | None = None  # appliance: the longest answer a request may ask for
    max_choices: int | None = None  # appliance: the most choices (n) a request may ask (the workers' slots)
    max_prompts: int | None = None  # appliance: the most prompts a /v1/completions request may hold
    # appliance, several models (the balancer's view, docs/CONTRACTS.md "Model catalogue"):
    state: str | None = None  # loaded | loading | unloaded | draining
    resident: str | None = None  # always (loaded all the time) | on_demand (on a swap host when asked for)
    pinned: bool | None = None  # an on_demand model never chosen for unload
    memory_bytes: int | None = None  # what one worker of it needs: GGUF + slots x n_ctx of KV cache


Body = type[BaseModel] | Mapping[str, type[BaseModel]]


@dataclass(frozen=True, slots=True)
class _Doc:
    body: Body | None
    answers: Mapping[int, type[BaseModel] | None]
    errors: tuple[int, ...]
    streams: type[BaseModel] | None
    links: Mapping[int, Mapping[str, Link]]


def documented(
    *,
    errors: tuple[int, ...],
    body: Body | None = None,
    answers: Mapping[int, type[BaseModel] | None] | None = None,
    streams: type[BaseModel] | None = None,
    links: Mapping[int, Mapping[str, Link]] | None = None,
) -> dict[str, Any]:
    """A handler's ``opt``: the model it parses (or {media type: model}), its answers other than errors
    (``None``: some JSON object), the chunk model when ``"stream": true`` makes the 200 server-sent
    events, the error statuses it can answer (each with the :class:`Error` body), and per success
    status the operations its answer leads to (:func:`link`)."""
    unknown = (set(errors) | set(answers or {})) - set(_WHY)
    if unknown:
        raise ValueError(f"no description for statuses {sorted(unknown)}")
    return {_OPT: _Doc(body, dict(answers or {}), errors, streams, dict(links or {}))}


def link(method: str, path: str, **parameters: str) -> Link:
    """An OpenAPI link to ``method path``, its parameters given as runtime expressions
    (``$response.body#/id``, ``$request.body#/name``, ``$request.path.name``)."""
    pointer = path.replace("~", "~0").replace("/", "~1")
    return Link(operation_ref=f"#/paths/{pointer}/{method.lower()}", parameters=dict(parameters))


def complete_openapi(app: Litestar) -> None:
    """Write every handler's :func:`documented` answers into the document Litestar built; every
    error response, Litestar's own included, becomes :class:`Error`."""
    document = app.openapi_schema
    schemas: dict[str, Schema] = document.components.schemas
    error = _component(Error, schemas)
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for method, (handler, _) in route.route_handler_map.items():
            if not handler.resolve_include_in_schema():
                continue
            operation = _operation(document, route.path_format or "/", method)
            doc = handler.opt.get(_OPT, _Doc(None, {}, (), streams=None, links={}))
            responses = dict(operation.responses or {})
            _describe(operation, doc, responses, schemas, error)
            litestar_errors = [int(s) for s in responses if int(s) >= 400 and int(s) not in doc.answers]
            for status in (*doc.errors, *EVERY_ROUTE, *litestar_errors):
                responses[str(status)] = OpenAPIResponse(
                    description=_WHY.get(status, "Error."), content={JSON: OpenAPIMediaType(schema=error)}
                )
            operation.responses = dict(sorted(responses.items()))
    document.components.schemas = dict(sorted(schemas.items()))


def _describe(
    operation: Operation, doc: _Doc, responses: dict[str, Any], schemas: dict[str, Schema], error: Reference
) -> None:
    if doc.body is not None:
        models = doc.body if isinstance(doc.body, Mapping) else {JSON: doc.body}
        operation.request_body = RequestBody(
            required=True,
            content={media: OpenAPIMediaType(schema=_component(model, schemas)) for media, model in models.items()},
        )
    if doc.answers:
        for success in [s for s in responses if int(s) < 400]:
            del responses[success]
    for status, model in doc.answers.items():
        schema = _component(model, schemas) if model else Schema(type=OpenAPIType.OBJECT)
        responses[str(status)] = OpenAPIResponse(
            description=_WHY[status], content={JSON: OpenAPIMediaType(schema=schema)}
        )
    for status, links in doc.links.items():
        responses[str(status)].links = dict(links)
    if doc.streams is not None:
        responses["200"].content[SSE] = OpenAPIMediaType(schema=_event(_component(doc.streams, schemas), error))


def _event(chunk: Reference, error: Reference) -> Schema:
    """One server-sent event of a stream: a chunk, an error (the stream then ends without [DONE]), or [DONE]."""
    return Schema(
        type=OpenAPIType.OBJECT,
        required=["data"],
        description='Server-sent events when "stream" is true: one "data: {chunk}" event per chunk, then '
        '"data: [DONE]"; a failure mid-stream ends with an error event and no [DONE].',
        properties={
            "event": Schema(type=OpenAPIType.STRING),
            "data": Schema(
                any_of=[
                    Schema(const="[DONE]"),
                    Schema(type=OpenAPIType.STRING, content_media_type=JSON, content_schema=chunk),
                    Schema(type=OpenAPIType.STRING, content_media_type=JSON, content_schema=error),
                ]
            ),
        },
    )


def _operation(document: OpenAPI, path: str, method: str) -> Operation:
    item = document.paths[path] if document.paths else None
    operation = getattr(item, method.lower(), None)
    if operation is None:
        raise LookupError(f"{method} {path} is missing from the OpenAPI document")
    return operation  # type: ignore[no-any-return]


def _component(model: type[BaseModel], schemas: dict[str, Schema]) -> Reference:
    """Register ``model`` (and the models it uses) as components, from pydantic's own JSON Schema."""
    raw = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in {**raw.pop("$defs", {}), model.__name__: raw}.items():
        spec = json_schema_to_spec(definition)
        if not isinstance(spec, Schema):
            raise TypeError(f"component {name} is a bare reference")
        if name in schemas and schemas[name].to_schema() != spec.to_schema():
            raise ValueError(f"two different schemas are both named {name!r}")
        schemas[name] = spec
    return Reference(ref=f"#/components/schemas/{model.__name__}")


_SUBSCHEMA = {"items": "items", "not": "schema_not", "contains": "contains"}
_SUBSCHEMA_LISTS = {"anyOf": "any_of", "oneOf": "one_of", "allOf": "all_of", "prefixItems": "prefix_items"}
_PLAIN = {
    "title": "title",
    "description": "description",
    "default": "default",
    "enum": "enum",
    "const": "const",
    "minimum": "minimum",
    "maximum": "maximum",
    "exclusiveMinimum": "exclusive_minimum",
    "exclusiveMaximum": "exclusive_maximum",
    "minLength": "min_length",
    "maxLength": "max_length",
    "pattern": "pattern",
    "minItems": "min_items",
    "maxItems": "max_items",
    "uniqueItems": "unique_items",
    "required": "required",
    "format": "format",
    "examples": "examples",
    "multipleOf": "multiple_of",
    "minProperties": "min_properties",
    "maxProperties": "max_properties",
}


def json_schema_to_spec(schema: Mapping[str, Any]) -> Schema | Reference:
    """A JSON Schema (as pydantic writes it) as Litestar's spec objects; an unknown keyword is an error,
    so that a model using a new feature fails the build instead of being documented wrongly."""
    if "$ref" in schema:
        return Reference(ref=schema["$ref"])
    fields: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type":
            fields["type"] = [OpenAPIType(v) for v in value] if isinstance(value, list) else OpenAPIType(value)
        elif key == "properties":
            fields["properties"] = {name: json_schema_to_spec(sub) for name, sub in value.items()}
        elif key == "additionalProperties":
            fields["additional_properties"] = value if isinstance(value, bool) else json_schema_to_spec(value)
        elif key in _SUBSCHEMA:
            fields[_SUBSCHEMA[key]] = json_schema_to_spec(value)
        elif key in _SUBSCHEMA_LISTS:
            fields[_SUBSCHEMA_LISTS[key]] = [json_schema_to_spec(sub) for sub in value]
        elif key in _PLAIN:
            fields[_PLAIN[key]] = value
        else:
            raise ValueError(f"no OpenAPI mapping for the JSON Schema keyword {key!r}")
    return Schema(**fields)
