"""The worker hop's HTTP/1.1 client against scripted servers on loopback, under asyncio's loop and uvloop.

Each server answers with exact bytes, so every framing (Content-Length, chunked, until close), every
failure kind (connect, reset, timeout, stale) and keep-alive reuse is produced on demand.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop

from appliance.core.hop_client import HopClient, HopError

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Run = Callable[[Coroutine[Any, Any, None]], None]
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    """Run a coroutine on a fresh loop of the parametrised kind (the balancer runs on uvloop)."""
    with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
        yield runner.run


class Server:
    """Counts connections and the requests read on them; ``script`` answers each request."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                await self.script(reader, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serve(script: Script) -> AsyncIterator[tuple[Server, str]]:
    server = Server(script)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        listener.close()


def answer(data: bytes, *, close: bool = False) -> Script:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return script


def client(read_timeout_s: float = 5.0, keepalive_s: float = 30.0) -> HopClient:
    return HopClient(connect_timeout_s=2.0, read_timeout_s=read_timeout_s, keepalive_s=keepalive_s)


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\": 1}\r\n"


def test_content_length_answers_reuse_one_connection(run: Run) -> None:
    async def main() -> None:
        async with serve(answer(OK)) as (server, base):
            up = client()
            for index in range(3):
                response = await up.request(base, "POST", "/v1/chat/completions?x=1", b'{"n": %d}' % index,
                                            {"Content-Type": "application/json", "X-Request-Id": f"r{index}"})
                assert response.status == 200 and response.headers["content-type"] == "application/json"
                assert await response.read() == b'{"ok": 1}\r\n'
                response.release()
            assert server.connections == 1 and len(server.requests) == 3
            first = server.requests[0]
            assert first.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
            assert b"\r\nX-Request-Id: r0\r\nContent-Length: 8\r\n\r\n{\"n\": 0}" in first
            await up.close()

    run(main())


def test_chunked_stream_arrives_piece_by_piece(run: Run) -> None:
    gate = asyncio.Event()

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        await gate.wait()  # the client must see the first event before the rest exists
        writer.write(b"12\r\ndata: [DONE]\n\nxxxx\r\n0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(script) as (server, base):
            up = client()
            response = await up.request(base, "POST", "/v1/completions", b"{}", {})
            assert response.headers["transfer-encoding"] == "chunked"
            assert await response.readany() == b"data: first\n\n"
            gate.set()
            assert await response.read() == b"data: [DONE]\n\nxxxx"
            assert await response.readany() == b""
            response.release()
            again = await up.request(base, "POST", "/v1/completions", b"{}", {})  # reused after a chunked body
            gate.set()
            assert (await again.read()).endswith(b"xxxx")
            again.release()
            assert server.connections == 1
            await up.close()

    run(main())


def test_body_without_length_ends_with_the_connection(run: Run) -> None:
    async def main() -> None:
        async with serve(answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", close=True)) as (
                server, base):
            up = client()
            for _ in range(2):
                response = await up.request(base, "GET", "/x", b"", {})
                assert await response.read() == b"all of it"
                response.release()  # not kept: the worker closed it
            assert server.connections == 2
            await up.close()

    run(main())


def test_refused_connection_is_a_connect_failure(run: Run) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused

        async def main() -> None:
            with pytest.raises(HopError) as caught:
                await client().request(f"http://127.0.0.1:{port}", "POST", "/v1/x", b"{}", {})
            assert caught.value.kind == "connect"

        run(main())


def test_silence_is_a_timeout_and_a_drop_mid_body_is_a_reset(run: Run) -> None:
    async def silent(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers (until the client hangs up)

    async def main() -> None:
        async with serve(silent) as (_, base):
            with pytest.raises(HopError) as caught:
                await client(read_timeout_s=0.2).request(base, "POST", "/v1/x", b"{}", {})
            assert caught.value.kind == "timeout"
        cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
        async with serve(answer(cut, close=True)) as (_, base):
            response = await client().request(base, "POST", "/v1/x", b"{}", {})
            assert await response.readany() == b"only part"
            with pytest.raises(HopError) as caught:
                await response.readany()
            assert caught.value.kind == "reset"
            response.release()
        async with serve(answer(b"SSH-2.0-not-http\r\n\r\n")) as (_, base):
            with pytest.raises(HopError) as caught:
                await client().request(base, "POST", "/v1/x", b"{}", {})
            assert caught.value.kind == "reset" and "not an HTTP answer" in str(caught.value)

    run(main())


def test_a_request_the_worker_may_have_read_is_not_sent_twice(run: Run) -> None:
    """The worker reads a request on a kept-alive connection and closes it without a word (a crash, or its
    idle timeout racing the request): the request was written, so the client does not send it again."""
    async def main() -> None:
        async with serve(answer(OK)) as (server, base):
            up = client()
            response = await up.request(base, "POST", "/v1/x", b'{"first": 1}', {})
            await response.read()
            response.release()
            assert len(up._idle[base]) == 1
            server.script = answer(b"", close=True)
            with pytest.raises(HopError) as caught:
                await up.request(base, "POST", "/v1/x", b'{"second": 2}', {})
            assert caught.value.kind == "stale"
            await asyncio.sleep(0.05)  # room for a resend to arrive, were one made
            assert [r.endswith(b'{"second": 2}') for r in server.requests] == [False, True]  # read once
            assert server.connections == 1
            server.script = answer(OK)
            response = await up.request(base, "POST", "/v1/x", b"{}", {})  # the next request: a new connection
            assert await response.read() == b'{"ok": 1}\r\n' and server.connections == 2
            await up.close()

    run(main())


def test_a_fresh_connection_closed_without_an_answer_is_a_reset(run: Run) -> None:
    async def main() -> None:
        async with serve(answer(b"", close=True)) as (server, base):
            with pytest.raises(HopError) as caught:
                await client().request(base, "POST", "/v1/x", b"{}", {})
            assert caught.value.kind == "reset"
            assert server.connections == 1 and len(server.requests) == 1

    run(main())


class ThreadedWorker:
    """A loopback HTTP server on its own thread: it can close a kept-alive connection while the client's
    event loop is busy, so the loop has not yet seen the close when the next request is written."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.closed = threading.Event()
        self.close_after = 1  # requests answered on the first connection before the server closes it
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        first = True
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                answered = 0
                while data := self._read_request(conn):
                    self.requests.append(data)
                    conn.sendall(OK)
                    answered += 1
                    if first and answered == self.close_after:
                        break
                first = False
            self.closed.set()

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return b""
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        return head + b"\r\n\r\n" + body

    def stop(self) -> None:
        self.listener.close()


def test_a_connection_closed_before_the_request_is_written_is_not_used(run: Run) -> None:
    """The worker closed the idle connection but the event loop has not processed the close yet: the client
    sees it before writing (a poll of the socket) and sends the request once, on a new connection."""
    worker = ThreadedWorker()

    async def main() -> None:
        up = client()
        response = await up.request(worker.base, "POST", "/v1/x", b"{}", {})
        await response.read()
        response.release()
        assert worker.closed.wait(5)  # blocks the loop: the close is in the kernel, not yet seen by the loop
        assert len(up._idle[worker.base]) == 1
        response = await up.request(worker.base, "POST", "/v1/x", b'{"second": 2}', {})
        assert await response.read() == b'{"ok": 1}\r\n'
        response.release()
        assert [r.endswith(b'{"second": 2}') for r in worker.requests] == [False, True]
        await up.close()

    try:
        run(main())
    finally:
        worker.stop()


def test_an_idle_connection_past_keepalive_s_is_not_reused(run: Run) -> None:
    async def main() -> None:
        async with serve(answer(OK)) as (server, base):
            up = client(keepalive_s=0.05)
            for _ in range(2):
                response = await up.request(base, "POST", "/v1/x", b"{}", {})
                await response.read()
                response.release()
                await asyncio.sleep(0.1)
            assert server.connections == 2 and len(server.requests) == 2
            await up.close()

    run(main())


def test_workers_are_reached_over_plain_http_only(run: Run) -> None:
    async def main() -> None:
        with pytest.raises(HopError) as caught:
            await client().request("https://127.0.0.1:1", "POST", "/v1/x", b"{}", {})
        assert caught.value.kind == "connect" and "http://" in str(caught.value)

    run(main())


def test_a_header_that_could_split_the_request_is_not_sent(run: Run) -> None:
    async def main() -> None:
        async with serve(answer(OK)) as (server, base):
            up = client()
            response = await up.request(base, "POST", "/v1/x", b"{}", {"X-Ok": "yes", "X-Bad": "a\r\nX-Evil: 1"})
            await response.read()
            response.release()
            assert b"X-Ok: yes\r\n" in server.requests[0] and b"Evil" not in server.requests[0]
            await up.close()

    run(main())


def test_a_large_body_is_read_whole_with_reading_paused_between(run: Run) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB: over the client's buffer, so reading pauses and resumes

    async def main() -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload)
        async with serve(answer(head + payload)) as (_, base):
            up = client()
            response = await up.request(base, "POST", "/v1/x", payload, {})
            got = bytearray()
            while chunk := await response.readany():
                got += chunk
                await asyncio.sleep(0)  # a slow consumer
            assert bytes(got) == payload
            response.release()
            await up.close()

    run(main())


def test_closing_mid_answer_hangs_up_on_the_worker(run: Run) -> None:
    hung_up = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await reader.read()  # EOF once the client closes
        hung_up.set()

    async def main() -> None:
        async with serve(endless) as (server, base):
            up = client()
            response = await up.request(base, "POST", "/v1/x", b"{}", {})
            assert await response.readany() == b"hello"
            response.close()
            await asyncio.wait_for(hung_up.wait(), 5)
            assert not up._idle.get(base)  # never reused
            assert server.connections == 1
            await up.close()

    run(main())


def test_head_answer_has_no_body_whatever_its_length_says(run: Run) -> None:
    async def main() -> None:
        async with serve(answer(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 40\r\n\r\n")) as (_, base):
            up = client(read_timeout_s=30)
            response = await asyncio.wait_for(up.request(base, "HEAD", "/v1/chat/completions", b"", {}), 5)
            assert response.status == 405
            assert await asyncio.wait_for(response.read(), 5) == b""  # not a 30 s wait for 40 bytes
            response.release()
            assert not up._idle.get(base)  # the parser still expects a body: never reused
            await up.close()

    run(main())


def test_an_idle_connection_the_worker_closes_leaves_the_pool(run: Run) -> None:
    async def close_after_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # an idle timeout on the worker's side, after the client kept the connection

    async def main() -> None:
        async with serve(close_after_answer) as (server, base):
            up = client()
            response = await up.request(base, "POST", "/v1/x", b"{}", {})
            await response.read()
            response.release()
            assert len(up._idle[base]) == 1
            for _ in range(100):
                if base not in up._idle:
                    break
                await asyncio.sleep(0.02)
            assert base not in up._idle, "a connection the worker closed stays in the pool"
            server.script = answer(OK)
            response = await up.request(base, "POST", "/v1/x", b"{}", {})
            assert await response.read() == b'{"ok": 1}\r\n' and server.connections == 2
            await up.close()

    run(main())
