"""OpenAI wire types for chat, completions, embeddings and models.

Requests are validated with pydantic (wrong types become a 400/422 with the
OpenAI error shape at the service edge). Unknown fields are ignored, as
OpenAI's SDKs send fields a server may not know; fields the appliance cannot
honour are rejected explicitly by :func:`reject_unsupported`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.core.errors import APIError, bad_request

T = TypeVar("T", bound=BaseModel)

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "JsonSchemaFormat",
    "ModelLimits",
    "PromptTokensDetails",
    "RequestCost",
    "ResponseFormat",
    "StreamOptions",
    "Tool",
    "ToolCall",
    "Usage",
    "check_max_tokens",
    "check_n",
    "check_prompts",
    "message_text",
    "model_limits",
    "model_list",
    "model_object",
    "parse_json",
    "parse_request",
    "prompt_count",
    "reject_unsupported",
    "strictest_limits",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FunctionCall(_Wire):
    name: str
    arguments: str = "{}"


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or OpenAI's list of content parts ({"type": "text", "text": ...}).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Wire):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Wire):
    type: Literal["function"] = "function"
    function: FunctionDef


class JsonSchemaFormat(_Wire):
    name: str = "response"
    description: str | None = None
    # "schema" shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Wire):
    include_usage: bool = False


class _Sampling(_Wire):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repeat_penalty: float = Field(default=1.0, ge=0.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    service_tier: str | None = None  # "flex" lowers the request to the batch class (never raises it)
    ignore_eos: bool = False  # appliance extension (benchmarks): generate max_tokens whatever the model says

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(item == "" for item in items):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Appliance extension: retrieval-augmented generation.
    rag: dict[str, Any] | None = None
    # Fields the appliance cannot honour; present only so they can be refused clearly.
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    # One prompt (text or token ids) or a list of them: one choice per prompt.
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Wire):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class PromptTokensDetails(_Wire):
    cached_tokens: int = 0  # prompt tokens taken from cached KV cells (prefix reuse), not prefilled


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


def reject_unsupported(request: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse, with a clear 400, what the appliance would otherwise silently ignore."""
    if isinstance(request, CompletionRequest):
        if request.best_of not in (None, 1):
            raise bad_request("best_of is not supported.", param="best_of")
        if request.suffix:
            raise bad_request("suffix (insertion) is not supported.", param="suffix")
        return
    if request.audio is not None or (request.modalities and request.modalities != ["text"]):
        raise bad_request("Audio input and output are not supported.", param="audio")
    for index, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for part in message.content:
                if part.get("type") != "text":
                    raise bad_request(
                        f"Content part type {part.get('type')!r} is not supported; only text.",
                        param=f"messages[{index}].content",
                    )


def message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(str(part.get("text", "")) for part in message.content)


def parse_request(model: type[T], payload: Any) -> T:
    """Validate a decoded JSON body; a wrong shape becomes an OpenAI-shaped 400."""
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(exc) from None


def parse_json(model: type[T], raw: bytes) -> T:
    """Decode and validate a raw JSON body in one pass (the body is parsed once per hop)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise bad_request("The request body must be a JSON object.", code="invalid_json") from None
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return APIError(400, f"Invalid request: {param}: {first['msg']}", param=param, code="invalid_value")


def check_max_tokens(request: ChatCompletionRequest | CompletionRequest, cap: int) -> None:
    """The one ``max_tokens`` rule, applied alike by the worker (its setting) and the gateway (the worker's
    published limit): the same status, code and message wherever a request is refused."""
    limit = request.token_limit()
    if limit is not None and limit > cap:
        param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        raise bad_request(f"{param} is {limit}, above this model's limit of {cap} tokens per answer.",
                          param=param, code="max_tokens_exceeded")


def check_n(request: ChatCompletionRequest | CompletionRequest, slots: int) -> None:
    """The one ``n`` rule, applied alike by the worker (its slot count) and the gateway (the model's published
    ``max_choices``): the ``n`` choices of a prompt decode together, one slot each."""
    if request.n > slots:
        raise bad_request(f"n is {request.n}, above the {slots} choices this model's workers decode together "
                          f"(one slot per choice).", param="n", code="too_many_choices")


def prompt_count(prompt: object) -> int:
    """Prompts in a ``/v1/completions`` ``prompt``: a string or one list of token ids is one; a list of strings
    or of token-id lists is its length (at least one: an empty list is the worker's to refuse)."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


class RequestCost(_Wire):
    """What a generation request occupies: one slot per sequence, ``prompts`` x ``choices`` (``n``).

    The body is the one source: the gateway reads it from the validated request, the balancer from the body it
    forwards (the same rule, :func:`prompt_count`), so no layer can be told another cost than the worker runs."""

    prompts: int = Field(default=1, ge=1)
    choices: int = Field(default=1, ge=1)

    @property
    def slots(self) -> int:
        return self.prompts * self.choices

    @classmethod
    def of(cls, request: ChatCompletionRequest | CompletionRequest) -> RequestCost:
        prompts = prompt_count(request.prompt) if isinstance(request, CompletionRequest) else 1
        return cls(prompts=prompts, choices=request.n)


def check_prompts(request: ChatCompletionRequest | CompletionRequest, cap: int) -> None:
    """The one prompts-per-request rule, applied alike by the worker (its ``max_prompts``) and the gateway (the
    model's published ``max_prompts``)."""
    if not isinstance(request, CompletionRequest):
        return
    count = prompt_count(request.prompt)
    if count > cap:
        raise bad_request(f"prompt holds {count} prompts, above this model's limit of {cap} prompts per request.",
                          param="prompt", code="too_many_prompts")


class ModelLimits(_Wire):
    """What a worker accepts, published with its model on ``/v1/models`` (the one authority for limits)."""

    context_length: int = Field(ge=1)  # tokens per request, prompt and answer together (the per-slot context)
    max_tokens: int = Field(ge=1)  # the longest answer a request may ask for
    # The most choices (``n``) a request may ask: the worker's slots. None where a worker did not publish it
    # (an older one): then no layer in front knows it, and the worker alone refuses.
    max_choices: int | None = Field(default=None, ge=1)
    # The most prompts a ``/v1/completions`` request may hold (each takes ``n`` slots); None: not published.
    max_prompts: int | None = Field(default=None, ge=1)


def model_object(model_id: str, limits: ModelLimits | None = None, *, created: int | None = None,
                 owned_by: str = "appliance") -> dict[str, Any]:
    """One OpenAI model object; the appliance adds its limits (:class:`ModelLimits`) when known."""
    body: dict[str, Any] = {"id": model_id, "object": "model", "created": created or int(time.time()),
                            "owned_by": owned_by}
    if limits is not None:
        body.update(limits.model_dump(exclude_none=True))
    return body


def model_list(model_ids: list[str], owned_by: str = "appliance",
               limits: Mapping[str, ModelLimits] | None = None) -> dict[str, Any]:
    now = int(time.time())
    known = limits or {}
    return {"object": "list",
            "data": [model_object(m, known.get(m), created=now, owned_by=owned_by) for m in model_ids]}


def strictest_limits(known: Iterable[tuple[str, ModelLimits]]) -> dict[str, ModelLimits]:
    """Per model, the limits every worker serving it accepts (the smallest of each; ``max_choices`` and
    ``max_prompts``: the smallest published, as a worker that does not publish one still refuses on its own)."""
    found: dict[str, ModelLimits] = {}
    for model, limits in known:
        seen = found.get(model)
        found[model] = limits if seen is None else ModelLimits(
            context_length=min(seen.context_length, limits.context_length),
            max_tokens=min(seen.max_tokens, limits.max_tokens),
            max_choices=_smallest(seen.max_choices, limits.max_choices),
            max_prompts=_smallest(seen.max_prompts, limits.max_prompts))
    return found


def _smallest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def model_limits(document: Any) -> dict[str, ModelLimits]:
    """The limits each model object of a ``/v1/models`` list publishes (models without them are left out)."""
    found: dict[str, ModelLimits] = {}
    data = document.get("data") if isinstance(document, dict) else None
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        try:
            found[item["id"]] = ModelLimits.model_validate(item)
        except ValidationError:
            continue
    return found
