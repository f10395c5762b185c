"""The Batch API through the official ``openai`` SDK on a real worker (the shared clients stack).

Upload a JSONL file, create a batch, poll it to ``completed``, read the output and error files (a line
whose body the model refuses lands in the error file; the batch does not fail), cancel one, and check
that another key sees neither the files nor the batches (404, never 403), and that a file with bad lines
is refused with a 400 naming them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.support.stack import LoopbackAppliance

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CHAT = "/v1/chat/completions"
ENDED = ("completed", "failed", "expired", "cancelled")


def _line(custom_id: str, model: str, content: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "max_tokens": 4, "temperature": 0,
                     "messages": [{"role": "user", "content": content}], **body}}


def _upload(client: openai.OpenAI, lines: list[Any]) -> str:
    raw = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()
    return client.files.create(file=("requests.jsonl", raw), purpose="batch").id


def _results(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    rows = [json.loads(text) for text in client.files.content(file_id).text.splitlines()]
    by_id = {row["custom_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a custom_id appears twice"
    return by_id


def _ended(client: openai.OpenAI, batch_id: str, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in ENDED:
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    return batch


@pytest.fixture(scope="module")
def owner(clients_stack: LoopbackAppliance, new_chat_key: Callable[[str], str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{clients_stack.gateway}/v1", api_key=new_chat_key("batch-owner"),
                         max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def finished(owner: openai.OpenAI, clients_stack: LoopbackAppliance) -> Any:
    """A batch of five questions and one line the model refuses (max_tokens above its cap), run to its end."""
    model = clients_stack.model
    lines = [_line(f"q{i}", model, f"Name a colour. ({i})") for i in range(5)]
    lines.append(_line("too-long", model, "Hello", max_tokens=10**7))
    file_id = _upload(owner, lines)
    batch = owner.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                                 metadata={"purpose": "e2e"})
    assert batch.status == "validating" and batch.request_counts is not None
    assert batch.request_counts.total == 6 and batch.metadata == {"purpose": "e2e"}
    return _ended(owner, batch.id)


def test_a_batch_runs_to_completed_with_output_and_error_files(owner: openai.OpenAI, finished: Any) -> None:
    assert finished.status == "completed", finished
    counts = finished.request_counts
    assert (counts.total, counts.completed, counts.failed) == (6, 5, 1)
    assert finished.in_progress_at and finished.finalizing_at and finished.completed_at
    output = _results(owner, finished.output_file_id)
    assert set(output) == {f"q{i}" for i in range(5)}
    for row in output.values():
        assert row["error"] is None and row["id"].startswith("batch_req_")
        response = row["response"]
        assert response["status_code"] == 200 and response["request_id"] == row["id"]
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"]
        assert 0 < response["body"]["usage"]["completion_tokens"] <= 4
    errors = _results(owner, finished.error_file_id)
    assert set(errors) == {"too-long"}
    refused = errors["too-long"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["code"] == "max_tokens_exceeded"
    listed = {item.id: item for item in owner.files.list(purpose="batch_output")}
    assert {finished.output_file_id, finished.error_file_id} <= set(listed)
    assert finished.id in [batch.id for batch in owner.batches.list(limit=100)]


def test_files_upload_list_retrieve_content_delete(owner: openai.OpenAI) -> None:
    file_id = _upload(owner, ["{}"])
    item = owner.files.retrieve(file_id)
    assert (item.purpose, item.bytes, item.filename, item.status) == ("batch", 2, "requests.jsonl", "processed")
    assert owner.files.content(file_id).content == b"{}"
    assert file_id in [f.id for f in owner.files.list()]
    assert owner.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        owner.files.retrieve(file_id)


def test_cancel_stops_lines_not_started(owner: openai.OpenAI, clients_stack: LoopbackAppliance) -> None:
    lines = [_line(f"c{i}", clients_stack.model, f"Count to {i}.", max_tokens=24) for i in range(40)]
    batch = owner.batches.create(input_file_id=_upload(owner, lines), endpoint=CHAT, completion_window="24h")
    cancelling = owner.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    ended = _ended(owner, batch.id)
    assert ended.status == "cancelled" and ended.cancelled_at
    done = {**_results(owner, ended.output_file_id), **_results(owner, ended.error_file_id)}
    counts = ended.request_counts
    assert len(done) == counts.completed + counts.failed < 40


def test_an_ended_batch_cannot_be_cancelled(owner: openai.OpenAI, finished: Any) -> None:
    with pytest.raises(openai.ConflictError):
        owner.batches.cancel(finished.id)
    assert owner.batches.retrieve(finished.id).status == "completed"


def test_another_key_gets_404_on_files_and_batches(finished: Any, clients_stack: LoopbackAppliance,
                                                   new_chat_key: Callable[[str], str]) -> None:
    other = openai.OpenAI(base_url=f"{clients_stack.gateway}/v1", api_key=new_chat_key("batch-other"),
                          max_retries=0, timeout=60)
    for file_id in (finished.input_file_id, finished.output_file_id, finished.error_file_id):
        for attempt in (other.files.retrieve, other.files.content, other.files.delete):
            with pytest.raises(openai.NotFoundError):
                attempt(file_id)
    for call in (other.batches.retrieve, other.batches.cancel):
        with pytest.raises(openai.NotFoundError):
            call(finished.id)
    with pytest.raises(openai.NotFoundError):  # nor may it run a batch over another key's file
        other.batches.create(input_file_id=finished.input_file_id, endpoint=CHAT, completion_window="24h")
    assert not other.files.list().data and not other.batches.list().data


def test_a_file_with_bad_lines_is_refused_naming_them(owner: openai.OpenAI, clients_stack: LoopbackAppliance,
                                                      ) -> None:
    model = clients_stack.model
    file_id = _upload(owner, [_line("a", model, "hi"), _line("a", model, "again"), "not json",
                              {**_line("b", model, "hi"), "url": "/v1/embeddings"},
                              {**_line("c", model, "hi"), "body": "text"}])
    with pytest.raises(openai.BadRequestError) as refused:
        owner.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    message = refused.value.message
    assert "line 2: custom_id 'a' is used twice (first on line 1)" in message
    assert "line 3: is not valid JSON" in message and "line 4: url must be the batch's endpoint" in message
    assert "line 5: body must be a JSON object" in message
    with httpx.Client(base_url=clients_stack.gateway, timeout=60,
                      headers={"Authorization": f"Bearer {clients_stack.admin_key}"}) as admin:
        made = admin.post("/admin/keys", json={"name": "batch-narrow", "scopes": ["chat"], "models": ["another"]})
    narrow = openai.OpenAI(base_url=f"{clients_stack.gateway}/v1", api_key=made.json()["key"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as not_allowed:
        narrow.batches.create(input_file_id=_upload(narrow, [_line("a", model, "hi")]), endpoint=CHAT,
                              completion_window="24h")
    assert f"line 1: this API key may not use model '{model}'" in not_allowed.value.message
    for wrong in ({"completion_window": "1h"}, {"endpoint": "/v1/images"}):
        with pytest.raises(openai.BadRequestError):
            owner.batches.create(**{"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h",
                                    **wrong})  # type: ignore[arg-type]


def test_a_responses_batch_answers_in_responses_terms(owner: openai.OpenAI, clients_stack: LoopbackAppliance) -> None:
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": clients_stack.model, "input": f"Say a number. ({i})", "max_output_tokens": 4}}
             for i in range(2)]
    batch = owner.batches.create(input_file_id=_upload(owner, lines), endpoint="/v1/responses", completion_window="24h")
    ended = _ended(owner, batch.id)
    assert ended.status == "completed" and ended.request_counts is not None and ended.request_counts.completed == 2
    for row in _results(owner, ended.output_file_id).values():
        body = row["response"]["body"]
        assert body["object"] == "response" and body["id"].startswith("resp_")
        assert owner.responses.retrieve(body["id"]).id == body["id"]  # stored for the key, as a direct call is
