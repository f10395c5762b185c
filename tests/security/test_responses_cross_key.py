"""Stored responses across keys, tried as an attacker would: key B against key A's responses.

Key A stores a response whose input holds a canary. Key B (same scopes; then an admin key) sends A's
response id raw and in other encodings (case, trailing control characters, percent escapes, path
tricks, a lookalike) to every route that takes one: retrieve, delete, ``input_items``, and
``previous_response_id`` of a new response. B must never see A's canary, never change A's response, and
get the 404 of an id that does not exist or the 400 of one that is malformed; nothing answers 5xx.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.stack import LoopbackAppliance

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CANARY = "canary-7f3a-responses"


def _variants(response_id: str) -> list[str]:
    """Path segments an attacker might send for ``response_id`` (each decodes to something else, or to it)."""
    escaped = "".join(f"%{ord(c):02X}" for c in response_id)
    return [response_id, escaped, response_id.upper(), response_id + "%0A", response_id + "%00", response_id + "%20",
            "%20" + response_id, response_id + "%2F", response_id + "%3F", response_id + "%23",
            "x%2F..%2F" + response_id, response_id.replace("e", "\u0435", 1), response_id[:-1]]


def test_key_b_never_reads_or_changes_key_as_stored_response(security_stack: LoopbackAppliance) -> None:
    stack = security_stack
    key_a = stack.create_key("responses-owner")
    attackers = {"same-scope": stack.create_key("responses-attacker"),
                 "admin": stack.create_key("responses-admin", ("chat", "admin"))}
    with httpx.Client(base_url=stack.gateway, timeout=120) as api:
        made = api.post("/v1/responses", headers={"Authorization": f"Bearer {key_a}"},
                        json={"model": stack.model, "input": f"Remember {CANARY}.", "max_output_tokens": 1})
        assert made.status_code == 200, made.text
        response_id = made.json()["id"]
        answers: list[tuple[str, int, str]] = []
        for who, key in attackers.items():
            auth = {"Authorization": f"Bearer {key}"}
            for raw in _variants(response_id):
                for method, path in (("GET", f"/v1/responses/{raw}"), ("DELETE", f"/v1/responses/{raw}"),
                                     ("GET", f"/v1/responses/{raw}/input_items")):
                    reply = api.request(method, path, headers=auth)
                    answers.append((f"{who} {method} {path}", reply.status_code, reply.text))
            for previous in (response_id, response_id.upper(), response_id + "\n", " " + response_id):
                reply = api.post("/v1/responses", headers=auth, json={
                    "model": stack.model, "input": "Repeat what I said.", "previous_response_id": previous,
                    "max_output_tokens": 8})
                answers.append((f"{who} previous_response_id={previous!r}", reply.status_code, reply.text))
        leaks = [(what, status) for what, status, body in answers if status < 400 or status >= 500 or CANARY in body]
        assert not leaks, leaks
        assert {status for _, status, _ in answers} <= {400, 404}, answers
        owner = api.get(f"/v1/responses/{response_id}/input_items", headers={"Authorization": f"Bearer {key_a}"})
        assert owner.status_code == 200 and CANARY in owner.text  # still there, unchanged, for its owner
    print(f"cross-key attempts on a stored response: {len(answers)}, every one 400/404, no canary")
