"""The gateway tells the balancer who is asking: key id, priority, weight from the key (never the secret);
a request may lower its priority, never raise it; client-sent copies of the hop headers never pass.

A real gateway process against a real Redis and the fake upstream as its balancer, which records the
headers of what it is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from appliance.core.hop import KEY_ID_HEADER, PRIORITY_HEADER, WEIGHT_HEADER
from tests.support.gateway_harness import TOKEN, Gateway, fake_upstream, gateway

pytestmark = pytest.mark.integration

MODEL = "fake-model"


class Recorded:
    """The headers of every request the fake balancer received, read from it (``GET /_stats``)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __getitem__(self, index: int) -> dict[str, str]:
        return dict(httpx.get(f"{self.url}/_stats", timeout=10).json()["headers"][index])


@pytest.fixture(scope="module")
def fake_balancer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Recorded]]:
    """The fake upstream as the balancer, one key waiting in its queue view."""
    with fake_upstream(tmp_path_factory.mktemp("fake-balancer"), MODEL) as url:
        row = {"key_id": "key_nobody", "priority": "batch", "waiting": 1}
        httpx.post(f"{url}/_mode", json={"queue_keys": [row]}, timeout=10).raise_for_status()
        yield url, Recorded(url)


@pytest.fixture(scope="module")
def stack(
    fake_balancer: tuple[str, Recorded], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Recorded]]:
    url, seen = fake_balancer
    with gateway(
        tmp_path_factory.mktemp("identity"), redis_url, url, settings={"cache_enabled": "false", "default_rpm": "0"}
    ) as running:
        yield running, seen


def bearer(secret: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", **extra}


def create_key(client: httpx.Client, admin: str, **spec: Any) -> dict[str, Any]:
    response = client.post("/admin/keys", json={"name": "team", "scopes": ["chat"], **spec}, headers=bearer(admin))
    assert response.status_code == 201, response.text
    return dict(response.json())


def chat(
    client: httpx.Client, secret: str, seen: Recorded, body: dict[str, Any] | None = None, **headers: str
) -> dict[str, str]:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **(body or {})}
    response = client.post("/v1/chat/completions", json=payload, headers=bearer(secret, **headers))
    assert response.status_code == 200, response.text
    return seen[-1]


def test_hop_headers_come_from_the_key_and_client_copies_never_pass(
    stack: tuple[Gateway, Recorded],
) -> None:
    running, seen = stack
    with running.client() as client:
        key = create_key(client, running.admin_key, priority="batch", weight=3)
        assert key["priority"] == "batch" and key["weight"] == 3.0
        forged = {KEY_ID_HEADER: "key_someone_else", PRIORITY_HEADER: "interactive", WEIGHT_HEADER: "1000"}
        sent = chat(client, key["key"], seen, **forged)
        assert sent[KEY_ID_HEADER] == key["id"] and sent[PRIORITY_HEADER] == "batch" and sent[WEIGHT_HEADER] == "3"
        assert sent["X-Internal-Token"] == TOKEN
        assert not any(key["key"] in value for value in sent.values())  # the id travels, never the secret
        # A batch key asking to be interactive stays batch (a request may lower, never raise).
        assert chat(client, key["key"], seen, **{"X-Priority": "interactive"})[PRIORITY_HEADER] == "batch"


def test_a_request_may_lower_its_priority_and_admins_may_change_the_key(
    stack: tuple[Gateway, Recorded],
) -> None:
    running, seen = stack
    admin = running.admin_key
    with running.client() as client:
        key = create_key(client, admin)
        assert key["priority"] == "interactive" and key["weight"] == 1.0
        assert chat(client, key["key"], seen)[PRIORITY_HEADER] == "interactive"
        assert chat(client, key["key"], seen, **{"X-Priority": "batch"})[PRIORITY_HEADER] == "batch"
        assert chat(client, key["key"], seen, {"service_tier": "flex"})[PRIORITY_HEADER] == "batch"
        assert chat(client, key["key"], seen, {"service_tier": "priority"})[PRIORITY_HEADER] == "interactive"

        response = client.patch(
            f"/admin/keys/{key['id']}", json={"priority": "batch", "weight": 0.5}, headers=bearer(admin)
        )
        assert response.status_code == 200 and response.json()["weight"] == 0.5
        sent = chat(client, key["key"], seen)
        assert sent[PRIORITY_HEADER] == "batch" and sent[WEIGHT_HEADER] == "0.5"

        for bad in ({"priority": "urgent"}, {"weight": 0}, {"weight": 5000}, {"color": "red"}):
            response = client.patch(f"/admin/keys/{key['id']}", json=bad, headers=bearer(admin))
            assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
        assert client.patch("/admin/keys/key_missing", json={"weight": 2}, headers=bearer(admin)).status_code == 404
        response = client.patch(f"/admin/keys/{key['id']}", json={"weight": 2}, headers=bearer(key["key"]))
        assert response.status_code == 403


def test_admin_queue_view_names_the_waiting_keys(stack: tuple[Gateway, Recorded]) -> None:
    running, seen = stack
    with running.client(running.admin_key) as client:
        response = client.get("/admin/queue")
    assert response.status_code == 200
    row = response.json()["models"][0]["keys"][0]
    assert row["key_id"] == "key_nobody" and row["name"] == "" and row["priority"] == "batch"
    assert KEY_ID_HEADER not in seen[-1]  # admin calls carry no caller identity
