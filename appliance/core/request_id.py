"""Request ids: accepted from the client when sane, minted otherwise, passed to every hop (header: core.hop)."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

__all__ = ["accept_or_mint", "current_request_id", "is_sane", "mint", "request_id_var"]

_SANE = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)  # matched whole: "$" would let a trailing "\n" in

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


def mint() -> str:
    return uuid.uuid4().hex


def is_sane(incoming: str | None) -> bool:
    """A client's id is kept only if it is short and plain (it lands in logs)."""
    return bool(incoming) and _SANE.fullmatch(incoming or "") is not None


def accept_or_mint(incoming: str | None) -> str:
    return incoming if incoming and is_sane(incoming) else mint()


def current_request_id() -> str | None:
    return request_id_var.get()
