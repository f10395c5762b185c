"""The Responses view of a chat answer (gateway/responses/events.py): stream events and the Response object."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.responses.events import ResponseEvents, encode_sse, whole_answer
from gateway.responses.request import ResponsesRequest
from gateway.responses.shape import Draft

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def _draft() -> Draft:
    counter = itertools.count()
    request = ResponsesRequest(model="m", input="hi")
    return Draft.of("resp_" + "0" * 48, 1, request, new_id=lambda prefix: f"{prefix}_{next(counter)}")


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points) if text[a:b]]


def _chunks(text: list[str], calls: list[tuple[str, list[str]]], finish: str,
            usage: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat chunks of an answer as a worker streams it: a role chunk, text, tool-call deltas, finish, usage."""
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in text]
    for index, (name, pieces) in enumerate(calls):
        first = {"index": index, "id": f"call_{index}", "type": "function",
                 "function": {"name": name, "arguments": pieces[0] if pieces else ""}}
        chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [first]}}]})
        more = [{"index": index, "function": {"arguments": piece}} for piece in pieces[1:]]
        chunks += [{"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]} for call in more]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({"choices": [], "usage": usage})
    return chunks


def _without_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k != "id"}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


answers = st.tuples(
    st.text(max_size=40), st.lists(st.integers(0, 40), max_size=6),
    st.lists(st.tuples(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.text(max_size=20),
                       st.lists(st.integers(0, 20), max_size=4)), max_size=3),
    st.sampled_from(["stop", "length", "tool_calls"]),
)
USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16, "prompt_tokens_details": {"cached_tokens": 7}}


@given(answers)
@example(("", [], [], "stop"))  # an empty answer is one empty message, streamed or not
@example(("", [], [("f", "{}", [])], "tool_calls"))  # a call alone: no message item
def test_the_event_sequence_is_well_formed_and_makes_the_whole_answers_response(answer: Any) -> None:
    text, cuts, raw_calls, finish = answer
    calls = [(name, _split(arguments, arg_cuts)) for name, arguments, arg_cuts in raw_calls]
    machine = ResponseEvents(_draft())
    events = machine.start()
    for chunk in _chunks(_split(text, cuts), calls, finish, USAGE):
        events += machine.chunk(chunk)
    events += machine.finish()

    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] in TERMINAL and not any(e["type"] in TERMINAL for e in events[:-1])
    final = events[-1]["response"]
    assert final["status"] == ("incomplete" if finish == "length" else "completed")
    if finish == "length":
        assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"] == {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 7}, "output_tokens": 5,
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 16}

    # Per output item: added, then its deltas, then done; what the deltas add up to is what done says.
    for index, item in enumerate(final["output"]):
        mine = [e for e in events if e.get("output_index") == index]
        assert mine[0]["type"] == "response.output_item.added" and mine[-1]["type"] == "response.output_item.done"
        assert mine[-1]["item"] == item
        deltas = "".join(e["delta"] for e in mine if e["type"].endswith(".delta"))
        if item["type"] == "message":
            assert deltas == item["content"][0]["text"]
            assert [e["type"] for e in mine if "content_part" in e["type"]] == [
                "response.content_part.added", "response.content_part.done"]
        else:
            assert deltas == item["arguments"]
    assert "".join(i["content"][0]["text"] for i in final["output"] if i["type"] == "message") == text
    assert [(i["name"], i["arguments"], i["call_id"]) for i in final["output"] if i["type"] == "function_call"] == [
        (name, "".join(pieces), f"call_{n}") for n, (name, pieces) in enumerate(calls)]

    # The same answer, whole, makes the same Response object.
    message = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = [{"id": f"call_{n}", "type": "function",
                                  "function": {"name": name, "arguments": "".join(pieces)}}
                                 for n, (name, pieces) in enumerate(calls)]
    whole = whole_answer(ResponseEvents(_draft()), {"choices": [{"index": 0, "message": message,
                                                                  "finish_reason": finish}], "usage": USAGE})
    assert _without_ids(whole) == _without_ids(final)
    for event in events:  # every event encodes as one SSE event whose data is the event itself
        head, data = encode_sse(event).decode().rstrip("\n").split("\n")
        assert head == f"event: {event['type']}" and json.loads(data.removeprefix("data: ")) == event


def test_a_cut_stream_fails_with_the_error_and_keeps_what_was_said() -> None:
    machine = ResponseEvents(_draft())
    machine.start()
    machine.chunk({"choices": [{"index": 0, "delta": {"content": "half"}}]})
    events = machine.finish({"error": {"message": "The model stream was interrupted.", "code": "stream_interrupted"}})
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.failed" and final["status"] == "failed"
    assert final["error"] == {"code": "stream_interrupted", "message": "The model stream was interrupted."}
    assert final["output"][0]["content"][0]["text"] == "half" and final["output"][0]["status"] == "incomplete"


def test_max_tool_calls_leaves_the_later_calls_out() -> None:
    machine = ResponseEvents(_draft(), max_tool_calls=1)
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": f"f{i}", "arguments": "{}"}}
             for i in range(3)]
    final = whole_answer(machine, {"choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": calls},
                                                "finish_reason": "tool_calls"}]})
    assert [item["name"] for item in final["output"]] == ["f0"]
