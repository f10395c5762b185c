"""What the Responses routes answer, for the OpenAPI document (``gateway.openapi.documented``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["DeletedResponse", "ResponseItemList", "ResponseObject", "ResponseStreamEvent"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ResponseObject(_Open):
    """A Response: ``status`` completed, incomplete (``incomplete_details.reason``) or failed (``error``)."""

    id: str
    object: str
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None


class ResponseStreamEvent(_Open):
    """One streamed event (``event: <type>``); the last is response.completed, .incomplete or .failed."""

    type: str
    sequence_number: int


class ResponseItemList(_Open):
    """A page of a response's input items (``limit``, ``order``, ``after``)."""

    object: str
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(_Open):
    id: str
    object: str
    deleted: bool
