"""A batch's input file is checked line by line before it is accepted, and run in prefix order; a run's
journal on disk says exactly which lines are done, a torn last line cut off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from appliance.core.ids import BatchId
from gateway.batches.journal import RunJournal
from gateway.batches.lines import parse_lines, problems_error, run_order

CHAT = "/v1/chat/completions"


def _line(custom_id: str, content: str = "hi", **changes: Any) -> dict[str, Any]:
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": "m1", "messages": [{"role": "user", "content": content}]}}
    line.update(changes)
    return line


def _jsonl(*items: Any) -> bytes:
    return b"\n".join(item if isinstance(item, bytes) else json.dumps(item).encode() for item in items)


def _parse(raw: bytes, max_lines: int = 100) -> Any:
    return parse_lines(raw, CHAT, allows_model=lambda model: model == "m1", max_lines=max_lines,
                       max_line_bytes=4096)


def test_every_kind_of_bad_line_is_named_with_its_number() -> None:
    raw = _jsonl(_line("a"), _line("a"), _line("b", url="/v1/embeddings"), b"{not json", _line("c", body=[1]),
                 _line("d", body={"model": "m2", "messages": []}), _line("e", method="GET"),
                 _line("f", body={"model": "m1", "stream": True, "messages": []}), {**_line("g"), "custom_id": ""},
                 b"[1, 2]", _line("h", "x" * 5000))
    lines, problems = _parse(raw)
    assert [line.custom_id for line in lines] == ["a"]
    found = {p.number: p.message for p in problems}
    assert found == {
        2: "custom_id 'a' is used twice (first on line 1)",
        3: "url must be the batch's endpoint '/v1/chat/completions'",
        4: "is not valid JSON",
        5: "body must be a JSON object",
        6: "this API key may not use model 'm2'",
        7: "method must be POST",
        8: "body.stream is not supported in a batch",
        9: "custom_id must be a non-empty string of at most 512 characters",
        10: "is not a JSON object",
        11: found[11],
    }
    assert found[11] == "is 5139 bytes, above the limit of 4096 bytes per request"
    error = problems_error(problems, empty=False)
    assert error.status == 400 and error.param == "input_file_id"
    assert error.message.startswith("The input file has invalid lines: line 2: custom_id 'a' is used twice")
    assert "line 6: this API key may not use model 'm2'" in error.message and "(and 5 more bad lines)" in error.message


def test_over_max_lines_is_refused_and_blank_lines_are_skipped() -> None:
    lines, problems = _parse(_jsonl(_line("a"), b"", b"  ", _line("b"), _line("c")), max_lines=2)
    assert [line.custom_id for line in lines] == ["a", "b"]
    assert [(p.number, p.message) for p in problems] == [(5, "is past the limit of 2 requests per batch")]
    assert problems_error([], empty=True).code == "empty_batch"


def test_lines_sharing_a_prompt_prefix_run_next_to_each_other() -> None:
    contents = ["Summarise ticket 1", "Translate: chat", "Summarise ticket 2", "Translate: car", "Summarise ticket 3"]
    lines, _ = _parse(_jsonl(*(_line(str(i), c) for i, c in enumerate(contents))))
    order = [line.custom_id for line in run_order(lines)]
    assert order == ["0", "2", "4", "3", "1"]


@given(st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=20)), max_size=30,
                unique_by=lambda item: item[0]))
def test_run_order_sends_every_line_once(items: list[tuple[str, str]]) -> None:
    lines, problems = _parse(_jsonl(*(_line(custom_id, content) for custom_id, content in items)))
    assert not problems
    assert sorted(line.custom_id for line in run_order(lines)) == sorted(custom_id for custom_id, _ in items)


def _result(custom_id: str, status: int = 200) -> bytes:
    body = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    return json.dumps({"id": "r", "custom_id": custom_id, "response": {"status_code": status, "body": body},
                       "error": None}).encode() + b"\n"


def test_journal_recovers_what_is_done_and_cuts_a_torn_last_line(tmp_path: Path) -> None:
    upload = tmp_path / "upload.jsonl"
    upload.write_bytes(_jsonl(_line("a")))
    journal = RunJournal(tmp_path / "runs", BatchId.mint())
    journal.create(upload)
    upload.unlink()  # the batch keeps its own link to the input
    assert journal.input_path.read_bytes() == _jsonl(_line("a"))
    assert journal.lock()
    journal.append(_result("a"), error=False)
    journal.append(_result("b", 400), error=True)
    with journal.output_path(error=False).open("ab") as handle:
        handle.write(_result("c")[:20])  # a crash in the middle of a write
    journal.close()
    recovered = journal.recover()
    assert recovered.done == {"a", "b"}
    assert (recovered.completed, recovered.failed) == (1, 1)
    assert (recovered.prompt_tokens, recovered.completion_tokens) == (6, 4)
    assert journal.output_path(error=False).read_bytes() == _result("a")


def test_one_process_at_a_time_writes_a_run(tmp_path: Path) -> None:
    batch = BatchId.mint()
    (tmp_path / "in").write_bytes(b"")
    first, second = RunJournal(tmp_path, batch), RunJournal(tmp_path, batch)
    first.create(tmp_path / "in")
    assert first.lock()
    assert not second.lock()
    first.close()
    assert second.lock()
    second.close()
