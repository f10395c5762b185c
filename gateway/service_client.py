"""The gateway's client of its internal services (the balancer, the RAG service).

JSON posts and streams (the hot path) go over the hop's own keep-alive HTTP/1.1 client
(``appliance.core.hop_client``), which sends a request once and never twice; other calls (reads,
uploads streamed from the client, query parameters) over one injected aiohttp session.

Every call has explicit timeouts: connect and per-read, never a total one, so
a long stream lives as long as tokens keep coming. A service that cannot be
reached becomes a 503 with ``Retry-After``; an upstream's own OpenAI-shaped
error passes through with its status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import msgspec

from appliance.core.errors import APIError, error_body, overloaded
from appliance.core.hop import HOP_BY_HOP, INTERNAL_TOKEN_HEADER, REQUEST_ID_HEADER
from appliance.core.hop_client import HopClient, HopError, HopResponse
from appliance.core.request_id import current_request_id
from gateway.caller import IDENTITY_HEADERS, Caller

__all__ = ["CLIENT_PRIORITY_HEADER", "ServiceClient", "ServiceReply", "ServiceStream", "decode_json_object",
           "ensure_error_body"]

# An answer being streamed: ``status`` and ``headers`` now, ``readany()`` until b"", then ``release()``.
ServiceStream = HopResponse

# A client may lower its request's priority with this header (or OpenAI's ``service_tier: "flex"``).
CLIENT_PRIORITY_HEADER = "X-Priority"

# Never copied from a service's answer: hop-by-hop and framing headers, and what only the hop itself carries.
_DROP = HOP_BY_HOP | {"content-encoding", "host", "authorization", INTERNAL_TOKEN_HEADER.lower()}


class ServiceReply(msgspec.Struct, frozen=True):
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]


def ensure_error_body(status: int, body: bytes) -> bytes:
    """Keep an upstream's OpenAI-shaped error; wrap anything else in that shape."""
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
        return body
    kind = "server_error" if status >= 500 else "invalid_request_error"
    text = body[:300].decode("utf-8", "replace").strip() or f"upstream returned HTTP {status}"
    return msgspec.json.encode(error_body(text, kind, code=f"upstream_{status}"))


def decode_json_object(body: bytes, service: str) -> dict[str, Any]:
    """An upstream's 200 body; anything but a JSON object is the upstream's fault (502)."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        document = None
    if not isinstance(document, dict):
        raise APIError(502, f"The {service} returned an invalid response.", type_="server_error",
                       code="bad_upstream_response")
    return document


class ServiceClient:
    """One internal service (the balancer or the RAG service), reached with a shared session.

    Every call names its ``caller`` (or ``None`` for the gateway's own calls): the service is told who
    is asking from that value alone."""

    def __init__(self, name: str, base_url: str, session: aiohttp.ClientSession, token: str, *,
                 connect_timeout_s: float, read_timeout_s: float, keepalive_s: float = 30.0) -> None:
        self.name = name
        self._base = base_url.rstrip("/")
        self._session = session
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                              sock_read=read_timeout_s)
        self._hop = HopClient(connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s,
                              keepalive_s=keepalive_s)

    async def close(self) -> None:
        """Close the kept-alive hop connections (the session belongs to whoever injected it)."""
        await self._hop.close()

    def _headers(self, caller: Caller | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {INTERNAL_TOKEN_HEADER: self._token}
        request_id = current_request_id()
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id
        if extra:  # identity comes from the authenticated key only, never from what a caller passed along
            headers.update((k, v) for k, v in extra.items() if k.lower() not in IDENTITY_HEADERS)
        if caller is not None:
            headers.update(caller.hop_headers())
        return headers

    def _unreachable(self, exc: BaseException) -> APIError:
        error = overloaded(f"The {self.name} is unavailable ({type(exc).__name__}); retry shortly.", 2)
        error.code = f"{self.name}_unavailable"
        return error

    async def request(
        self, method: str, path: str, *, caller: Caller | None, body: bytes | AsyncIterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None,
    ) -> ServiceReply:
        try:
            async with self._session.request(method, self._base + path, data=body, params=params,
                                             headers=self._headers(caller, headers), timeout=self._timeout) as resp:
                payload = await resp.read()
                kept = {k: v for k, v in resp.headers.items() if k.lower() not in _DROP}
                return ServiceReply(resp.status, payload, resp.content_type or "application/json", kept)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc

    async def post_json(self, path: str, body: bytes, *, caller: Caller | None) -> ServiceReply:
        answer = await self.open_stream(path, body, caller=caller)
        try:
            payload = await answer.read()
        except HopError as exc:
            raise self._unreachable(exc) from exc
        finally:
            answer.release()
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in _DROP}
        content_type = answer.headers.get("Content-Type", "application/json").partition(";")[0].strip()
        return ServiceReply(answer.status, payload, content_type, kept)

    async def get_json(self, path: str) -> Any:
        reply = await self.request("GET", path, caller=None)
        if reply.status != 200:
            raise APIError(reply.status, f"{self.name} {path} returned {reply.status}", type_="server_error")
        return msgspec.json.decode(reply.body)

    async def open_stream(self, path: str, body: bytes, *, caller: Caller | None) -> ServiceStream:
        """POST ``body`` as JSON once; return when the status line and headers are in. Whoever opens it reads
        the body (``readany`` until b"", or ``read``) and must ``release()`` it."""
        try:
            return await self._hop.request(self._base, "POST", path, body,
                                           self._headers(caller, {"Content-Type": "application/json"}))
        except HopError as exc:
            raise self._unreachable(exc) from exc
