"""A page of a response's input items, as OpenAI's list endpoints page: ``limit``, ``order``, ``after``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from appliance.core.errors import bad_request

__all__ = ["items_page"]


def items_page(items: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """``limit`` (1-100, default 20), ``order`` (``asc`` or ``desc``, default ``desc``: the last item first),
    ``after`` (the id of an item: the page starts after it, in that order)."""
    raw_limit = query.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= 100):
        raise bad_request("limit must be an integer from 1 to 100.", param="limit", code="invalid_value")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'.", param="order", code="invalid_value")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        position = next((i for i, item in enumerate(ordered) if item.get("id") == after), None)
        if position is None:
            raise bad_request("after is not the id of one of this response's input items.", param="after",
                              code="invalid_value")
        ordered = ordered[position + 1:]
    page = ordered[:int(raw_limit)]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > len(page)}
