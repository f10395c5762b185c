"""Request ids: accepted from the client when sane, minted otherwise, passed to every hop."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

__all__ = ["HEADER", "accept_or_mint", "current_request_id", "mint", "request_id_var"]

HEADER = "X-Request-Id"
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


def mint() -> str:
    return uuid.uuid4().hex


def accept_or_mint(incoming: str | None) -> str:
    """Keep a client's id only if it is short and plain (it lands in logs)."""
    if incoming and _SANE.match(incoming):
        return incoming
    return mint()


def current_request_id() -> str | None:
    return request_id_var.get()
