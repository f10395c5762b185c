"""A batch's input file: JSON lines ``{"custom_id", "method", "url", "body"}``, every one checked before the
batch is accepted, and the order the runner sends them in.

Pure: no I/O. :func:`parse_lines` finds every bad line (a 400 names the first few); :func:`run_order`
sorts lines so that those whose prompts share a prefix are sent together (the worker prefills a shared
prefix once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from appliance.core.errors import APIError, bad_request
from appliance.core.ids import ModelId

__all__ = ["ENDPOINTS", "BatchLine", "LineProblem", "parse_lines", "problems_error", "run_order"]

# endpoint -> the key scope its lines need
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "chat", "/v1/responses": "chat",
             "/v1/embeddings": "embeddings"}
MAX_CUSTOM_ID = 512
_NAMED = 5  # bad lines a 400 names


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One request of a batch: its place in the file (1-based), its id, its body (JSON bytes)."""

    number: int
    custom_id: str
    body: bytes
    prefix: str = field(compare=False, default="")


@dataclass(frozen=True, slots=True)
class LineProblem:
    number: int
    message: str


def _prompt_text(endpoint: str, body: dict[str, Any]) -> str:
    """What the line's prompt starts with, as text that sorts lines of a shared prefix together."""
    if endpoint == "/v1/chat/completions":
        seed: Any = body.get("messages")
    elif endpoint == "/v1/responses":
        seed = [body.get("instructions"), body.get("input")]
    else:
        seed = body.get("prompt") if endpoint == "/v1/completions" else body.get("input")
    text = seed if isinstance(seed, str) else msgspec.json.encode(seed).decode()
    return f"{body.get('model')}\0{text}"


class _Refused(Exception):
    """Why a line is refused."""


def _check(item: Any, *, endpoint: str, allows_model: Callable[[str], bool]) -> None:
    """Refuse (raise :class:`_Refused`) a decoded line that is not a request this batch may run."""
    if not isinstance(item, dict):
        raise _Refused("is not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise _Refused(f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters")
    if item.get("method") != "POST":
        raise _Refused("method must be POST")
    if item.get("url") != endpoint:
        raise _Refused(f"url must be the batch's endpoint {endpoint!r}")
    body = item.get("body")
    if not isinstance(body, dict):
        raise _Refused("body must be a JSON object")
    model = body.get("model")
    if not ModelId.matches(model):
        raise _Refused("body.model must be a model id")
    if not allows_model(model):
        raise _Refused(f"this API key may not use model {model!r}")
    if body.get("stream"):
        raise _Refused("body.stream is not supported in a batch")


def _line(number: int, text: bytes, seen: dict[str, int], *, endpoint: str, allows_model: Callable[[str], bool],
          max_line_bytes: int) -> BatchLine:
    if len(text) > max_line_bytes:
        raise _Refused(f"is {len(text)} bytes, above the limit of {max_line_bytes} bytes per request")
    try:
        item = msgspec.json.decode(text)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise _Refused("is not valid JSON") from None
    _check(item, endpoint=endpoint, allows_model=allows_model)
    custom_id = item["custom_id"]
    if custom_id in seen:
        raise _Refused(f"custom_id {custom_id!r} is used twice (first on line {seen[custom_id]})")
    seen[custom_id] = number
    body = item["body"]
    return BatchLine(number, custom_id, msgspec.json.encode(body), _prompt_text(endpoint, body))


def parse_lines(raw: bytes, endpoint: str, *, allows_model: Callable[[str], bool], max_lines: int,
                max_line_bytes: int) -> tuple[list[BatchLine], list[LineProblem]]:
    """Every request of the file and every problem found (blank lines are skipped, as OpenAI does)."""
    lines: list[BatchLine] = []
    problems: list[LineProblem] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(raw.split(b"\n"), start=1):
        if not text.strip():
            continue
        if len(lines) + len(problems) >= max_lines:
            problems.append(LineProblem(number, f"is past the limit of {max_lines} requests per batch"))
            break
        try:
            lines.append(_line(number, text, seen, endpoint=endpoint, allows_model=allows_model,
                               max_line_bytes=max_line_bytes))
        except _Refused as refused:
            problems.append(LineProblem(number, str(refused)))
    return lines, problems


def problems_error(problems: list[LineProblem], *, empty: bool) -> APIError:
    """The 400 for a refused input file: the first bad lines, by number."""
    if empty:
        return bad_request("The input file holds no requests.", param="input_file_id", code="empty_batch")
    named = "; ".join(f"line {p.number}: {p.message}" for p in problems[:_NAMED])
    more = f" (and {len(problems) - _NAMED} more bad lines)" if len(problems) > _NAMED else ""
    return bad_request(f"The input file has invalid lines: {named}{more}.", param="input_file_id",
                       code="invalid_batch_input")


def run_order(lines: list[BatchLine]) -> list[BatchLine]:
    """Lines sorted by prompt (lines sharing a prefix become neighbours), ties in file order."""
    return sorted(lines, key=lambda line: (line.prefix, line.number))
