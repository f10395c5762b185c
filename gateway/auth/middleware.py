"""The session cookie as a credential: an ASGI middleware in front of every route.

- A request with ``Authorization`` is a program's (or the web UI's with a pasted key): the cookie is ignored.
  Where ``[auth] allow_key_sign_in`` is off, a key sent by this gateway's own pages (``Sec-Fetch-Site:
  same-origin``, which a browser always sends and a page's script cannot change) is refused: people sign in.
- A request without it but with a live session cookie runs as the session's user: for a state-changing
  method (anything but GET, HEAD, OPTIONS) the ``X-CSRF-Token`` header must equal the session's token
  (compared in constant time; a cookie alone, which the browser attaches to any request, is not enough),
  then the user's key (:meth:`gateway.auth.users.UserStore.key_secret`) is added as ``Authorization`` so
  admission, scopes, limits and usage apply unchanged. The :class:`SignedIn` goes in the scope's state.
- A stale or unknown cookie is as no credential: the route answers as it does for a missing key.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from appliance.core.errors import error_body
from gateway.auth.web import STATE_KEY, SignedIn, WebAuth

if TYPE_CHECKING:
    from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, Scope, Send

__all__ = ["CSRF_HEADER", "session_middleware"]

CSRF_HEADER = "X-CSRF-Token"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
_log = logging.getLogger("gateway.auth")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def cookie_value(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    """The named cookie from the request's Cookie headers (first one wins)."""
    wanted = name.encode()
    for key, value in headers:
        if key != b"cookie":
            continue
        for part in value.split(b";"):
            cookie_name, sep, cookie = part.strip().partition(b"=")
            if sep and cookie_name == wanted:
                return cookie.decode("latin-1")
    return None


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    async def send(self, send: Send) -> None:
        body = json.dumps(error_body(self.message, self.kind, code=self.code)).encode()
        start: HTTPResponseStartEvent = {"type": "http.response.start", "status": self.status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        await send(start)
        end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
        await send(end)


async def _signed_in(auth: WebAuth, session_id: str) -> SignedIn | None:
    try:
        return await auth.resolve(session_id)
    except RedisError as exc:
        _log.warning("session store unavailable", extra={"error": type(exc).__name__})
        raise _Refused(503, "The session store (Redis) is unavailable; retry shortly.", "redis_unavailable",
                       "server_error") from None


async def _authenticate(auth: WebAuth, scope: Scope) -> None:
    """Add the session's credential to ``scope`` when it has one; :class:`_Refused` when it must not go on."""
    headers: list[tuple[bytes, bytes]] = list(scope["headers"])
    if _header(headers, b"authorization") is not None:
        if not auth.settings.key_sign_in and _header(headers, b"sec-fetch-site") == b"same-origin":
            raise _Refused(403, "Signing in with an API key is turned off here: sign in with "
                           f"{auth.settings.display_name}.", "key_sign_in_disabled", "permission_error")
        return
    session_id = cookie_value(headers, auth.session_cookie)
    signed_in = await _signed_in(auth, session_id) if session_id is not None else None
    if signed_in is None:
        return
    if str(scope.get("method", "GET")) not in _SAFE:
        sent = _header(headers, CSRF_HEADER.lower().encode()) or b""
        if not hmac.compare_digest(sent, signed_in.session.csrf_token.encode()):
            raise _Refused(403, f"Missing or wrong {CSRF_HEADER} header for this session.", "csrf_failed",
                           "permission_error")
    secret = auth.users.key_secret(signed_in.user)
    scope["headers"] = [*headers, (b"authorization", f"Bearer {secret}".encode())]
    scope.setdefault("state", {})[STATE_KEY] = signed_in


def session_middleware(provide: Callable[[], WebAuth]) -> Any:
    """The middleware factory Litestar expects; ``provide`` returns the app's :class:`WebAuth` once started."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":  # type: ignore[comparison-overlap]
                try:
                    await _authenticate(provide(), scope)
                except _Refused as refused:
                    await refused.send(send)
                    return
            await app(scope, receive, send)

        return middleware

    return factory
