"""The gateway tells the balancer who is asking: key id, priority, weight from the key (never the secret);
a request may lower its priority, never raise it; client-sent copies of the hop headers never pass.

The gateway runs in process against a real Redis and a recording fake balancer on loopback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from appliance.core.hop import KEY_ID_HEADER, PRIORITY_HEADER, WEIGHT_HEADER
from tests.support.gateway_harness import TOKEN, Gateway, gateway

pytestmark = pytest.mark.integration

MODEL = "fake-model"
COMPLETION = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def _fake_balancer_app(seen: list[dict[str, str]]) -> web.Application:
    async def complete(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response(COMPLETION)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "healthy_workers": 1, "models": [MODEL]})

    async def workers(_: web.Request) -> web.Response:
        return web.json_response({"workers": [], "queue_depth": 0})

    async def queue(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        row = {"key_id": "key_nobody", "priority": "batch", "waiting": 1}
        return web.json_response(
            {
                "queue_depth": 1,
                "scheduling": "fair",
                "routing": "prefix",
                "models": [{"model": MODEL, "waiting": 1, "keys": [row]}],
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/workers", workers)
    app.router.add_get("/queue", queue)
    return app


@pytest.fixture(scope="module")
def fake_balancer() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A recording balancer on its own event loop in a thread (the gateway is a separate process)."""
    seen: list[dict[str, str]] = []
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        runner = web.AppRunner(_fake_balancer_app(seen), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        box["url"], box["runner"] = f"http://127.0.0.1:{runner.addresses[0][1]}", runner
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(30)
    assert started.is_set()
    try:
        yield box["url"], seen
    finally:
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def stack(
    fake_balancer: tuple[str, list[dict[str, str]]], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, list[dict[str, str]]]]:
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
    client: httpx.Client, secret: str, seen: list[dict[str, str]], body: dict[str, Any] | None = None, **headers: str
) -> dict[str, str]:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **(body or {})}
    response = client.post("/v1/chat/completions", json=payload, headers=bearer(secret, **headers))
    assert response.status_code == 200, response.text
    return seen[-1]


def test_hop_headers_come_from_the_key_and_client_copies_never_pass(
    stack: tuple[Gateway, list[dict[str, str]]],
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
    stack: tuple[Gateway, list[dict[str, str]]],
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


def test_admin_queue_view_names_the_waiting_keys(stack: tuple[Gateway, list[dict[str, str]]]) -> None:
    running, seen = stack
    with running.client(running.admin_key) as client:
        response = client.get("/admin/queue")
    assert response.status_code == 200
    row = response.json()["models"][0]["keys"][0]
    assert row["key_id"] == "key_nobody" and row["name"] == "" and row["priority"] == "batch"
    assert KEY_ID_HEADER not in seen[-1]  # admin calls carry no caller identity
