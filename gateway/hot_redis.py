"""The Redis client of the per-request hot path (admission script, cache lookups), as the gateway sees it.

:class:`HotRedis` is what the gateway calls; :class:`gateway.resp.PipelinedRedis` (one connection, every
command of an event-loop tick in one write) implements it, and ``create_app`` takes another factory (the
benchmark's redis-py pipeline). An implementation returns reply values in order, an ``-ERR`` reply as a
:class:`redis.exceptions.ResponseError` value (``NOSCRIPT ...`` kept as such, so
:meth:`gateway.resp.Script.missing` works), and raises redis-py's ``ConnectionError``/``TimeoutError`` when
Redis cannot answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from redis.exceptions import ResponseError

__all__ = ["Arg", "HotRedis", "PipelineClient"]

Arg = str | bytes | int | float


class HotRedis(Protocol):
    async def execute_many(self, *commands: Sequence[Arg]) -> list[Any]: ...

    async def execute(self, *args: Arg) -> Any: ...

    async def close(self) -> None: ...


class PipelineClient:
    """A pipelining client: one command is a pipeline of one, an ``-ERR`` reply raised."""

    async def execute_many(self, *commands: Sequence[Arg]) -> list[Any]:
        raise NotImplementedError

    async def execute(self, *args: Arg) -> Any:
        (reply,) = await self.execute_many(args)
        if isinstance(reply, ResponseError):
            raise reply
        return reply
