"""The internal hop's HTTP/1.1 client: keep-alive connections per service, parsed by httptools.

The hot-path client of the gateway (to the balancer and the RAG service) and of the balancer (to
its workers): it writes one request head, parses the answer with llhttp (``httptools``) and hands
body bytes over as they come (``Content-Length``, chunked and read-until-close bodies alike).
Internal services serve plain HTTP on the internal network: ``http://`` only.

Failures are ``HopError`` of one kind: ``connect`` (refused, or no connection within
``connect_timeout_s``), ``reset`` (the connection dropped or the answer is not HTTP), ``timeout``
(``read_timeout_s`` of silence) and ``stale`` (a kept-alive connection closed after the request was
written, before any answer).

The client never sends a request twice. A kept-alive connection is reused only while it is
younger than ``keepalive_s`` and, polled just before the write, still open with nothing
unread on it; one that fails the check is dropped before anything is written and the next (or
a new one) is used. Once the request is written the service may have read it, so a failure is
the caller's to handle (the balancer retries on another worker only within its retry budget;
the gateway answers 503).
"""

from __future__ import annotations

import asyncio
import collections
import select
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

__all__ = ["HopClient", "HopError", "HopResponse"]

_HIGH_WATER = 256 * 1024  # buffered body bytes before reading from the worker pauses
_ENCODING = ("utf-8", "surrogateescape")  # how aiohttp's server hands header values over


class HopError(Exception):
    """A failed exchange with a worker; ``kind`` is ``connect``, ``reset``, ``timeout`` or ``stale``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class _Connection(asyncio.Protocol):
    """One TCP connection; one exchange at a time. The parser calls the ``on_*`` methods."""

    def __init__(self, loop: asyncio.AbstractEventLoop, base: str,
                 on_idle_lost: Callable[[_Connection], None]) -> None:
        self._loop = loop
        self.base = base
        self._on_idle_lost = on_idle_lost
        self.idle = False  # in the pool, between exchanges
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reused = False
        self.idle_since = 0.0
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[str, str]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.received = 0
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.error: HopError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._framed = False  # Content-Length or chunked: the end is in the stream, not the close

    def begin(self) -> None:
        """Get ready for the next exchange on this connection (the parser goes on to the next message)."""
        self._reset_exchange()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport is not a registered subclass

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the worker asked to upgrade the connection")
        except httptools.HttpParserError as exc:
            self._fail(f"not an HTTP answer: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.idle:  # the worker closed a kept-alive connection (its idle timeout, a restart)
            self._on_idle_lost(self)
            return
        if self.head_done and not self.complete and not self._framed and self.error is None:
            self.complete = True  # a body without Content-Length or chunks ends with the connection
        elif not self.complete and self.error is None:
            self.error = HopError("reset", f"connection closed by the worker{f': {exc}' if exc else ''}")
        self._wake()

    def pause_writing(self) -> None:  # the request body is buffered by the transport; nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name.decode(*_ENCODING), value.decode(*_ENCODING)))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self.status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()
        for name, value in self.raw_headers:
            lower = name.lower()
            if lower == "content-length" or (lower == "transfer-encoding" and "chunked" in value.lower()):
                self._framed = True
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- used by the response ------------------------------------------------------------------

    def _fail(self, detail: str) -> None:
        self.error = HopError("reset", detail)
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def wait(self, timeout_s: float) -> None:
        """Until the parser makes progress, the connection ends, or ``timeout_s`` of silence."""
        waiter = self.waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(HopError("timeout", "the worker sent nothing for read_timeout_s"))


class HopResponse:
    """A worker's answer: status and headers now, the body as it arrives."""

    __slots__ = ("_conn", "_done", "_pool", "_read_timeout_s", "headers", "status")

    def __init__(self, conn: _Connection, pool: HopClient, read_timeout_s: float) -> None:
        self._conn = conn
        self._pool = pool
        self._read_timeout_s = read_timeout_s
        self._done = False
        self.status = conn.status
        self.headers: CIMultiDict[str] = CIMultiDict(conn.raw_headers)

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); ``b""`` at the end."""
        conn = self._conn
        while True:
            if conn.chunks:
                return conn.take()
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._read_timeout_s)

    async def read(self) -> bytes:
        """The whole body."""
        parts: list[bytes] = []
        while chunk := await self.readany():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def end_without_body(self) -> None:
        """The answer to HEAD: no body follows, and the connection is not reused."""
        self._conn.complete = True
        self._conn.keep_alive = False

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if it can carry another."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.complete and not conn.chunks and conn.keep_alive and not conn.lost and conn.error is None:
            self._pool.put_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection (the worker sees the hang-up and frees the slot)."""
        if not self._done:
            self._done = True
            self._conn.close()


class HopClient:
    """Keep-alive connections per worker ``http://host:port``; no limit (the workers' slots bound them)."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, keepalive_s: float) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: dict[str, list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, str]] = {}
        self._closed = False
        self._poll = select.poll()  # reused for the check before each reuse (one fd at a time)

    async def request(self, base: str, method: str, path: str, body: bytes,
                      headers: dict[str, str]) -> HopResponse:
        """Send ``method path`` with ``body`` to the worker at ``base`` once; return once the status line and
        headers are in."""
        head = self._head(base, method, path, headers) + b"Content-Length: %d\r\n\r\n" % len(body)
        conn = self._reuse(base) or await self._connect(base)
        response = await self._exchange(conn, head, body)
        if method == "HEAD":  # headers only, whatever Content-Length says; the parser cannot know: not reused
            response.end_without_body()
        return response

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes) -> HopResponse:
        transport = conn.transport
        assert transport is not None
        conn.begin()
        try:
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
            while not conn.head_done:
                if conn.error is not None:
                    if conn.reused and conn.received == 0:  # written, maybe read: never sent again from here
                        raise HopError("stale", "the worker closed a kept-alive connection without answering")
                    raise conn.error
                await conn.wait(self._read_timeout_s)
        except BaseException:
            conn.close()  # cancelled (client gone, worker ejected) or failed: nothing reuses it
            raise
        return HopResponse(conn, self, self._read_timeout_s)

    def _reuse(self, base: str) -> _Connection | None:
        """The newest idle connection to ``base`` that is young enough and still open, or None."""
        idle = self._idle.get(base)
        if not idle:
            return None
        expired_before = time.monotonic() - self._keepalive_s
        while idle:
            conn = idle.pop()
            conn.idle = False
            if conn.lost or conn.idle_since < expired_before or not self._still_open(conn.transport):
                conn.close()  # nothing was written on it: dropping it is not a resend
                continue
            conn.reused = True
            return conn
        return None

    async def _connect(self, base: str) -> _Connection:
        if self._closed:
            raise HopError("connect", "the balancer is shutting down")
        host, port, _ = self._target(base)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(loop, base, self._forget), host, port)
        except TimeoutError:
            raise HopError("connect", f"no connection within {self._connect_timeout_s} s") from None
        except OSError as exc:
            raise HopError("connect", f"{type(exc).__name__}: {exc}") from None
        return conn

    def put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.idle = True
        self._idle.setdefault(conn.base, []).append(conn)

    def _forget(self, conn: _Connection) -> None:
        """An idle connection the worker closed leaves the pool (a removed worker's too)."""
        conn.idle = False
        idle = self._idle.get(conn.base)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.base]

    def _target(self, base: str) -> tuple[str, int, str]:
        target = self._targets.get(base)
        if target is None:
            parts = urlsplit(base)
            if parts.scheme != "http":
                raise HopError("connect", f"workers are reached over http://, not {parts.scheme}://")
            target = self._targets[base] = (parts.hostname or "127.0.0.1", parts.port or 80, parts.netloc)
        return target

    def _head(self, base: str, method: str, path: str, headers: dict[str, str]) -> bytes:
        """The request head up to (not including) Content-Length."""
        lines = [f"{method} {path} HTTP/1.1\r\nHost: {self._target(base)[2]}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                continue  # never forward a header that could split the request
            lines.append(f"{name}: {value}\r\n")
        return "".join(lines).encode(*_ENCODING)

    def _still_open(self, transport: asyncio.Transport | None) -> bool:
        """Whether an idle connection can carry a request: open, and nothing (not even the worker's FIN, which
        the event loop may not have seen yet) waiting to be read on its socket. One ``poll`` with no wait."""
        if transport is None or transport.is_closing():
            return False
        try:
            fd = transport.get_extra_info("socket").fileno()
        except (AttributeError, OSError):
            return False
        if fd < 0:
            return False
        poll = self._poll
        poll.register(fd, select.POLLIN)
        try:
            return not poll.poll(0)  # readable (EOF or bytes nobody asked for), hung up or failed: not reusable
        finally:
            poll.unregister(fd)

    async def close(self) -> None:
        """Close every idle connection; connections in use close when their exchange ends."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
