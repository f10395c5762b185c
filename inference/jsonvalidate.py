"""A small JSON Schema checker for tool-call arguments (no runtime dependency on ``jsonschema``).

It covers what tool parameter schemas use and what :mod:`inference.structured`
compiles to grammars: ``type``, ``enum``, ``const``, ``properties``,
``required``, ``additionalProperties``, ``items``/``prefixItems``,
``min/maxItems``, ``min/maxLength``, ``pattern``, ``anyOf``/``oneOf``/``allOf``
and local ``$ref``. Keywords it does not know are not enforced (the grammar
compiler refuses those for constrained output; free text is only ever judged
by this checker).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["schema_error"]

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "null": (type(None),),
    "number": (int, float),
    "integer": (int,),
}


def _is_type(value: Any, name: str) -> bool:
    if name in ("number", "integer") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(name, (object,)))


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    if not ref.startswith("#/"):
        return {}
    node: Any = root
    for part in ref[2:].split("/"):
        node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, dict) else {}
    return node


def schema_error(value: Any, schema: Any, root: Any = None, path: str = "") -> str | None:
    """Why ``value`` does not validate against ``schema`` (None when it does)."""
    root = schema if root is None else root
    if schema is True or not isinstance(schema, dict):
        return None if schema is not False else f"{path or '/'}: not allowed"
    if "$ref" in schema:
        return schema_error(value, _resolve(str(schema["$ref"]), root), root, path)
    for check in (_check_type, _check_combinators, _check_string, _check_object, _check_array):
        error = check(value, schema, root, path)
        if error is not None:
            return error
    return None


def _check_type(value: Any, schema: dict[str, Any], root: Any, path: str) -> str | None:
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is_type(value, str(k)) for k in kinds):
            return f"{path or '/'}: expected {kind}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path or '/'}: not one of {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        return f"{path or '/'}: expected {schema['const']!r}"
    return None


def _check_combinators(value: Any, schema: dict[str, Any], root: Any, path: str) -> str | None:
    for sub in schema.get("allOf", []):
        error = schema_error(value, sub, root, path)
        if error is not None:
            return error
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if options and all(schema_error(value, sub, root, path) is not None for sub in options):
            return f"{path or '/'}: matches none of {key}"
    return None


def _check_string(value: Any, schema: dict[str, Any], root: Any, path: str) -> str | None:
    if not isinstance(value, str):
        return None
    if len(value) < int(schema.get("minLength", 0)):
        return f"{path or '/'}: shorter than minLength"
    if "maxLength" in schema and len(value) > int(schema["maxLength"]):
        return f"{path or '/'}: longer than maxLength"
    if "pattern" in schema and re.search(str(schema["pattern"]), value) is None:
        return f"{path or '/'}: does not match pattern"
    return None


def _check_object(value: Any, schema: dict[str, Any], root: Any, path: str) -> str | None:
    if not isinstance(value, dict):
        return None
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            return f"{path}/{name}: required"
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        sub = properties.get(name, extra)
        error = schema_error(item, sub, root, f"{path}/{name}")
        if error is not None:
            return error
    return None


def _check_array(value: Any, schema: dict[str, Any], root: Any, path: str) -> str | None:
    if not isinstance(value, list):
        return None
    if len(value) < int(schema.get("minItems", 0)):
        return f"{path or '/'}: fewer than minItems"
    if "maxItems" in schema and len(value) > int(schema["maxItems"]):
        return f"{path or '/'}: more than maxItems"
    prefix = schema.get("prefixItems", [])
    for index, item in enumerate(value):
        sub = prefix[index] if index < len(prefix) else schema.get("items", True)
        error = schema_error(item, sub, root, f"{path}/{index}")
        if error is not None:
            return error
    return None
