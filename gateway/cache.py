"""Response cache in Redis for repeated deterministic requests.

The key is a SHA-256 of the canonical request: endpoint, model id and the
model file's hash (so swapping the weights invalidates everything), the
messages or prompt, every sampling parameter, tools and response format, and
whether it streams. Only deterministic requests are cached by default
(``temperature == 0`` or a ``seed``). A stored entry is the exact body
(JSON, or the SSE bytes of a stream, replayed as SSE).

Bounded so that it can never crowd out keys and usage: Redis runs with ``maxmemory`` and ``noeviction``
(nothing is ever evicted, by Redis), and every store goes through :data:`CACHE_PUT`, a Lua script that
keeps the cache's own bytes under ``cache_max_bytes`` by deleting the oldest cache entries first (an
index of entries by store time and their sizes; entries that already expired count until they are
pruned, so the count errs high, never low). A client's ``X-Cache-TTL`` above ``cache_max_ttl_s`` is
lowered to it (the request is served, its entry lives at most that long).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from appliance.core.wire import ChatCompletionRequest, CompletionRequest
from gateway.redis_guard import RedisGuard, RedisUnavailable
from gateway.resp import Arg

__all__ = ["CACHE_BYTES", "CACHE_INDEX", "CACHE_PUT", "CACHE_SIZES", "CachePolicy", "ResponseCache", "cache_key",
           "cache_policy"]

CACHE_INDEX = "gw:cache-meta:index"  # sorted set: entry key -> store time
CACHE_SIZES = "gw:cache-meta:sizes"  # hash: entry key -> bytes counted
CACHE_BYTES = "gw:cache-meta:bytes"  # the sum of CACHE_SIZES
# Counted per entry on top of its value: the key in the entry, the index and the sizes hash.
ENTRY_OVERHEAD_BYTES = 256

# KEYS: entry, index, sizes, total. ARGV: value, ttl_s, cap bytes, max ttl s, overhead bytes, now (unix s).
# Returns 1 when stored, 0 when the entry alone is above the cap. Five calls when there is room; pruning
# (entries older than the longest TTL first, then the oldest) only when there is not.
CACHE_PUT = r"""
local size = string.len(ARGV[1]) + tonumber(ARGV[5])
local cap = tonumber(ARGV[3])
if size > cap then return 0 end
local now = tonumber(ARGV[6])
local old = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
local total = redis.call('INCRBY', KEYS[4], size - old)
if total > cap then
  local freed = 0
  local function forget(victim)
    freed = freed + tonumber(redis.call('HGET', KEYS[3], victim) or '0')
    redis.call('HDEL', KEYS[3], victim)
    redis.call('ZREM', KEYS[2], victim)
    if victim ~= KEYS[1] then redis.call('DEL', victim) end
  end
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]), 'LIMIT', 0, 64)
  for _, victim in ipairs(expired) do
    if victim ~= KEYS[1] then forget(victim) end
  end
  while total - freed > cap do
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
    if #oldest == 0 or oldest[1] == KEYS[1] then
      local rest = redis.call('ZRANGE', KEYS[2], 1, 1)
      if #rest == 0 then redis.call('SET', KEYS[4], size + freed) break end  -- nothing else indexed
      oldest = rest
    end
    forget(oldest[1])
  end
  total = redis.call('DECRBY', KEYS[4], freed)
  if total < size then redis.call('SET', KEYS[4], size) end  -- books drifted (keys deleted by hand): reset low
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], now, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
return 1
"""

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

    def __init__(self, guard: RedisGuard, max_entry_bytes: int, *, max_bytes: int = 64 << 20,
                 max_ttl_s: int = 86400) -> None:
        self._guard = guard
        self._max_entry_bytes = max_entry_bytes
        self._max_bytes = max_bytes
        self._max_ttl_s = max_ttl_s

    @staticmethod
    def get_command(key: str) -> tuple[Arg, ...]:
        return ("GET", key)

    @staticmethod
    def decode(value: Any) -> CachedResponse | None:
        if not isinstance(value, bytes) or not value:
            return None
        return CachedResponse(body=value[1:], stream=value[:1] == b"s")

    def put_command(self, key: str, body: bytes, stream: bool, ttl_s: int) -> tuple[Arg, ...] | None:
        """The store, as one command sent alongside the settlement (EVAL: a Redis restarted since the last
        store cannot lose it to NOSCRIPT; Redis keeps the compiled script by its hash)."""
        if len(body) > self._max_entry_bytes:
            return None
        value = (b"s" if stream else b"j") + body
        ttl = max(1, min(ttl_s, self._max_ttl_s))
        return ("EVAL", CACHE_PUT, 4, key, CACHE_INDEX, CACHE_SIZES, CACHE_BYTES,
                value, ttl, self._max_bytes, self._max_ttl_s, ENTRY_OVERHEAD_BYTES, f"{time.time():.3f}")

    async def get(self, key: str) -> CachedResponse | None:
        try:
            return self.decode(await self._guard.call(lambda: self._guard.pipe.execute(*self.get_command(key))))
        except RedisUnavailable:
            return None
