"""Batches in Redis: one record per batch, indexes per key and overall, the active set, and run leases.

``gw:batch:<id>`` is a hash: ``doc`` (the record, written by the gateway that runs the batch) and
``cancel`` (when a cancel was asked, written once by whoever asks): a cancel never races the runner's
writes. ``gw:batches:<key id>`` and ``gw:batches`` (sorted by creation) list them; ``gw:batches:active``
holds the batches a runner still has to take; ``gw:batch:lease:<id>`` names the gateway running one
(``SET NX PX``, renewed; a dead gateway's lease expires and another takes the batch over).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from redis.asyncio import Redis

from appliance.core.ids import BatchId

__all__ = ["TERMINAL", "BatchRecord", "BatchStore"]

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
ACTIVE = "gw:batches:active"
ALL = "gw:batches"
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class BatchRecord(msgspec.Struct, kw_only=True):
    """A batch as stored: OpenAI's fields and what the appliance needs to run it."""

    id: str
    key_id: str
    key_name: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    out_id: str  # the output and error files' ids, minted at creation, shown once the files exist
    err_id: str
    status: str = "validating"
    metadata: dict[str, str] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelled_at: int | None = None

    def view(self, cancel_at: int | None) -> dict[str, Any]:
        """OpenAI's batch object (a cancel asked of an unfinished batch shows as ``cancelling``)."""
        status = self.status
        if cancel_at is not None and status not in TERMINAL:
            status = "cancelling"
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "model": None,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window, "status": status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "in_progress_at": self.in_progress_at, "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at, "completed_at": self.completed_at, "failed_at": self.failed_at,
            "expired_at": self.expired_at, "cancelling_at": cancel_at, "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
            "metadata": self.metadata,
        }

    def admin_view(self, cancel_at: int | None) -> dict[str, Any]:
        """The dashboard's row (contract C6)."""
        view = self.view(cancel_at)
        return {"id": self.id, "key_id": self.key_id, "key_name": self.key_name, "status": view["status"],
                "endpoint": self.endpoint, "request_counts": view["request_counts"], "created_at": self.created_at,
                "tokens": self.prompt_tokens + self.completion_tokens}


def _key(batch_id: str) -> str:
    return f"gw:batch:{batch_id}"


def _by_key(key_id: str) -> str:
    return f"gw:batches:{key_id}"


class BatchStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def create(self, record: BatchRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(_key(record.id), "doc", msgspec.json.encode(record))
            pipe.zadd(_by_key(record.key_id), {record.id: record.created_at})
            pipe.zadd(ALL, {record.id: record.created_at})
            pipe.sadd(ACTIVE, record.id)
            await pipe.execute()

    async def get(self, batch_id: str) -> tuple[BatchRecord, int | None] | None:
        fields = await self._redis.hmget(_key(batch_id), ["doc", "cancel"])
        if fields[0] is None:
            return None
        cancel = int(fields[1]) if fields[1] is not None else None
        return msgspec.json.decode(fields[0], type=BatchRecord), cancel

    async def save(self, record: BatchRecord) -> None:
        """The runner's write; a record that reached its end leaves the active set."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(_key(record.id), "doc", msgspec.json.encode(record))
            if record.status in TERMINAL:
                pipe.srem(ACTIVE, record.id)
            await pipe.execute()

    async def request_cancel(self, batch_id: str) -> None:
        await self._redis.hsetnx(_key(batch_id), "cancel", int(time.time()))

    async def page(self, key_id: str | None, after: BatchId | None, limit: int) -> tuple[list[str], bool]:
        """Batch ids newest first (of one key, or all), after ``after``; and whether more follow."""
        index = _by_key(key_id) if key_id is not None else ALL
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(index, after)
            if rank is None:
                return [], False
            start = int(rank if isinstance(rank, int) else rank[0]) + 1
        ids = await self._redis.zrevrange(index, start, start + limit)
        names = [item.decode() if isinstance(item, bytes) else str(item) for item in ids]
        return names[:limit], len(names) > limit

    async def active(self) -> list[str]:
        return sorted(item.decode() if isinstance(item, bytes) else str(item)
                      for item in await self._redis.smembers(ACTIVE))

    async def take_lease(self, batch_id: str, owner: str, ttl_ms: int) -> bool:
        return bool(await self._redis.set(f"gw:batch:lease:{batch_id}", owner, nx=True, px=ttl_ms))

    async def renew_lease(self, batch_id: str, owner: str, ttl_ms: int) -> bool:
        return bool(await self._redis.eval(_RENEW, 1, f"gw:batch:lease:{batch_id}", owner, ttl_ms))

    async def release_lease(self, batch_id: str, owner: str) -> None:
        await self._redis.eval(_RELEASE, 1, f"gw:batch:lease:{batch_id}", owner)
