"""Tool-call arguments checked against their JSON Schema with jsonschema-rs (the whole specification).

Each distinct schema is compiled once (LRU) and reused for every call of
that tool. A schema that is not itself valid JSON Schema cannot vouch for
anything, so it does not reject arguments (the grammar compiler refuses such
schemas for constrained output; free text is only ever judged here).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jsonschema_rs

__all__ = ["schema_error"]


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    try:
        return jsonschema_rs.validator_for(json.loads(schema_json))
    except (jsonschema_rs.ValidationError, ValueError, TypeError):
        return None


def schema_error(value: Any, schema: Any) -> str | None:
    """Why ``value`` does not validate against ``schema`` (None when it does)."""
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):
        return None
    validator = _validator(key)
    if validator is None:
        return None
    for error in validator.iter_errors(value):
        path = "/" + "/".join(str(part) for part in error.instance_path)
        return f"{path}: {error.message}"
    return None
