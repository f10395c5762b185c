"""The one edge of the aiohttp services (appliance/core/edge.py): token, request id, error shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from appliance.core.edge import edge_middleware, require_token
from appliance.core.errors import bad_request
from appliance.core.hop import INTERNAL_TOKEN_HEADER, REQUEST_ID_HEADER
from appliance.core.request_id import current_request_id

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOKEN = "s3cret-t0ken-padded-to-32-characters"
GOOD = {INTERNAL_TOKEN_HEADER: TOKEN}
ERROR_KEYS = {"message", "type", "param", "code"}


async def _echo_id(_: web.Request) -> web.Response:
    return web.json_response({"request_id": current_request_id()})


async def _refuse(_: web.Request) -> web.Response:
    raise bad_request("no thanks", param="x", code="refused")


async def _read_body(request: web.Request) -> web.Response:
    return web.json_response({"bytes": len(await request.read())})


async def _crash(_: web.Request) -> web.Response:
    raise RuntimeError("secret detail that must not leak")


async def _self_checked(request: web.Request) -> web.Response:
    require_token(request, TOKEN.encode())
    return web.json_response({"ok": True})


def _app(token: str | None, observed: list[tuple[str, int]] | None = None) -> web.Application:
    def observe(request: web.Request, response: web.StreamResponse) -> None:
        if observed is not None:
            observed.append((request.path, response.status))

    app = web.Application(middlewares=[edge_middleware("test service", token, observe=observe)],
                          client_max_size=1024)
    app.router.add_get("/health", _echo_id)
    app.router.add_get("/id", _echo_id)
    app.router.add_post("/refuse", _refuse)
    app.router.add_get("/crash", _crash)
    app.router.add_post("/small", _read_body)
    app.router.add_get("/self", _self_checked)
    return app


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    async with TestClient(TestServer(_app(TOKEN))) as test_client:
        yield test_client


async def _error(response: ClientResponse, status: int) -> dict[str, object]:
    assert response.status == status
    body = await response.json()
    assert set(body["error"]) == ERROR_KEYS
    return dict(body["error"])


async def test_token_required_except_on_public_paths(client: TestClient) -> None:  # type: ignore[type-arg]
    assert (await client.get("/health")).status == 200
    error = await _error(await client.get("/id"), 401)
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert (await _error(await client.get("/id", headers={INTERNAL_TOKEN_HEADER: "wrong"}), 401))["code"]
    assert (await client.get("/id", headers=GOOD)).status == 200


async def test_a_token_header_that_is_not_utf8_is_a_401_not_a_500(client: TestClient) -> None:  # type: ignore[type-arg]
    # Latin-1 bytes that are not UTF-8: aiohttp decodes them with surrogates; comparing must not raise.
    headers = {INTERNAL_TOKEN_HEADER: b"\xff\xfe".decode("latin-1")}
    await _error(await client.get("/id", headers=headers), 401)


async def test_request_id_kept_when_sane_minted_otherwise(client: TestClient) -> None:  # type: ignore[type-arg]
    kept = await client.get("/id", headers={**GOOD, REQUEST_ID_HEADER: "abc-123"})
    assert kept.headers[REQUEST_ID_HEADER] == "abc-123" and (await kept.json())["request_id"] == "abc-123"
    minted = await client.get("/id", headers={**GOOD, REQUEST_ID_HEADER: "bad id\twith spaces"})
    assert minted.headers[REQUEST_ID_HEADER] != "bad id\twith spaces"
    assert (await minted.json())["request_id"] == minted.headers[REQUEST_ID_HEADER]
    refused = await client.get("/id")  # the id is on errors too, for the logs a user quotes
    assert refused.status == 401 and refused.headers[REQUEST_ID_HEADER]


async def test_errors_are_openai_shaped(client: TestClient) -> None:  # type: ignore[type-arg]
    error = await _error(await client.post("/refuse", headers=GOOD), 400)
    assert (error["param"], error["code"]) == ("x", "refused")
    assert (await _error(await client.get("/nowhere", headers=GOOD), 404))["code"] == "not_found"
    response = await client.delete("/id", headers=GOOD)
    assert (await _error(response, 405))["code"] == "method_not_allowed" and "GET" in response.headers["Allow"]
    too_big = await client.post("/small", data=b"x" * 4096, headers=GOOD)
    assert (await _error(too_big, 413))["code"] == "payload_too_large"


async def test_an_unexpected_exception_is_a_500_that_says_nothing_of_its_cause(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    response = await client.get("/crash", headers=GOOD)
    error = await _error(response, 500)
    assert error["type"] == "server_error" and "secret detail" not in str(error["message"])


async def test_routes_that_check_the_token_themselves() -> None:
    observed: list[tuple[str, int]] = []
    async with TestClient(TestServer(_app(None, observed))) as test_client:
        assert (await test_client.get("/id")).status == 200  # no token configured at the edge
        await _error(await test_client.get("/self"), 401)
        assert (await test_client.get("/self", headers=GOOD)).status == 200
    assert observed == [("/id", 200), ("/self", 401), ("/self", 200)]
