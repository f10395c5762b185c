"""Response cache in Redis for repeated deterministic requests.

The key is a SHA-256 of the canonical request: endpoint, model id and the
model file's hash (so swapping the weights invalidates everything), the
messages or prompt, every sampling parameter, tools and response format, and
whether it streams. Only deterministic requests are cached by default
(``temperature == 0`` or a ``seed``). A stored entry is the exact body
(JSON, or the SSE bytes of a stream, replayed as SSE).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgspec

from appliance.core.wire import ChatCompletionRequest, CompletionRequest
from gateway.redis_guard import RedisGuard, RedisUnavailable
from gateway.resp import Arg

__all__ = ["CachePolicy", "ResponseCache", "cache_key", "cache_policy"]

# Fields that do not change what the model produces.
_IGNORED = frozenset({"stream", "stream_options", "user", "rag"})


@dataclass(frozen=True, slots=True)
class CachePolicy:
    lookup: bool
    store: bool
    ttl_s: int

    @property
    def active(self) -> bool:
        return self.lookup or self.store


def cache_policy(
    request: ChatCompletionRequest | CompletionRequest, headers: dict[str, str], enabled: bool, default_ttl_s: int,
) -> CachePolicy:
    """What to do for this request. ``Cache-Control: no-cache`` skips the lookup, ``no-store`` the store;
    ``X-Cache-TTL: <s>`` sets the entry's lifetime; ``X-Cache: force`` caches a non-deterministic request."""
    if not enabled:
        return CachePolicy(False, False, 0)
    directives = {d.strip().lower() for d in headers.get("cache-control", "").split(",") if d.strip()}
    deterministic = request.temperature == 0 or request.seed is not None
    forced = headers.get("x-cache", "").lower() == "force"
    if not (deterministic or forced):
        return CachePolicy(False, False, 0)
    ttl = default_ttl_s
    raw_ttl = headers.get("x-cache-ttl", "")
    if raw_ttl.isdigit():
        ttl = max(1, min(int(raw_ttl), 30 * 86400))
    return CachePolicy(lookup="no-cache" not in directives, store="no-store" not in directives, ttl_s=ttl)


def cache_key(endpoint: str, request: ChatCompletionRequest | CompletionRequest, model_sha256: str) -> str:
    payload: dict[str, Any] = request.model_dump(mode="json", exclude=set(_IGNORED), by_alias=True)
    canonical = msgspec.json.encode(
        {"endpoint": endpoint, "model_sha256": model_sha256, "stream": request.stream, "request": payload},
        order="sorted",
    )
    return "gw:cache:" + hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedResponse:
    body: bytes
    stream: bool


class ResponseCache:
    """Entries are ``b"j" + JSON body`` or ``b"s" + SSE bytes``. Commands are built here and sent by the
    caller alongside admission and settlement, so the cache adds no round trip of its own."""

    def __init__(self, guard: RedisGuard, max_entry_bytes: int) -> None:
        self._guard = guard
        self._max_entry_bytes = max_entry_bytes

    @staticmethod
    def get_command(key: str) -> tuple[Arg, ...]:
        return ("GET", key)

    @staticmethod
    def decode(value: Any) -> CachedResponse | None:
        if not isinstance(value, bytes) or not value:
            return None
        return CachedResponse(body=value[1:], stream=value[:1] == b"s")

    def put_command(self, key: str, body: bytes, stream: bool, ttl_s: int) -> tuple[Arg, ...] | None:
        if len(body) > self._max_entry_bytes:
            return None
        return ("SET", key, (b"s" if stream else b"j") + body, "EX", ttl_s)

    async def get(self, key: str) -> CachedResponse | None:
        try:
            return self.decode(await self._guard.call(lambda: self._guard.pipe.execute(*self.get_command(key))))
        except RedisUnavailable:
            return None
