"""Attack: key B reaches for key A's files and batches (Batch API) by every spelling of their ids.

B has the same scope as A. It sends A's file id and batch id raw and in encodings (case, percent
escapes, a trailing newline, a dot segment, a path into A's directory) to every route that takes one, and
as ``input_file_id`` of a batch of its own. Every attempt is a 400 (a malformed id, not echoed) or the 404
of an id that does not exist; A's file is unchanged and its batch not cancelled. An upload's filename
cannot place the file anywhere: it is stored under the id the gateway minted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from tests.support.stack import LoopbackAppliance, appliance_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CANARY = "canary-7f3a"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("batch-attack"), upstream="fake",
                         gateway_settings={"batch_poll_s": "60"}) as running:
        yield running


def _spellings(identifier: str, key_id: str) -> list[str]:
    return [identifier, identifier.upper(), f"{identifier}\n", f"{identifier} ", quote(identifier, safe=""),
            "".join(f"%{ord(c):02x}" for c in identifier), f"./{identifier}", f"../{key_id}/{identifier}",
            f"{identifier}.json", f"{identifier}%00", f"{identifier[:-1]}\u0660", f"{key_id}/{identifier}"]


def test_another_key_never_reaches_a_file_or_batch(stack: LoopbackAppliance) -> None:
    owner_key, thief_key = stack.create_key("owner"), stack.create_key("thief")
    with httpx.Client(base_url=stack.gateway, headers={"Authorization": f"Bearer {owner_key}"}, timeout=30) as owner, \
            httpx.Client(base_url=stack.gateway, headers={"Authorization": f"Bearer {thief_key}"}, timeout=30) as thief:
        _attack(stack, owner, thief)


def _attack(stack: LoopbackAppliance, owner: httpx.Client, thief: httpx.Client) -> None:
    line = {"custom_id": CANARY, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": stack.model, "messages": [{"role": "user", "content": CANARY}]}}
    uploaded = owner.post("/v1/files", data={"purpose": "batch"},
                          files={"file": ("../../../etc/passwd", json.dumps(line).encode())})
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    assert uploaded.json()["filename"] == "passwd"  # the name is a label; the file lives under its id
    batch = owner.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    batch_id = batch.json()["id"]
    owner_id = owner.get("/v1/batches").json()["data"][0]["id"]
    assert owner_id == batch_id

    key_id = "key_" + "0" * 12
    attempts = 0
    for spelled in _spellings(file_id, key_id):
        path = quote(spelled, safe="/%")
        for method, route in (("GET", f"/v1/files/{path}"), ("GET", f"/v1/files/{path}/content"),
                              ("DELETE", f"/v1/files/{path}")):
            answer = thief.request(method, route)
            attempts += 1
            assert answer.status_code in (400, 404), (method, route, answer.status_code)
            assert CANARY not in answer.text
        made = thief.post("/v1/batches", json={"input_file_id": spelled, "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"})
        attempts += 1
        assert made.status_code in (400, 404) and CANARY not in made.text, made.text
    for spelled in _spellings(batch_id, key_id):
        path = quote(spelled, safe="/%")
        for method, route in (("GET", f"/v1/batches/{path}"), ("POST", f"/v1/batches/{path}/cancel")):
            answer = thief.request(method, route)
            attempts += 1
            assert answer.status_code in (400, 404), (method, route, answer.status_code)
    assert attempts == 12 * 6
    assert thief.get("/v1/files").json()["data"] == [] and thief.get("/v1/batches").json()["data"] == []
    assert thief.get("/v1/batches", params={"after": batch_id}).json()["data"] == []
    # A's file and batch are as they were.
    assert owner.get(f"/v1/files/{file_id}/content").content == json.dumps(line).encode()
    assert owner.get(f"/v1/batches/{batch_id}").json()["cancelling_at"] is None
