"""One structured line and the metrics for every request, written when its last byte is sent.

Handlers fill an :class:`AccessRecord` (key name, model, tokens, cache result,
time spent upstream); this ASGI middleware owns the request id, the timing and
the line. Prompts are never part of it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.core.errors import error_body
from appliance.core.hop import REQUEST_ID_HEADER
from appliance.core.metrics import OTHER
from appliance.core.request_id import accept_or_mint, request_id_var

if TYPE_CHECKING:
    from litestar.connection import Request
    from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Message, Receive, Scope, Send

    from gateway.metrics import GatewayMetrics

__all__ = ["AccessRecord", "access_middleware", "access_record"]

_REQUEST_ID_RAW = REQUEST_ID_HEADER.lower().encode()  # ASGI header names are lower-case bytes

_log = logging.getLogger("gateway.access")
_STATE_KEY = "gateway_access"


@dataclass(slots=True)
class AccessRecord:
    request_id: str
    key_name: str = ""
    key_id: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache: str = ""
    upstream_s: float = 0.0
    stream: bool = False
    status: int = 0
    prompt: str = ""  # filled only when the operator turned log_prompts on


def access_record(request: Request[Any, Any, Any]) -> AccessRecord:
    record = request.scope.get("state", {}).get(_STATE_KEY)
    if isinstance(record, AccessRecord):
        return record
    record = AccessRecord(request_id=request_id_var.get() or "")
    request.scope.setdefault("state", {})[_STATE_KEY] = record
    return record


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == _REQUEST_ID_RAW:
            return value.decode("latin-1")
    return None


# uvicorn's httptools parser sets no limit on header size; refuse what no client needs.
MAX_HEADER_BYTES = 32 * 1024
_TOO_LARGE = json.dumps(error_body(f"Request headers exceed {MAX_HEADER_BYTES} bytes.", code="headers_too_large")
                        ).encode()


async def _refuse_headers(send: Send, id_header: tuple[bytes, bytes]) -> None:
    start: HTTPResponseStartEvent = {"type": "http.response.start", "status": 431, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(_TOO_LARGE)).encode()), id_header]}
    await send(start)
    body: HTTPResponseBodyEvent = {"type": "http.response.body", "body": _TOO_LARGE, "more_body": False}
    await send(body)


def access_middleware(metrics: GatewayMetrics) -> Any:
    """Build the middleware factory Litestar expects (called with ``app=``)."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":  # type: ignore[comparison-overlap]
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            request_id = accept_or_mint(_incoming_request_id(scope))
            token = request_id_var.set(request_id)
            record = AccessRecord(request_id=request_id)
            scope.setdefault("state", {})[_STATE_KEY] = record
            id_header = (_REQUEST_ID_RAW, request_id.encode())
            if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
                request_id_var.reset(token)
                await _refuse_headers(send, id_header)
                return

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start":
                    record.status = message["status"]
                    message["headers"] = [*message.get("headers", ()), id_header]
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    _finish(metrics, scope, record, time.perf_counter() - started)

            try:
                await app(scope, receive, send_wrapper)
            finally:
                request_id_var.reset(token)

        return middleware

    return factory


def _finish(metrics: GatewayMetrics, scope: Scope, record: AccessRecord, elapsed: float) -> None:
    # Labels from closed sets only: the route's template (a path no route has is "other"), a served model named
    # by an authenticated key (record.key_id is set once admission verified the key). The log keeps the path.
    template = scope.get("path_template")
    label = str(template) if template else OTHER
    metrics.requests.labels(label, str(record.status), metrics.model_label(record.model,
                                                                           authenticated=bool(record.key_id))).inc()
    metrics.latency.labels(label).observe(elapsed)
    route = label if template else str(scope.get("path", ""))
    if record.upstream_s:
        metrics.overhead.observe(max(0.0, elapsed - record.upstream_s))
    if route in ("/metrics", "/healthz", "/readyz"):
        return
    _log.info(
        "request",
        extra={
            "method": scope.get("method"), "route": route, "status": record.status, "key": record.key_name,
            "key_id": record.key_id, "model": record.model, "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens, "cache": record.cache, "stream": record.stream,
            "latency_ms": round(elapsed * 1000, 2), "upstream_ms": round(record.upstream_s * 1000, 2),
            **({"prompt": record.prompt} if record.prompt else {}),
        },
    )
