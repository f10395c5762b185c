"""HTTP plumbing shared by the balancer's routes: msgspec JSON answers; the edge (errors, token) is core's."""

from __future__ import annotations

import msgspec
from aiohttp import web

from appliance.core.edge import edge_middleware, error_response, require_token
from appliance.core.hop import INTERNAL_TOKEN_HEADER as TOKEN_HEADER

__all__ = ["TOKEN_HEADER", "error_middleware", "error_response", "json_response", "require_token"]

_encode = msgspec.json.Encoder().encode
# The proxy sets its own request ids (a counter, on the hot path) and routes check the token themselves.
error_middleware = edge_middleware("balancer", None, request_ids=False)


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(payload), status=status, headers=headers, content_type="application/json")
