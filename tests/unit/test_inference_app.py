"""The worker app before and without a model: 503 while loading, failure reported, errors shaped."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

from inference.app import create_app
from inference.model import LoadedModel, ModelRefused
from inference.settings import WorkerSettings

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOKEN = "t0ken-padded-to-at-least-32-characters"


def _app_client(loader: Callable[[WorkerSettings], LoadedModel]) -> TestClient:  # type: ignore[type-arg]
    app = create_app(WorkerSettings(model_alias="m"), loader=loader, internal_token=TOKEN)
    return TestClient(TestServer(app))


@pytest.fixture
async def loading() -> AsyncIterator[tuple[TestClient, threading.Event]]:  # type: ignore[type-arg]
    release = threading.Event()

    def slow_loader(_: WorkerSettings) -> LoadedModel:
        release.wait(10)
        raise ModelRefused("released")

    client = _app_client(slow_loader)
    await client.start_server()
    try:
        yield client, release
    finally:
        release.set()
        await client.close()


async def test_health_is_503_while_loading_and_requests_are_refused(
    loading: tuple[TestClient, threading.Event],  # type: ignore[type-arg]
) -> None:
    client, _ = loading
    response = await client.get("/health")
    assert response.status == 503
    assert await response.json() == {"status": "loading", "model": "m"}
    response = await client.post("/v1/completions", json={"model": "m", "prompt": "x"},
                                 headers={"X-Internal-Token": TOKEN})
    assert response.status == 503 and response.headers["Retry-After"]
    assert (await response.json())["error"]["code"] == "loading"


async def test_internal_token_checked_before_anything_else(
    loading: tuple[TestClient, threading.Event],  # type: ignore[type-arg]
) -> None:
    client, _ = loading
    response = await client.post("/v1/completions", data=b"junk")
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_api_key"
    assert (await client.get("/metrics")).status == 200


async def test_a_refused_model_is_reported_on_health() -> None:
    def refusing(_: WorkerSettings) -> LoadedModel:
        raise ModelRefused("model x has sha256 abc, which is not in allowed_sha256")

    client = _app_client(refusing)
    await client.start_server()
    try:
        for _ in range(100):
            body = await (await client.get("/health")).json()
            if body["status"] == "failed":
                break
            await asyncio.sleep(0.01)
        assert body["status"] == "failed" and "allowed_sha256" in body["error"]
    finally:
        await client.close()
