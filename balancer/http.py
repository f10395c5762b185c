"""HTTP plumbing shared by the balancer's routes: the one error mapper and the internal token."""

from __future__ import annotations

import hmac
import logging

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from appliance.core.errors import APIError, error_body, unauthorized

__all__ = ["TOKEN_HEADER", "error_middleware", "json_response", "require_token"]

TOKEN_HEADER = "X-Internal-Token"  # noqa: S105 - a header name, not a secret
log = logging.getLogger("balancer.http")
_encode = msgspec.json.Encoder().encode

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(payload), status=status, headers=headers, content_type="application/json")


def error_response(exc: APIError) -> web.Response:
    return json_response(exc.body(), exc.status, exc.headers or None)


def require_token(request: web.Request, token: bytes) -> None:
    """Internal hops only: compare the shared token in constant time."""
    given = request.headers.get(TOKEN_HEADER, "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, token):
        raise unauthorized("Missing or invalid internal token.")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI-shaped error; this is the only place that maps them."""
    try:
        return await handler(request)
    except APIError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status)
        type_ = "server_error" if exc.status >= 500 else "invalid_request_error"
        return json_response(error_body(exc.reason, type_, code=code), exc.status)
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return json_response(error_body("Internal balancer error.", "server_error", code="internal_error"), 500)
