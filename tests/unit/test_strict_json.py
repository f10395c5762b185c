"""Lone UTF-16 surrogates in JSON input (issue 16.8): refused by the body parser, harmless in SSE and logs."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from appliance.core import strict_json
from appliance.core.logging import JsonFormatter, _PlainFormatter
from appliance.core.sse import encode_data, encode_event

ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=20)


@pytest.mark.parametrize(
    "raw",
    [
        '"\\ud800"',
        '{"messages": [{"role": "user", "content": "hi \\udfff"}]}',
        '{"k\\uDC00": 1}',
        '[1, [2, {"a": "\\ud83d"}]]',
        b'{"input": ["ok", "\\ud800x"]}',
        '"\ud800"',
    ],
)
def test_lone_surrogates_are_refused_as_a_json_decode_error(raw: str | bytes) -> None:
    with pytest.raises(json.JSONDecodeError, match="lone UTF-16 surrogate"):
        strict_json.loads(raw)


@pytest.mark.parametrize(
    "raw, value",
    [
        ('"\\ud83d\\ude00"', "\U0001f600"),  # a pair is one character
        ('"\\\\ud800"', "\\ud800"),  # an escaped backslash: the text is the six characters, not a surrogate
        ('{"a": "\\u00e9"}', {"a": "é"}),
        (b'{"big": 12345678901234567890, "f": 1.5e300}', {"big": 12345678901234567890, "f": 1.5e300}),
    ],
)
def test_everything_else_reads_as_json_loads_reads_it(raw: str | bytes, value: object) -> None:
    assert strict_json.loads(raw) == value == json.loads(raw)


@given(ANY_TEXT)
@example("\ud800")
@example("a\udc00")
def test_strict_loads_accepts_exactly_what_encodes(text: str) -> None:
    raw = json.dumps({"content": text})  # ASCII with \\u escapes, as a client would send it
    decoded = json.loads(raw)["content"]
    try:
        decoded.encode()
    except UnicodeEncodeError:
        with pytest.raises(strict_json.UnencodableText):
            strict_json.loads(raw)
    else:
        assert strict_json.loads(raw) == {"content": decoded}


@given(ANY_TEXT)
@example("\ud800")
def test_sse_events_with_any_text_encode(text: str) -> None:
    assert encode_data({"choices": [{"delta": {"content": text}}]}).startswith(b"data: ")
    assert encode_event(text).endswith(b"\n\n")


@given(ANY_TEXT)
@example("\ud800")
def test_log_lines_with_any_text_encode_and_keep_the_text(text: str) -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "prompt %s", (text,), None)
    record.model = text
    line = JsonFormatter("test").format(record)
    line.encode()  # a file or pipe with strict UTF-8 takes it
    entry = json.loads(line)
    read_back = json.loads(json.dumps(text))  # what a JSON reader makes of it (a split pair reads as one)
    assert entry["msg"] == f"prompt {read_back}" and entry["model"] == read_back  # escaped, not lost
    _PlainFormatter().format(record).encode()


def test_a_strict_utf8_log_file_gets_the_line() -> None:
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    logger = logging.getLogger("tests.strict_json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("bad input %r", "\ud800", extra={"param": "x\udfff"})
    finally:
        logger.removeHandler(handler)
    stream.flush()
    text = stream.buffer.getvalue().decode()  # type: ignore[attr-defined]
    assert json.loads(text)["param"] == "x\udfff"
