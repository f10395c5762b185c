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
import json
from dataclasses import dataclass
from typing import Any

from appliance.core.wire import ChatCompletionRequest, CompletionRequest
from gateway.redis_guard import RedisGuard, RedisUnavailable

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
    canonical = json.dumps(
        {"endpoint": endpoint, "model_sha256": model_sha256, "stream": request.stream, "request": payload},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    )
    return "gw:cache:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedResponse:
    body: bytes
    stream: bool


class ResponseCache:
    def __init__(self, guard: RedisGuard, max_entry_bytes: int) -> None:
        self._guard = guard
        self._max_entry_bytes = max_entry_bytes

    async def get(self, key: str) -> CachedResponse | None:
        try:
            value = await self._guard.call(lambda r: r.get(key))
        except RedisUnavailable:
            return None
        if not value:
            return None
        data = value if isinstance(value, bytes) else str(value).encode()
        kind, body = data[:1], data[1:]
        return CachedResponse(body=body, stream=kind == b"s")

    async def put(self, key: str, body: bytes, stream: bool, ttl_s: int) -> None:
        if len(body) > self._max_entry_bytes:
            return
        value = (b"s" if stream else b"j") + body
        try:
            await self._guard.call(lambda r: r.set(key, value, ex=ttl_s))
        except RedisUnavailable:
            return
