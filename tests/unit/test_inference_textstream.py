"""TextStream: chunks never split a character, never leak part of a stop sequence."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from inference.textstream import TextStream, held_suffix_length


def run(pieces: list[bytes], stops: tuple[str, ...]) -> tuple[list[str], bool]:
    stream = TextStream(stops)
    out = [stream.feed(piece) for piece in pieces]
    out.append(stream.finish())
    return out, stream.stopped


def split_bytes(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


TEXT = st.text(alphabet=st.sampled_from([*list("ab \n"), "é", "中", "😀"]), max_size=40)
STOPS = st.lists(st.text(alphabet=st.sampled_from([*list("ab\n"), "é", "😀"]), min_size=1, max_size=4),
                 max_size=3).map(tuple)


@given(TEXT, st.lists(st.integers(min_value=0), max_size=12))
def test_without_stops_output_is_the_text_and_every_chunk_is_whole_characters(text: str, cuts: list[int]) -> None:
    chunks, stopped = run(split_bytes(text.encode(), cuts), ())
    assert "".join(chunks) == text
    assert not stopped
    assert all("\ufffd" not in chunk for chunk in chunks)


@given(TEXT, STOPS, st.lists(st.integers(min_value=0), max_size=12))
def test_stops_cut_the_text_and_never_leak(text: str, stops: tuple[str, ...], cuts: list[int]) -> None:
    chunks, stopped = run(split_bytes(text.encode(), cuts), stops)
    output = "".join(chunks)
    assert text.startswith(output)
    assert not any(stop in output for stop in stops)
    assert "\ufffd" not in output
    if stopped:
        assert any(text.startswith(output + stop) for stop in stops)
    else:
        assert output == text
        assert not any(stop in text for stop in stops)


def test_partial_stop_is_held_back_until_it_fails_to_match() -> None:
    stream = TextStream(("\nUser:",))
    assert stream.feed(b"Hello\nUs") == "Hello"
    assert stream.feed(b"ually") == "\nUsually"
    assert stream.feed(b"\nUser: hi") == ""
    assert stream.stopped


def test_multibyte_character_split_over_tokens_is_emitted_whole() -> None:
    stream = TextStream()
    data = "😀".encode()
    assert stream.feed(data[:1]) == ""
    assert stream.feed(data[1:3]) == ""
    assert stream.feed(data[3:]) == "😀"


def test_held_suffix_length() -> None:
    assert held_suffix_length("abc", ("cd",)) == 1
    assert held_suffix_length("abc", ("bcx", "x")) == 2
    assert held_suffix_length("xab", ("abc",)) == 2
    assert held_suffix_length("abc", ("abc",)) == 0
    assert held_suffix_length("", ("a",)) == 0
