"""Web sign-in against a real OpenID provider (the certified ``oidc-provider`` package, tests/support), a real
gateway process and real Redis, driven over HTTP as a browser would (cookies, redirects, the provider's form).

No upstream is needed: what is checked is sign-in, sessions, CSRF, users and their keys (the chat through a
session runs in real Chromium against real workers in tests/browser/test_oidc_ui.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gateway.auth.oidc import OidcClient, ProviderError, new_oidc_http
from gateway.auth.settings import AuthSettings
from gateway.auth.tokens import TokenRefused
from tests.support.gateway_harness import Gateway, gateway
from tests.support.oidc_provider import IdpUser, OidcProvider, installed, oidc_provider, sign_in_over_http
from tests.support.processes import free_port, run_cli
from tests.support.strict import STRICT

pytestmark = pytest.mark.integration

ALICE = IdpUser("alice", ("staff",))
ROOT = IdpUser("root", ("staff", "appliance-admins"))
MALLORY = IdpUser("mallory", ("contractors",))
DORA = IdpUser("dora", ("staff",))
EVE = IdpUser("eve", ("staff",))
NOWHERE = "http://127.0.0.1:9"  # no balancer: nothing here needs one


@pytest.fixture(scope="module")
def idp_and_gateway(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[OidcProvider, Gateway]]:
    if not installed() and not STRICT:
        pytest.skip("oidc-provider is not installed (./scripts/test installs it into .cache/npm)")
    tmp = tmp_path_factory.mktemp("oidc")
    port = free_port()
    redirect = f"http://127.0.0.1:{port}/auth/callback"
    with oidc_provider(tmp / "idp", redirect_uris=[redirect], users=[ALICE, ROOT, MALLORY, DORA, EVE]) as idp:
        env = idp.auth_settings(redirect, allowed_groups="staff", admin_groups="appliance-admins",
                                group_limits=json.dumps({"staff": {"rpm": 30, "tpd": 50000}}))
        with gateway(tmp, redis_url, NOWHERE, port=port, env_extra=env) as gw:
            yield idp, gw


@pytest.fixture
def browsers(idp_and_gateway: tuple[OidcProvider, Gateway]) -> Iterator[Callable[[], httpx.Client]]:
    """Browser-like clients (cookies kept) on the gateway, all closed after the test."""
    with ExitStack() as stack:
        yield lambda: stack.enter_context(httpx.Client(base_url=idp_and_gateway[1].url, timeout=30))


def _sign_in(browser: httpx.Client, user: IdpUser) -> httpx.Client:
    """``browser`` after /auth/login, the provider's form and /auth/callback."""
    start = browser.get("/auth/login", params={"return_to": "/admin"})
    assert start.status_code == 302, start.text
    callback = sign_in_over_http(browser, start.headers["location"], user)
    done = browser.get(str(callback))
    assert done.status_code == 303, done.text
    return browser


def _set_cookie(response: httpx.Response, name: str) -> str:
    return next(value for value in response.headers.get_list("set-cookie") if value.startswith(f"{name}="))


def test_sign_in_opens_a_session_with_the_users_own_key(idp_and_gateway: tuple[OidcProvider, Gateway],
        browsers: Callable[[], httpx.Client]) -> None:
    idp, gw = idp_and_gateway
    browser = browsers()
    start = browser.get("/auth/login", params={"return_to": "/admin"})
    query = parse_qs(urlsplit(start.headers["location"]).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"] and query["nonce"]
    preauth = _set_cookie(start, "appliance_preauth").lower()
    assert "httponly" in preauth and "samesite=lax" in preauth and "max-age=600" in preauth
    callback = sign_in_over_http(browser, start.headers["location"], ALICE)
    done = browser.get(str(callback))
    assert done.status_code == 303 and done.headers["location"] == "/admin"
    cookie = _set_cookie(done, "appliance_session").lower()
    assert all(part in cookie for part in ("httponly", "samesite=lax", "path=/")) and "secure" not in cookie

    me = browser.get("/auth/me")
    assert me.status_code == 200, me.text
    body = me.json()
    assert body["user"] == {"subject": ALICE.sub, "email": "alice@example.com", "name": "Alice", "role": "user",
                            "groups": ["staff"]}
    assert len(body["csrf_token"]) >= 32 and body["expires_at"] > time.time() and body["methods"] == ["oidc"]
    # A user is not an admin: the session's key has no admin scope.
    assert browser.get("/admin/keys").status_code == 403
    with gw.client(gw.admin_key) as admin:
        users = {row["subject"]: row for row in admin.get("/admin/users").json()["data"]}
        key = admin.get(f"/admin/keys/{users[ALICE.sub]['key_id']}").json()
    assert users[ALICE.sub]["role"] == "user" and users[ALICE.sub]["groups"] == ["staff"]
    assert key["name"] == "user:alice@example.com" and key["limits"]["rpm"] == 30 and key["limits"]["tpd"] == 50000
    assert set(key["scopes"]) == {"chat", "embeddings", "collections"}
    # The user's key secret never reaches the browser, and the client secret never the logs.
    logs = gw.service.logs()
    assert "sk-app-" not in me.text and idp.client_secret not in logs
    # Nor the session cookie, the CSRF token or an ID token (a JWT starts with eyJ) in the gateway's logs.
    assert browser.cookies["appliance_session"] not in logs and body["csrf_token"] not in logs and "eyJ" not in logs


def test_an_admin_group_member_gets_the_admin_scope_and_csrf_guards_every_change(
        idp_and_gateway: tuple[OidcProvider, Gateway],
        browsers: Callable[[], httpx.Client]) -> None:
    _idp, gw = idp_and_gateway
    browser = _sign_in(browsers(), ROOT)
    csrf = browser.get("/auth/me").json()["csrf_token"]
    assert browser.get("/admin/users").status_code == 200  # GET needs no token
    body = {"name": "made-by-root", "scopes": ["chat"]}
    for headers in ({}, {"X-CSRF-Token": "0" * len(csrf)}, {"X-CSRF-Token": ""}):
        refused = browser.post("/admin/keys", json=body, headers=headers)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    assert browser.post("/auth/logout").status_code == 403  # signing out is a change too
    created = browser.post("/admin/keys", json=body, headers={"X-CSRF-Token": csrf})
    assert created.status_code == 201, created.text
    with gw.client(gw.admin_key) as admin:
        root = admin.get(f"/admin/users/{ROOT.sub}").json()
    assert root["role"] == "admin" and root["role_groups"] == ["appliance-admins"] and root["sessions"] >= 1


def test_a_cookie_replayed_after_sign_out_is_refused(idp_and_gateway: tuple[OidcProvider, Gateway],
        browsers: Callable[[], httpx.Client]) -> None:
    _idp, gw = idp_and_gateway
    browser = _sign_in(browsers(), ROOT)
    stolen = browser.cookies["appliance_session"]
    csrf = browser.get("/auth/me").json()["csrf_token"]
    out = browser.post("/auth/logout", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 200 and "max-age=0" in _set_cookie(out, "appliance_session").lower()
    with httpx.Client(base_url=gw.url, timeout=30, cookies={"appliance_session": stolen}) as replay:
        assert replay.get("/auth/me").status_code == 401
        assert replay.get("/admin/users").status_code == 401
        refused = replay.post("/admin/keys", json={"name": "x", "scopes": ["chat"]}, headers={"X-CSRF-Token": csrf})
        assert refused.status_code == 401


def test_a_user_of_a_disallowed_group_is_refused(idp_and_gateway: tuple[OidcProvider, Gateway],
        browsers: Callable[[], httpx.Client]) -> None:
    _, gw = idp_and_gateway
    browser = browsers()
    start = browser.get("/auth/login")
    done = browser.get(str(sign_in_over_http(browser, start.headers["location"], MALLORY)))
    assert done.status_code == 303 and done.headers["location"] == "/?signin_error=group"
    assert "appliance_session" not in browser.cookies
    assert browser.get("/auth/me").status_code == 401
    with gw.client(gw.admin_key) as admin:
        assert MALLORY.sub not in {row["subject"] for row in admin.get("/admin/users").json()["data"]}
    audit = (gw.data_dir / "audit" / "audit.jsonl").read_text().splitlines()
    refusals = [json.loads(line) for line in audit if '"auth.sign_in_failed"' in line]
    assert any(r["target"] == f"user:{MALLORY.sub}" and r["detail"]["reason"] == "group" for r in refusals)


def test_the_callback_is_single_use_and_bound_to_the_browser_that_started(
        browsers: Callable[[], httpx.Client]) -> None:
    browser = browsers()
    start = browser.get("/auth/login")
    callback = sign_in_over_http(browser, start.headers["location"], ALICE)
    # Another browser (an attacker's callback URL sent to a victim: login CSRF) gets no session.
    other = browsers()
    carried = other.get(str(callback))
    assert carried.status_code == 303 and "signin_error=" in carried.headers["location"]
    assert "appliance_session" not in other.cookies
    # The state was spent by that attempt: the right browser cannot reuse it either, nor replay it.
    again = browser.get(str(callback))
    assert again.status_code == 303 and "signin_error=expired" in again.headers["location"]


def test_a_disabled_users_session_stops_at_the_next_request(idp_and_gateway: tuple[OidcProvider, Gateway],
        browsers: Callable[[], httpx.Client]) -> None:
    _idp, gw = idp_and_gateway
    browser = _sign_in(browsers(), DORA)
    assert browser.get("/auth/me").status_code == 200
    with gw.client(gw.admin_key) as admin:
        disabled = admin.post(f"/admin/users/{DORA.sub}/disable")
        assert disabled.status_code == 200 and disabled.json()["disabled"] is True
        assert browser.get("/auth/me").status_code == 401
        again = browsers()
        start = again.get("/auth/login")
        refused = again.get(str(sign_in_over_http(again, start.headers["location"], DORA)))
        assert refused.headers["location"] == "/?signin_error=user_disabled"
        assert admin.post(f"/admin/users/{DORA.sub}/enable").status_code == 200
    assert _sign_in(browsers(), DORA).get("/auth/me").status_code == 200
    with gw.client(gw.admin_key) as admin:
        assert admin.get("/admin/users/no/such").status_code == 404
        assert admin.get("/admin/users/%20bad").status_code == 400


def test_a_pasted_key_is_refused_from_the_web_ui_when_key_sign_in_is_off(
        idp_and_gateway: tuple[OidcProvider, Gateway]) -> None:
    _, gw = idp_and_gateway
    with gw.client(gw.admin_key) as program:
        assert program.get("/admin/keys").status_code == 200  # programs keep their keys
        page = program.get("/admin/keys", headers={"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"})
        assert page.status_code == 403 and page.json()["error"]["code"] == "key_sign_in_disabled"
    assert httpx.get(f"{gw.url}/auth/me").json()["methods"] == ["oidc"]


async def _real_id_token(client: OidcClient, nonce: str) -> str:
    """An ID token the provider issued to the gateway's client for ALICE (her form submitted over HTTP)."""
    url = await client.authorization_url(state="state-" + nonce, nonce=nonce, code_verifier="v" * 64)

    def browse() -> httpx.URL:
        with httpx.Client(timeout=30) as browser:
            return sign_in_over_http(browser, url, ALICE)

    callback = await asyncio.to_thread(browse)
    code = parse_qs(urlsplit(str(callback)).query)["code"][0]
    return await client.exchange(code=code, code_verifier="v" * 64)


def _tamper(token: str, **claims: Any) -> str:
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**body, **claims}).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_a_real_providers_id_token_is_refused_when_tampered_expired_or_for_another_nonce(
        idp_and_gateway: tuple[OidcProvider, Gateway], tmp_path: Path) -> None:
    idp, gw = idp_and_gateway
    settings = AuthSettings(oidc_issuer=idp.issuer, client_id=idp.client_id, client_secret_file=idp.secret_file,
                            redirect_url=f"{gw.url}/auth/callback", scopes=["openid", "email", "profile", "groups"])
    now = [time.time()]
    nonce = "nonce-for-this-test-0123456789abcdef"

    async def verdicts() -> list[str]:
        client = OidcClient(settings, new_oidc_http(settings), clock=lambda: now[0])
        token = await _real_id_token(client, nonce)

        async def verdict(candidate: str, expected_nonce: str = nonce) -> str:
            try:
                claims = await client.verified_claims(candidate, nonce=expected_nonce)
            except TokenRefused as refused:
                return refused.reason
            return f"accepted {claims['sub']}"

        flipped = token[:-6] + ("B" * 6 if token.endswith("AAAAAA") else "A" * 6)
        results = [await verdict(token), await verdict(_tamper(token, sub=ROOT.sub)),
                   await verdict(_tamper(token, groups=["appliance-admins"])), await verdict(flipped),
                   await verdict(token, "another-nonce-0123456789abcdef0123")]
        now[0] += 3600  # the provider issued it for 600 s; an hour later it is expired
        results.append(await verdict(token))
        await client.close()
        return results

    assert asyncio.run(verdicts()) == [f"accepted {ALICE.sub}", "bad_signature", "bad_signature", "bad_signature",
                                       "invalid_nonce", "expired"]


def test_appliance_users_lists_shows_disables_and_enables(idp_and_gateway: tuple[OidcProvider, Gateway],
                                                          browsers: Callable[[], httpx.Client],
                                                          tmp_path: Path) -> None:
    _, gw = idp_and_gateway
    browser = _sign_in(browsers(), ALICE)
    (tmp_path / "empty.toml").write_text("")
    env = {"APPLIANCE_CONFIG": str(tmp_path / "empty.toml"), "APPLIANCE_DATA_DIR": str(gw.data_dir),
           "APPLIANCE_RUNTIME_GATEWAY_PORT": gw.url.rsplit(":", 1)[1], "NO_COLOR": "1", "COLUMNS": "200"}
    listed = json.loads(run_cli(["users", "list", "--json"], env=env, cwd=tmp_path).stdout)
    alice = next(row for row in listed if row["subject"] == ALICE.sub)
    assert alice["groups"] == ["staff"] and alice["role"] == "user" and alice["disabled"] is False
    assert "usage_today_tokens" in alice and alice["last_sign_in"] > 0
    shown = run_cli(["users", "show", ALICE.sub], env=env, cwd=tmp_path).stdout
    assert "alice@example.com" in shown and "role user" in shown and "groups: staff" in shown
    disabled = run_cli(["users", "disable", ALICE.sub], env=env, cwd=tmp_path)
    assert "session(s) ended" in disabled.stderr and browser.get("/auth/me").status_code == 401
    assert json.loads(run_cli(["users", "show", ALICE.sub, "--json"], env=env, cwd=tmp_path).stdout)["disabled"]
    run_cli(["users", "enable", ALICE.sub], env=env, cwd=tmp_path)
    missing = run_cli(["users", "show", "nobody-here"], env=env, cwd=tmp_path, check=False)
    assert missing.returncode == 1 and "404" in missing.stderr
    audit = [json.loads(line) for line in (gw.data_dir / "audit" / "audit.jsonl").read_text().splitlines()]
    acts = [(r["action"], r["actor"]) for r in audit if r["target"] == f"user:{ALICE.sub}"]
    assert ("user.create", f"user:{ALICE.sub}") in acts and ("auth.sign_in", f"user:{ALICE.sub}") in acts
    assert any(action == "user.disable" and actor.startswith("key:") for action, actor in acts)


@pytest.mark.parametrize("return_to", ["//evil.example/", "https://evil.example/", "/\\evil.example", "/admin?next=x"])
def test_sign_in_only_returns_to_a_page_of_this_gateway(browsers: Callable[[], httpx.Client], return_to: str) -> None:
    browser = browsers()
    start = browser.get("/auth/login", params={"return_to": return_to})
    done = browser.get(str(sign_in_over_http(browser, start.headers["location"], ALICE)))
    assert done.status_code == 303 and done.headers["location"] == "/"


def test_a_provider_that_is_down_or_names_another_issuer_is_refused(
        idp_and_gateway: tuple[OidcProvider, Gateway]) -> None:
    idp, gw = idp_and_gateway

    async def reasons() -> list[str]:
        found = []
        for issuer in ("http://127.0.0.1:9", idp.issuer + "/"):
            settings = AuthSettings(oidc_issuer=issuer, client_id=idp.client_id, client_secret_file=idp.secret_file,
                                    redirect_url=f"{gw.url}/auth/callback")
            client = OidcClient(settings, new_oidc_http(settings))
            try:
                await client.authorization_url(state="s", nonce="n", code_verifier="v" * 64)
            except ProviderError as exc:
                found.append(exc.reason)
            await client.close()
        return found

    assert asyncio.run(reasons()) == ["discovery_unreachable", "discovery_issuer_mismatch"]


def test_revoking_a_users_key_ends_their_session_and_the_next_sign_in_gets_a_new_key(
        idp_and_gateway: tuple[OidcProvider, Gateway], browsers: Callable[[], httpx.Client]) -> None:
    _, gw = idp_and_gateway
    browser = _sign_in(browsers(), EVE)
    assert browser.get("/v1/models").status_code != 401  # admitted (the balancer is absent here)
    with gw.client(gw.admin_key) as admin:
        old_key = admin.get(f"/admin/users/{EVE.sub}").json()["key_id"]
        assert admin.delete(f"/admin/keys/{old_key}").status_code == 200
    assert browser.get("/v1/models").status_code == 401
    again = _sign_in(browsers(), EVE)
    assert again.get("/v1/models").status_code != 401
    with gw.client(gw.admin_key) as admin:
        assert admin.get(f"/admin/users/{EVE.sub}").json()["key_id"] not in (None, old_key)
