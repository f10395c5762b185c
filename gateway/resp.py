"""A small Redis client for the hot path: one connection, automatic pipelining.

Every command issued during one event-loop tick goes out in one write and the
replies come back in order, so 64 concurrent requests cost a handful of
syscalls instead of a few hundred (on a VM, each syscall that wakes another
process is the dominant cost). Admin paths keep using redis-py.

Errors use redis-py's exception types, so callers handle one family:
``ConnectionError`` (cannot reach Redis), ``TimeoutError`` (no reply in time;
the connection is dropped so replies can never be mismatched) and
``ResponseError`` (an ``-ERR`` reply).

Kept over redis-py's pipeline because it is faster on this path; ``appliance bench gateway`` measures the
two side by side on the same Redis and load (``resp_over_redispy`` for the whole gateway, ``redis_hot_path``
for the client alone).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlparse

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.hot_redis import Arg, PipelineClient

__all__ = ["Arg", "PipelinedRedis", "Script", "encode_command", "parse_reply"]

_INCOMPLETE = object()


def encode_command(args: Sequence[Arg]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse_reply(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:  # noqa: PLR0911 - one return per type
    """One RESP2 reply starting at ``pos``: (value, next position), or (_INCOMPLETE, pos)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
    after = end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return ResponseError(line.decode(errors="replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _INCOMPLETE, pos
        return bytes(buf[after:after + size]), after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse_reply(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, after
    raise RedisConnectionError(f"unexpected RESP type byte {kind!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedRedis) -> None:
        self._owner = owner

    def data_received(self, data: bytes) -> None:
        self._owner._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(exc)


class PipelinedRedis(PipelineClient):
    def __init__(self, host: str, port: int, *, db: int = 0, password: str | None = None,
                 username: str | None = None, timeout_s: float = 1.0) -> None:
        self._addr = (host, port)
        self._auth = [a for a in (username, password) if a]
        self._db = db
        self._timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._connecting: asyncio.Lock | None = None
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._buffer = bytearray()

    @classmethod
    def from_url(cls, url: str, timeout_s: float = 1.0, *, username: str | None = None,
                 password: str | None = None) -> PipelinedRedis:
        """``username``/``password`` (a service's ACL login, read from its password file) win over the URL's."""
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", ""):
            raise ValueError(f"only redis:// URLs are supported here, not {parsed.scheme}://")
        db = int(parsed.path.lstrip("/") or 0)
        if password is None:
            password = unquote(parsed.password) if parsed.password else None
            username = unquote(parsed.username) if parsed.username else None
        return cls(parsed.hostname or "127.0.0.1", parsed.port or 6379, db=db, password=password,
                   username=username, timeout_s=timeout_s)

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._transport is not None:
                return
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._timeout_s):
                    transport, _ = await loop.create_connection(lambda: _Protocol(self), *self._addr)
            except (OSError, TimeoutError) as exc:
                raise RedisConnectionError(f"cannot connect to redis at {self._addr}: {exc}") from exc
            self._transport = transport
            self._buffer.clear()
            setup = []
            if self._auth:
                setup.append(self._submit(("AUTH", *self._auth)))
            if self._db:
                setup.append(self._submit(("SELECT", self._db)))
            for future in setup:
                reply = await future
                if isinstance(reply, ResponseError):
                    raise RedisConnectionError(f"redis refused the connection setup: {reply}")

    def _submit(self, args: Sequence[Arg]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        self._out.append(encode_command(args))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None:
            data, self._out = b"".join(self._out), []
            self._transport.write(data)

    def _received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos = 0
        while pos < len(buf) and self._pending:
            value, pos_after = parse_reply(buf, pos)
            if value is _INCOMPLETE:
                break
            pos = pos_after
            future = self._pending.popleft()
            if not future.done():
                future.set_result(value)
        del buf[:pos]

    def _lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._out.clear()
        error = RedisConnectionError(f"redis connection lost: {exc or 'closed'}")
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def execute_many(self, *commands: Sequence[Arg]) -> list[Any]:
        """Send the commands together; reply values in order (an ``-ERR`` reply is a ResponseError value)."""
        if self._transport is None:
            await self._connect()
        futures = [self._submit(command) for command in commands]
        try:
            async with asyncio.timeout(self._timeout_s):
                return [await future for future in futures]
        except TimeoutError as exc:
            self._abort()  # replies still in flight would otherwise be matched to later commands
            raise RedisTimeoutError("redis did not answer in time") from exc

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class Script:
    """A Lua script called by hash, loaded again if Redis lost it (restart, SCRIPT FLUSH)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def command(self, keys: Sequence[Arg], args: Sequence[Arg]) -> tuple[Arg, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def fallback(self, keys: Sequence[Arg], args: Sequence[Arg]) -> tuple[Arg, ...]:
        return ("EVAL", self.source, len(keys), *keys, *args)

    @staticmethod
    def missing(reply: Any) -> bool:
        return isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")
