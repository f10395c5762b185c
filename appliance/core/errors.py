"""The one error model: OpenAI-shaped errors, shared by every service.

Every service raises :class:`APIError` (or a subclass) and maps it to a
response in exactly one place; the body is always
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIError",
    "bad_request",
    "error_body",
    "forbidden",
    "not_found",
    "overloaded",
    "payload_too_large",
    "rate_limited",
    "unauthorized",
    "unsupported_media_type",
]


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The JSON body OpenAI clients expect for an error."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An error that a client should see, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(max(1, round(retry_after)))

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, code={self.code!r})"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str = "Missing or invalid API key.") -> APIError:
    return APIError(401, message, type_="authentication_error", code="invalid_api_key")


def forbidden(message: str) -> APIError:
    return APIError(403, message, type_="permission_error", code="forbidden")


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, param=param, code=code)


def payload_too_large(message: str) -> APIError:
    return APIError(413, message, code="payload_too_large")


def unsupported_media_type(message: str) -> APIError:
    return APIError(415, message, code="unsupported_media_type")


def rate_limited(message: str, retry_after: float, headers: dict[str, str] | None = None) -> APIError:
    return APIError(
        429, message, type_="rate_limit_error", code="rate_limit_exceeded",
        retry_after=retry_after, headers=headers,
    )


def overloaded(message: str, retry_after: float = 1.0) -> APIError:
    return APIError(503, message, type_="server_error", code="overloaded", retry_after=retry_after)
