import json
import re

from hypothesis import example, given
from hypothesis import strategies as st

from appliance.core.errors import error_body
from appliance.core.sse import DONE, SSEDecoder, encode_data, encode_error, encode_event

# Any code point, lone surrogates included: JSON input can spell them ("\\ud800") and st.text() leaves them out.
ANY_CHAR = st.characters(exclude_categories=())
any_text = st.text(alphabet=ANY_CHAR)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | any_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(alphabet=ANY_CHAR, max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    payloads=st.lists(st.dictionaries(st.text(alphabet=ANY_CHAR, max_size=8), json_values, max_size=4), max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=30),
)
@example(payloads=[{"content": "\ud800"}, {"x\udfff": ["a\udc00b", "\U0001f600"]}], cuts=[3, 1])
def test_round_trip_whatever_the_chunking(payloads: list[dict], cuts: list[int]) -> None:
    stream = b"".join(encode_data(p) for p in payloads) + DONE
    decoder, events, position = SSEDecoder(), [], 0
    for size in cuts:
        events += decoder.feed(stream[position : position + size])
        position += size
    events += decoder.feed(stream[position:])
    # What any JSON reader makes of the payloads (an adjacent high+low surrogate pair reads as one character).
    assert [e.json() for e in events[:-1]] == json.loads(json.dumps(payloads))
    assert events[-1].is_done


@given(text=st.text(alphabet=st.characters(exclude_categories=(), exclude_characters="\r")))
@example(text="\ud800")  # issue 16.8: found by chance once; UnicodeEncodeError before
@example(text="a\udfff\nb\ud83d")
def test_multiline_data_survives(text: str) -> None:
    (event,) = SSEDecoder().feed(encode_event(text, event="note"))
    assert event.event == "note"
    # Lone surrogates have no UTF-8 form: they arrive as U+FFFD, everything else unchanged.
    assert event.data == re.sub("[\ud800-\udfff]", "\ufffd", text)


def test_error_event_is_terminal_and_not_done() -> None:
    body = error_body("worker died", "server_error", code="upstream_error")
    events = SSEDecoder().feed(encode_data({"x": 1}) + encode_error(body))
    assert [e.is_done for e in events] == [False, False]
    assert events[-1].is_error
    assert events[-1].json() == body


def test_comments_and_crlf_are_handled() -> None:
    events = SSEDecoder().feed(b': keep-alive\r\n\r\ndata: {"a": 1}\r\n\r\n')
    assert [json.loads(e.data) for e in events] == [{"a": 1}]
