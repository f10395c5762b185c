"""The edge of the aiohttp services (balancer, inference worker, RAG): one middleware, one error mapping.

``edge_middleware(service, token)`` is the single place where, for every request of a service:

* the request id is accepted from ``X-Request-Id`` when sane or minted, set for the log lines
  (``request_id_var``) and echoed on the response;
* the internal token (``X-Internal-Token``) is checked in constant time on every path except the
  public ones (``/health``, ``/metrics``);
* every failure leaves as an OpenAI-shaped error: :class:`APIError` as raised, aiohttp's HTTP
  exceptions mapped by status, anything else a logged 500 that says nothing of its cause.

The gateway (Litestar) has its own edge; the header names are those of :mod:`appliance.core.hop`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from appliance.core.errors import APIError, not_found, payload_too_large, unauthorized, unsupported_media_type
from appliance.core.hop import INTERNAL_TOKEN_HEADER, REQUEST_ID_HEADER
from appliance.core.request_id import accept_or_mint, request_id_var
from appliance.core.settings import MIN_INTERNAL_TOKEN_CHARS

__all__ = [
    "PUBLIC_PATHS",
    "Observer",
    "edge_middleware",
    "error_response",
    "from_http_exception",
    "require_token",
    "token_matches",
]

log = logging.getLogger("appliance.edge")

# Called after each request with the response (metrics per endpoint); never sees the token.
Observer = Callable[[web.Request, web.StreamResponse], None]

# Reachable without the internal token: liveness for supervisors/orchestrators, scraping for Prometheus.
PUBLIC_PATHS = frozenset({"/health", "/metrics"})


def token_matches(given: str, expected: bytes) -> bool:
    """Constant-time comparison; a header aiohttp decoded with surrogates compares (unequal) without raising."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)


def require_token(request: web.Request, expected: bytes) -> None:
    """Raise 401 unless the request carries the internal token (for routes that check it themselves)."""
    if not token_matches(request.headers.get(INTERNAL_TOKEN_HEADER, ""), expected):
        raise unauthorized(f"Missing or invalid {INTERNAL_TOKEN_HEADER}.")


def error_response(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers or None)


def from_http_exception(request: web.Request, exc: web.HTTPException) -> APIError:
    """aiohttp's own refusals (no route, wrong method, body too large...) as OpenAI-shaped errors."""
    if exc.status == 404:
        return not_found(f"No route for {request.method} {request.path}.")
    if exc.status == 413:
        return payload_too_large("The request body is too large.")
    if exc.status == 415:
        return unsupported_media_type(exc.reason)
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}  # 405 says what is allowed
    type_ = "server_error" if exc.status >= 500 else "invalid_request_error"
    return APIError(exc.status, exc.reason, type_=type_, code=exc.reason.lower().replace(" ", "_"), headers=headers)


def edge_middleware(
    service: str,
    token: str | None,
    *,
    public: Collection[str] = PUBLIC_PATHS,
    request_ids: bool = True,
    observe: Observer | None = None,
) -> Middleware:
    """The one middleware of an aiohttp service.

    ``token``: the internal token every non-public path requires (None: the routes check it
    themselves with :func:`require_token`). ``request_ids=False`` for a service that sets the
    request id itself on its hot path (the balancer's proxy). ``observe`` runs after each request.
    """
    if token is not None and len(token) < MIN_INTERNAL_TOKEN_CHARS:  # an empty token would admit everyone
        raise ValueError(f"the internal token must be at least {MIN_INTERNAL_TOKEN_CHARS} characters")
    expected = token.encode("utf-8") if token is not None else None
    internal_error = f"Internal error in the {service}."

    async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if expected is not None and request.path not in public:
                require_token(request, expected)
            return await handler(request)
        except APIError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(from_http_exception(request, exc))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("unhandled error", extra={"service": service, "path": request.path})
            return error_response(APIError(500, internal_error, type_="server_error", code="internal_error"))

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request_ids:
            response = await guarded(request, handler)
        else:
            request_id = accept_or_mint(request.headers.get(REQUEST_ID_HEADER))
            reset = request_id_var.set(request_id)
            try:
                response = await guarded(request, handler)
            finally:
                request_id_var.reset(reset)
            if not response.prepared:
                response.headers[REQUEST_ID_HEADER] = request_id
        if observe is not None:
            observe(request, response)
        return response

    return edge
