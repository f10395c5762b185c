"""OpenAI's spelling of a rate limit's reset (the x-ratelimit-reset-* headers)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.admission import openai_duration


@pytest.mark.parametrize(("seconds", "spelled"), [
    (0, "0ms"), (-3, "0ms"), (0.0201, "21ms"), (0.999, "999ms"), (1, "1s"), (1.5, "1.5s"), (59.25, "59.25s"),
    (60, "1m0s"), (360, "6m0s"), (75.5, "1m15.5s"), (3723, "1h2m3s"), (86400, "24h0m0s"),
])
def test_spelling(seconds: float, spelled: str) -> None:
    assert openai_duration(seconds) == spelled


def _parse(text: str) -> float:
    if text.endswith("ms"):
        return int(text[:-2]) / 1000
    total, number = 0.0, ""
    for char in text:
        if char in "hms":
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[char]
            number = ""
        else:
            number += char
    return total


@given(st.floats(min_value=0, max_value=10 * 86400, allow_nan=False))
def test_never_earlier_than_the_wait_and_at_most_a_millisecond_later(seconds: float) -> None:
    assert seconds - 1e-9 <= _parse(openai_duration(seconds)) <= seconds + 0.001 + 1e-9
