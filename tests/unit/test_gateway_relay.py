"""The gateway's stream relay: whole events whatever the chunking, bytes untouched unless usage is hidden,
and the usage appended to a streaming body always the one the worker reads."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from appliance.core.wire import ChatCompletionRequest, parse_json
from gateway.generation import with_usage
from gateway.relay import SSESplitter, StreamOutcome, relay_stream

CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = (b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],'
         b'"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}\n\n')
DONE = b"data: [DONE]\n\n"
QUEUED = b": queued position=2 eta_s=1.5\n\n"

events = st.lists(st.sampled_from([CHUNK, USAGE, QUEUED, b"event: error\ndata: {}\n\n", b"data: a\ndata: b\n\n"]),
                  min_size=1, max_size=8)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(events, st.lists(st.integers(min_value=0), max_size=12), st.booleans())
@example([CHUNK], [len(CHUNK) - 1], False)  # the blank line cut in two
@example([CHUNK], [len(CHUNK) - 1], True)  # CRLF: "\r" ends one chunk, "\n" starts the next
def test_splitter_gives_back_whole_events_whatever_the_chunking(wanted: list[bytes], cuts: list[int],
                                                                crlf: bool) -> None:
    stream = b"".join(wanted)
    wire = stream.replace(b"\n", b"\r\n") if crlf else stream
    splitter = SSESplitter()
    got = [event for piece in chunked(wire, cuts) for event in splitter.feed(piece)]
    assert got == wanted


class _Response:
    """An answer being streamed, as the hop client hands it over."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = list(pieces)
        self.released = False

    async def readany(self) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""

    def release(self) -> None:
        self.released = True


def relay(pieces: list[bytes], *, hide_usage: bool,
          citations: list[dict[str, Any]] | None = None) -> tuple[bytes, StreamOutcome, list[StreamOutcome]]:
    ended: list[StreamOutcome] = []
    outcome = StreamOutcome(recorded=bytearray())

    async def run() -> bytes:
        response = _Response(pieces)
        out = b"".join([part async for part in relay_stream(response, outcome, hide_usage=hide_usage,  # type: ignore[arg-type]
                                                             citations=citations, on_end=ended.append)])
        assert response.released
        return out

    return asyncio.run(run()), outcome, ended


def test_events_pass_as_the_same_bytes_and_usage_is_counted() -> None:
    stream = QUEUED + CHUNK + CHUNK + USAGE + DONE
    out, outcome, ended = relay(chunked(stream, [5, 90, 130, 200]), hide_usage=False)
    assert out == stream
    assert ended == [outcome] and outcome.finished
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 2)
    assert outcome.recorded == CHUNK + CHUNK + USAGE + DONE  # the queue note is not cached


def test_usage_the_client_did_not_ask_for_is_dropped_but_counted() -> None:
    out, outcome, _ = relay([CHUNK + USAGE + DONE], hide_usage=True)
    assert out == CHUNK + DONE
    assert outcome.prompt_tokens == 7


def test_citations_go_before_done() -> None:
    out, _, _ = relay([CHUNK, DONE], hide_usage=False, citations=[{"source": "a.txt"}])
    _head, citation, done = out.split(b"\n\n", 2)
    assert json.loads(citation.removeprefix(b"data: "))["citations"] == [{"source": "a.txt"}]
    assert done == DONE


def test_a_cut_stream_ends_with_an_error_event_and_no_done() -> None:
    out, outcome, ended = relay([CHUNK, CHUNK[:10]], hide_usage=False)
    assert out.startswith(CHUNK) and b"event: error" in out and b"[DONE]" not in out
    assert not outcome.finished and len(ended) == 1


def test_an_upstream_error_event_ends_the_stream() -> None:
    error = b'event: error\ndata: {"error":{"message":"boom"}}\n\n'
    out, outcome, _ = relay([CHUNK + error + CHUNK + DONE], hide_usage=False)
    assert out == CHUNK + error
    assert not outcome.finished


BODY = b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}'


@given(st.sampled_from([b"", b'"stream_options":null,', b'"stream_options":{"include_usage":false},',
                        b'"stream\\u005foptions":{"include_usage":false},', b'"stream\\u005foptions":null,']),
       st.sampled_from([b"", b" \n", b"\t"]))
def test_the_usage_asked_for_is_the_one_the_worker_reads(member: bytes, trailing: bytes) -> None:
    body = b'{' + member + BODY[1:] + trailing
    assert parse_json(ChatCompletionRequest, with_usage(body)).stream_options is not None
    assert parse_json(ChatCompletionRequest, with_usage(body)).stream_options.include_usage  # type: ignore[union-attr]
