"""The Responses API request (``POST /v1/responses``), validated once into typed values.

What the appliance honours is typed here and a malformed value of it is a 400. What it cannot do (a
built-in tool such as ``web_search``, a ``reasoning`` effort, an image part, a field it does not know)
is parsed into an ``Other*`` value or left out, and named by :meth:`ResponsesRequest.ignored`: the one
rule is *ignore it and say so* (the ``X-Appliance-Ignored`` response header), so that clients which
send such fields by default keep working.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, WithJsonSchema, field_validator, model_validator

__all__ = [
    "ContentPart",
    "FunctionCallItem",
    "FunctionCallOutputItem",
    "FunctionChoice",
    "FunctionTool",
    "InputItem",
    "MessageItem",
    "OtherChoice",
    "OtherItem",
    "OtherPart",
    "OtherTool",
    "RefusalPart",
    "ResponsesRequest",
    "TextConfig",
    "TextFormat",
    "TextPart",
]

FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # the chat wire's rule (appliance.core.wire.FunctionDef)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)  # what may be echoed in a header as an ignored name
_MAX_IGNORED = 32


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _kind(value: Any) -> Any:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


# A ``type`` none of the known ones, so that each documented ``oneOf`` holds exactly one match.
_OtherPartType = Annotated[str, WithJsonSchema(
    {"type": "string", "not": {"enum": ["input_text", "output_text", "text", "refusal"]}})]
_OtherItemType = Annotated[str, WithJsonSchema(
    {"type": "string", "not": {"enum": ["message", "function_call", "function_call_output"]}})]
_NotFunction = Annotated[str, WithJsonSchema({"type": "string", "not": {"enum": ["function"]}})]


# --- content parts -------------------------------------------------------------------------------------------


class TextPart(_Wire):
    type: Literal["input_text", "output_text", "text"]
    text: str


class RefusalPart(_Wire):
    type: Literal["refusal"]
    refusal: str


class OtherPart(_Wire):
    """A part the appliance cannot read (an image, a file, audio): left out of the prompt, and named."""

    type: _OtherPartType


def _part_tag(value: Any) -> str | None:
    kind = _kind(value)
    if kind in ("input_text", "output_text", "text"):
        return "text"
    if kind == "refusal":
        return "refusal"
    return "other" if isinstance(kind, str) else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("text")] | Annotated[RefusalPart, Tag("refusal")] | Annotated[OtherPart, Tag("other")],
    Discriminator(_part_tag),
]


# --- input items ---------------------------------------------------------------------------------------------


class MessageItem(_Wire):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]


class FunctionCallItem(_Wire):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str


class FunctionCallOutputItem(_Wire):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[ContentPart]


class OtherItem(_Wire):
    """An item the appliance cannot use (``reasoning``, ``item_reference``, a built-in tool's call): left out."""

    type: _OtherItemType


_ITEM_TAGS = ("message", "function_call", "function_call_output")


def _item_tag(value: Any) -> str | None:
    kind = _kind(value)
    if kind is None and isinstance(value, dict) and "role" in value:
        return "message"  # the short form {"role": ..., "content": ...}
    if kind in _ITEM_TAGS:
        return str(kind)
    return "other" if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_tag),
]


# --- tools ---------------------------------------------------------------------------------------------------


class FunctionTool(_Wire):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OtherTool(_Wire):
    """A built-in or hosted tool (``web_search``, ``file_search``, ``mcp``, ``custom``...): not offered."""

    type: _NotFunction


def _tool_tag(value: Any) -> str | None:
    kind = _kind(value)
    if kind == "function":
        return "function"
    return "other" if isinstance(kind, str) else None


ToolSpec = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")], Discriminator(_tool_tag)
]


class FunctionChoice(_Wire):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class OtherChoice(_Wire):
    """A choice of a tool the appliance does not offer (``allowed_tools``, a built-in tool): ``auto`` instead."""

    type: _NotFunction


def _choice_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "mode"
    kind = _kind(value)
    if kind == "function":
        return "function"
    return "other" if isinstance(kind, str) else None


ToolChoice = Annotated[
    Annotated[Literal["auto", "none", "required"], Tag("mode")]
    | Annotated[FunctionChoice, Tag("function")]
    | Annotated[OtherChoice, Tag("other")],
    Discriminator(_choice_tag),
]


# --- text format ---------------------------------------------------------------------------------------------


class TextFormat(_Wire):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a json_schema format needs its schema")
        return self


class TextConfig(_Wire):
    format: TextFormat | None = None
    verbosity: str | None = None  # a GPT-5 setting: ignored


# --- the request ---------------------------------------------------------------------------------------------


class ResponsesRequest(_Wire):
    """``POST /v1/responses``: what the appliance honours (see the module docstring for the rest)."""

    model: str
    input: str | list[InputItem] = ""
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    stream: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = Field(default=None, max_length=256)
    service_tier: str | None = None  # "flex" lowers the key's priority to batch, as for chat (gateway.caller)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > 16:
                raise ValueError("at most 16 metadata pairs")
            if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return value

    @property
    def stored(self) -> bool:
        return self.store is not False

    @property
    def function_tools(self) -> list[FunctionTool]:
        return [tool for tool in self.tools or [] if isinstance(tool, FunctionTool)]

    @property
    def input_items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem | OtherItem]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)

    def ignored(self, payload: dict[str, Any]) -> list[str]:
        """The names of what this request asks for and the appliance does not do (sorted, header-safe)."""
        names: set[str] = {key for key, value in payload.items()
                           if key not in _KNOWN and value not in (None, False, "", [], {})}
        names |= {f"tools.{tool.type}" for tool in self.tools or [] if isinstance(tool, OtherTool)}
        if isinstance(self.tool_choice, OtherChoice):
            names.add(f"tool_choice.{self.tool_choice.type}")
        for item in self.input_items:
            if isinstance(item, OtherItem):
                names.add(f"input.{item.type}")
            elif isinstance(item, MessageItem | FunctionCallOutputItem):
                parts = item.content if isinstance(item, MessageItem) else item.output
                if isinstance(parts, list):
                    names |= {f"input.content.{part.type}" for part in parts if isinstance(part, OtherPart)}
        if self.text is not None and self.text.verbosity is not None:
            names.add("text.verbosity")
        if self.truncation == "auto":
            names.add("truncation.auto")
        shown = sorted(name if _NAME.fullmatch(name) else "other" for name in names)
        return sorted(set(shown))[:_MAX_IGNORED]


_KNOWN = frozenset(ResponsesRequest.model_fields) | {"stream_options"}
