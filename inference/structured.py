"""Structured outputs and tool calls: JSON schemas compiled to llama.cpp grammars (GBNF).

``response_format`` (``json_object`` / ``json_schema``) and tool calls with
``tool_choice`` ``required`` or a named function are grammar-constrained per
sequence, so the output parses for any model, base models included. A schema
keyword the compiler would silently ignore is refused with a 400 naming it.

``tool_choice: "auto"`` never forces a call: the answer is free text, parsed
for calls afterwards (inference.toolcalls). A *lazy* grammar (llama.cpp's
trigger mechanism) stays dormant until the model itself writes
``<tool_call>``; from there on the block must be a valid call of a declared
function, so a model that chooses to call cannot get the call wrong.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from appliance.core.errors import bad_request
from appliance.core.wire import ChatCompletionRequest, Tool

__all__ = ["StructuredPlan", "parse_tool_call", "plan_structured", "tools_preamble"]

# Keywords the schema-to-grammar compiler cannot enforce; refusing beats a grammar that lies.
UNSUPPORTED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "patternProperties", "propertyNames",
    "uniqueItems", "contains", "minContains", "maxContains", "multipleOf", "unevaluatedProperties",
    "unevaluatedItems", "$dynamicRef", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
SUPPORTED_FORMATS = frozenset({"date", "time", "date-time", "uuid"})


@dataclass(frozen=True, slots=True)
class StructuredPlan:
    grammar: str | None = None
    tools: tuple[Tool, ...] = ()  # non-empty: the answer is a tool call to parse
    offered_tools: tuple[Tool, ...] = ()  # tools shown to the model in the prompt
    auto_tools: tuple[Tool, ...] = ()  # tool_choice "auto": free text, parsed for calls of these
    lazy_grammar: str | None = None  # dormant until the model writes LAZY_TRIGGER


def _check_keywords(schema: Any, path: str) -> None:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in UNSUPPORTED_KEYWORDS:
                raise bad_request(f"JSON schema keyword {key!r} (at {path or '/'}) is not supported.",
                                  param="response_format", code="unsupported_schema")
            if key == "format" and isinstance(value, str) and value not in SUPPORTED_FORMATS:
                raise bad_request(f"JSON schema string format {value!r} (at {path or '/'}) is not supported.",
                                  param="response_format", code="unsupported_schema")
            if key not in ("const", "enum", "default", "examples"):
                _check_keywords(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for index, item in enumerate(schema):
            _check_keywords(item, f"{path}/{index}")


_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def schema_grammar(schema: dict[str, Any], param: str = "response_format") -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    _check_keywords(schema, "")
    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except (AssertionError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise bad_request(f"Unsupported JSON schema: {exc}", param=param, code="unsupported_schema") from None
    # llama-cpp-python's string rule lets raw control characters (a newline, say) into JSON strings,
    # which no JSON parser accepts; exclude them as llama.cpp's own JSON grammar does.
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)


def json_object_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def _tool_call_schema(tools: list[Tool]) -> dict[str, Any]:
    options = [
        {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": tool.function.parameters},
         "required": ["name", "arguments"]}
        for tool in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _forced_tools(body: ChatCompletionRequest, tools: list[Tool]) -> list[Tool]:
    """The tools the answer must call: all for ``required``, one for a named choice, none otherwise."""
    choice = body.tool_choice
    if choice in (None, "auto", "none"):
        return []
    if choice == "required":
        return tools
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [tool for tool in tools if tool.function.name == name]
        if not chosen:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools.", param="tool_choice")
        return chosen
    raise bad_request(f"tool_choice {choice!r} is not supported.", param="tool_choice")


LAZY_TRIGGER = "<tool_call>"


def lazy_tool_grammar(tools: list[Tool]) -> str:
    """One ``<tool_call>{call}</tool_call>`` block, a valid call of a declared tool, then the end.

    Only one: letting the grammar go on after the block would force whatever
    the model writes next (a newline, say) into a second call.
    """
    call = schema_grammar(_tool_call_schema(tools), "tools")
    call = re.sub(r"^root ::=", "tool-call ::=", call, count=1, flags=re.MULTILINE)
    block = f'"{LAZY_TRIGGER}" "\\n"? tool-call "\\n"? "</tool_call>"'
    return f"root ::= {block}\n{call}"


def plan_structured(body: ChatCompletionRequest) -> StructuredPlan:
    tools = list(body.tools or [])
    if body.tool_choice is not None and body.tool_choice != "none" and not tools:
        raise bad_request("tool_choice needs tools.", param="tool_choice")
    offered = tuple(tools) if body.tool_choice != "none" else ()
    forced = _forced_tools(body, tools) if tools else []
    if forced:
        if body.response_format is not None and body.response_format.type != "text":
            raise bad_request("response_format cannot be combined with a forced tool call.", param="response_format")
        return StructuredPlan(grammar=schema_grammar(_tool_call_schema(forced), "tools"), tools=tuple(forced),
                              offered_tools=offered)
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        if not offered:
            return StructuredPlan()
        return StructuredPlan(offered_tools=offered, auto_tools=offered,
                              lazy_grammar=lazy_tool_grammar(list(offered)))
    if fmt.type == "json_object":
        return StructuredPlan(grammar=json_object_grammar(), offered_tools=offered)
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise bad_request("response_format json_schema needs a schema.", param="response_format.json_schema")
    return StructuredPlan(grammar=schema_grammar(fmt.json_schema.schema_), offered_tools=offered)


def parse_tool_call(text: str) -> list[dict[str, Any]]:
    """The grammar-constrained answer as OpenAI ``tool_calls`` (empty if it was cut short)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(call, dict) or "name" not in call:
        return []
    arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False, separators=(",", ":"))
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": str(call["name"]), "arguments": arguments}}]


def tools_preamble(tools: tuple[Tool, ...]) -> str:
    """How the fallback (template-less) prompt tells a base model about the tools."""
    lines = ["You can call these functions. To call one, answer with "
             '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>.']
    for tool in tools:
        spec = {"name": tool.function.name, "description": tool.function.description or "",
                "parameters": tool.function.parameters}
        lines.append(json.dumps(spec, ensure_ascii=False))
    return "\n".join(lines)
