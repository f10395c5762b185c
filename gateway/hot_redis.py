"""The Redis client of the per-request hot path (admission script, cache lookups), as the gateway sees it.

Two implementations answer the same three calls: :class:`gateway.resp.PipelinedRedis` (one connection,
every command of an event-loop tick in one write) and :class:`RedisPyPipeline` (redis-py's own pipeline
over its connection pool). ``appliance bench gateway`` runs the gateway with each, side by side.

Both return reply values in order, an ``-ERR`` reply as a :class:`redis.exceptions.ResponseError` value
(``NOSCRIPT ...`` kept as such, so :meth:`gateway.resp.Script.missing` works with either), and raise
redis-py's ``ConnectionError``/``TimeoutError`` when Redis cannot answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["Arg", "HotRedis", "PipelineClient", "RedisPyPipeline"]

Arg = str | bytes | int | float


class HotRedis(Protocol):
    async def execute_many(self, *commands: Sequence[Arg]) -> list[Any]: ...

    async def execute(self, *args: Arg) -> Any: ...

    async def close(self) -> None: ...


def _as_reply(value: Any) -> Any:
    if isinstance(value, NoScriptError):  # redis-py strips the error's "NOSCRIPT" prefix
        return ResponseError(f"NOSCRIPT {value}")
    return value


class PipelineClient:
    """What both clients share: one command is a pipeline of one, an ``-ERR`` reply raised."""

    async def execute_many(self, *commands: Sequence[Arg]) -> list[Any]:
        raise NotImplementedError

    async def execute(self, *args: Arg) -> Any:
        (reply,) = await self.execute_many(args)
        if isinstance(reply, ResponseError):
            raise reply
        return reply


class RedisPyPipeline(PipelineClient):
    """redis-py's pipeline (no MULTI) per call, on ``client``'s connection pool; ``close`` leaves the client open."""

    def __init__(self, client: Redis) -> None:
        self._client = client

    async def execute_many(self, *commands: Sequence[Arg]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            replies = await pipe.execute(raise_on_error=False)
        return [_as_reply(reply) for reply in replies]

    async def close(self) -> None:
        return None
