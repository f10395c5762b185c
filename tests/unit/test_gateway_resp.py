"""The pipelined Redis client's RESP codec: any reply, split anywhere, parses to the same value."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from gateway.resp import _INCOMPLETE, Script, encode_command, parse_reply

values = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5), max_leaves=20,
)


def encode_reply(value: Any) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(encode_reply(item) for item in value)


@settings(deadline=None)  # a loaded machine must not fail a codec test on time
@given(st.lists(values, min_size=1, max_size=4), st.data())
def test_replies_split_at_any_point_parse_back_in_order(replies: list[Any], data: st.DataObject) -> None:
    wire = b"".join(encode_reply(r) for r in replies)
    cut = data.draw(st.integers(0, len(wire)))
    buf = bytearray(wire[:cut])
    parsed, pos = [], 0
    for chunk in (wire[cut:],):
        while True:
            value, after = parse_reply(buf, pos)
            if value is _INCOMPLETE:
                break
            parsed.append(value)
            pos = after
        buf += chunk
    while pos < len(buf):
        value, pos = parse_reply(buf, pos)
        assert value is not _INCOMPLETE
        parsed.append(value)
    assert parsed == replies


def test_status_and_error_replies() -> None:
    assert parse_reply(b"+OK\r\n", 0) == (b"OK", 5)
    error, _ = parse_reply(b"-NOSCRIPT No matching script\r\n", 0)
    assert isinstance(error, ResponseError) and Script.missing(error)
    assert parse_reply(b"*2\r\n:1\r\n", 0)[0] is _INCOMPLETE


@settings(deadline=None)
@given(st.lists(st.binary(max_size=30) | st.integers() | st.text(max_size=10), min_size=1, max_size=6))
def test_commands_encode_as_resp_arrays(args: list[Any]) -> None:
    wire = encode_command(args)
    value, end = parse_reply(wire, 0)
    assert end == len(wire)
    assert value == [a if isinstance(a, bytes) else str(a).encode() for a in args]


def test_script_commands_call_by_hash_and_fall_back_to_source() -> None:
    script = Script("return 1")
    assert script.command(["k"], [1]) == ("EVALSHA", script.sha, 1, "k", 1)
    assert script.fallback([], [])[:2] == ("EVAL", "return 1")
