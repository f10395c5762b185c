"""JSON request bodies whose every string can be encoded as UTF-8.

JSON may spell a lone UTF-16 surrogate as ``"\\ud800"``; :func:`json.loads`
accepts it and returns a ``str`` that raises ``UnicodeEncodeError`` the moment
anything encodes it (a log line, an SSE event, the tokenizer, SQLite). Every
aiohttp service parses bodies with :func:`loads`, so such text is a 400 at the
edge, never a 500 deep inside. (msgspec, which the gateway uses, refuses it
while decoding.)
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["UnencodableText", "find_lone_surrogate", "loads"]

# In bytes a surrogate can only enter through a \uXXXX escape (bytes that encode one are not UTF-8);
# a str (aiohttp hands over the decoded text) could also carry one raw.
_SUSPECT_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")
_SUSPECT_TEXT = re.compile("\\\\u[dD][89a-fA-F]|[\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class UnencodableText(json.JSONDecodeError):
    """The body is JSON, but a string in it holds a lone surrogate (not Unicode text)."""


def find_lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in a decoded JSON document that holds a lone surrogate, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def loads(raw: str | bytes | bytearray) -> Any:
    """``json.loads`` that raises :class:`UnencodableText` (a ``JSONDecodeError``) for lone surrogates."""
    value = json.loads(raw)
    suspect = _SUSPECT_TEXT.search(raw) if isinstance(raw, str) else _SUSPECT_BYTES.search(raw)
    if suspect is not None and find_lone_surrogate(value) is not None:
        doc = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "replace")
        raise UnencodableText("a string holds a lone UTF-16 surrogate (not Unicode text)", doc, suspect.start())
    return value
