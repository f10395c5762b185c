"""The one place where errors become responses: always OpenAI-shaped."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from appliance.core.errors import APIError, error_body

__all__ = ["exception_handlers"]

_log = logging.getLogger("gateway.errors")
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def _api_error(_: Request[Any, Any, Any], exc: APIError) -> Response[Any]:
    return Response(exc.body(), status_code=exc.status, headers=exc.headers)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    message = str(exc.detail)
    if status == 413:
        message = "Request body too large."
    elif isinstance(exc, ValidationException) and exc.extra:
        message = f"{exc.detail}: {exc.extra}"
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    headers = dict(exc.headers or {})
    return Response(error_body(message, kind, code=_CODES.get(status)), status_code=status, headers=headers)


def _redis_error(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    _log.warning("redis unavailable for a request that needs it", extra={"error": type(exc).__name__})
    body = error_body("The key store (Redis) is unavailable; retry shortly.", "server_error",
                      code="redis_unavailable")
    return Response(body, status_code=503, headers={"Retry-After": "5"})


def _unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    _log.error("unhandled error", exc_info=exc)
    return Response(error_body("Internal error.", "server_error", code="internal_error"), status_code=500)


def exception_handlers() -> dict[Any, Any]:
    return {
        APIError: _api_error,
        HTTPException: _http_error,
        RedisConnectionError: _redis_error,
        RedisTimeoutError: _redis_error,
        Exception: _unexpected,
    }
