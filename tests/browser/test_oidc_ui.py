"""Signing in with a real OpenID provider in real Chromium: the certified ``oidc-provider`` package
(tests/support/oidc_provider.mjs) and a gateway configured for it, in front of the browser package's real
stack (Redis, the real workers with the real model, RAG). Sign in, chat (streamed by the real worker), sign
out; a disallowed group refused; the cookie replayed after sign-out refused; CSRF refused; a key pasted in
the page refused; a disabled user's open page sent back to sign-in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.support.browser import (
    MODEL,
    PARTIAL_TEXT_JS,
    BrowserAppliance,
    screenshot,
    send,
    set_max_tokens,
    wait_answer_done,
)
from tests.support.oidc_provider import IdpUser, OidcProvider, installed, oidc_provider
from tests.support.processes import Service, free_port, python_module, run_service
from tests.support.strict import STRICT

pytestmark = pytest.mark.browser

ALICE = IdpUser("alice", ("staff",))
BOB = IdpUser("bob", ("staff",))
ROOT = IdpUser("root", ("staff", "appliance-admins"))
MALLORY = IdpUser("mallory", ("contractors",))
# What a page's script sends: the answer of fetch() as {status, code}.
FETCH_JS = """async ([path, init]) => {
  const r = await fetch(path, init);
  let code = null;
  try { code = (await r.json()).error?.code ?? null; } catch {}
  return {status: r.status, code};
}"""


@dataclass
class SignInGateway:
    url: str
    idp: OidcProvider
    service: Service


@pytest.fixture(scope="module")
def oidc(stack: BrowserAppliance) -> Iterator[SignInGateway]:
    """A second gateway on the package's stack (same Redis, balancer, RAG and data dir) that signs people in
    with the provider; key sign-in is off there (the default with an issuer)."""
    if not installed() and not STRICT:
        pytest.skip("oidc-provider is not installed (./scripts/test installs it into .cache/npm)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    redirect = f"{url}/auth/callback"
    with oidc_provider(stack.tmp / "idp", redirect_uris=[redirect], users=[ALICE, BOB, ROOT, MALLORY]) as idp:
        env = {**stack.processes.env["gateway"], "APPLIANCE_GATEWAY_PORT": str(port),
               **idp.auth_settings(redirect, allowed_groups="staff", admin_groups="appliance-admins")}
        with run_service(python_module("gateway"), env=env, log_path=stack.tmp / "logs" / "gateway-oidc.log",
                         ready_url=f"{url}/healthz", ready_timeout=90) as service:
            yield SignInGateway(url, idp, service)


@pytest.fixture
def tab(browser: Any, oidc: SignInGateway) -> Iterator[Any]:
    context = browser.new_context(base_url=oidc.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _sign_in(page: Any, user: IdpUser, path: str = "/") -> None:
    page.goto(path)
    page.get_by_role("link", name="Sign in with Test IdP").click()
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(user.password)
    page.get_by_role("button", name="Continue").click()


def test_sign_in_chat_and_sign_out_with_the_provider(tab: Any, oidc: SignInGateway) -> None:
    tab.goto("/")
    expect(tab.get_by_role("link", name="Sign in with Test IdP")).to_be_visible()
    expect(tab.get_by_label("API key")).to_be_hidden()  # key sign-in is off where an issuer is set
    _sign_in(tab, ALICE)
    expect(tab.locator("#app")).to_be_visible()
    expect(tab.get_by_label("Model")).to_have_value(MODEL)
    session = next(c for c in tab.context.cookies() if c["name"] == "appliance_session")
    assert session["httpOnly"] and session["sameSite"] == "Lax" and session["path"] == "/"
    assert "appliance_session" not in tab.evaluate("() => document.cookie")  # scripts cannot read it
    assert tab.evaluate("() => sessionStorage.getItem('appliance.apiKey')") is None  # no key in the page

    set_max_tokens(tab, 24)
    send(tab, "Say hello to the new colleague.")
    tab.wait_for_function(PARTIAL_TEXT_JS, timeout=60_000)  # the real worker's answer streams in
    answer = wait_answer_done(tab, 1)
    assert answer.locator(".body").inner_text().strip()
    expect(answer.locator(".error")).to_be_empty()
    screenshot(tab, "oidc-signed-in-chat")

    with tab.expect_response("**/auth/logout") as logout:
        tab.get_by_role("button", name="Sign out").click()
    assert logout.value.status == 200
    expect(tab.get_by_role("link", name="Sign in with Test IdP")).to_be_visible()
    # The cookie the browser held, replayed after sign-out: the server forgot it.
    with httpx.Client(base_url=oidc.url, timeout=30, cookies={"appliance_session": session["value"]}) as replay:
        assert replay.get("/auth/me").status_code == 401
        assert replay.get("/v1/models").status_code == 401


def test_a_user_of_a_disallowed_group_is_refused(tab: Any) -> None:
    _sign_in(tab, MALLORY)
    expect(tab.locator("#signin-error")).to_contain_text("not in a group allowed")
    expect(tab.locator("#app")).to_be_hidden()
    assert not [c for c in tab.context.cookies() if c["name"] == "appliance_session"]
    screenshot(tab, "oidc-refused-group")


def test_csrf_and_a_pasted_key_are_refused_in_the_page(tab: Any, stack: BrowserAppliance) -> None:
    _sign_in(tab, BOB)
    expect(tab.locator("#app")).to_be_visible()
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    init = {"method": "POST", "headers": {"Content-Type": "application/json"}, "body": body}
    assert tab.evaluate(FETCH_JS, ["/v1/chat/completions", init]) == {"status": 403, "code": "csrf_failed"}
    wrong = {**init, "headers": {**init["headers"], "X-CSRF-Token": "x" * 43}}
    assert tab.evaluate(FETCH_JS, ["/v1/chat/completions", wrong]) == {"status": 403, "code": "csrf_failed"}
    # The page's own token gets through (the page's api.js sends it on every change).
    token = tab.evaluate("async () => (await (await fetch('/auth/me')).json()).csrf_token")
    right = {**init, "headers": {**init["headers"], "X-CSRF-Token": token}}
    assert tab.evaluate(FETCH_JS, ["/v1/chat/completions", right])["status"] == 200
    # A key pasted into the page's script is refused: people sign in here.
    keyed = {"headers": {"Authorization": f"Bearer {stack.admin_key}"}}
    assert tab.evaluate(FETCH_JS, ["/admin/keys", keyed]) == {"status": 403, "code": "key_sign_in_disabled"}


def test_a_disabled_users_open_page_is_sent_back_to_sign_in(tab: Any, oidc: SignInGateway,
                                                           stack: BrowserAppliance) -> None:
    _sign_in(tab, BOB)
    expect(tab.locator("#app")).to_be_visible()
    admin = {"Authorization": f"Bearer {stack.admin_key}"}
    with httpx.Client(base_url=oidc.url, timeout=30, headers=admin) as client:
        response = client.post(f"/admin/users/{BOB.sub}/disable")
        assert response.status_code == 200 and response.json()["sessions_ended"] >= 1
    set_max_tokens(tab, 8)
    send(tab, "Are you still there?")
    expect(tab.locator("#signin-error")).to_contain_text("session has ended")
    # Still signed in at the provider (its own session), so no form: straight back, and refused.
    tab.get_by_role("link", name="Sign in with Test IdP").click()
    expect(tab.locator("#signin-error")).to_contain_text("disabled by an administrator")
    with httpx.Client(base_url=oidc.url, timeout=30, headers=admin) as client:
        assert client.post(f"/admin/users/{BOB.sub}/enable").status_code == 200


def test_an_admin_group_member_runs_the_dashboard_and_a_user_may_not(tab: Any, browser: Any,
                                                                    oidc: SignInGateway) -> None:
    _sign_in(tab, ROOT, "/admin")
    expect(tab.locator("#app")).to_be_visible()
    expect(tab.locator("#workers-body tr.worker").first).to_be_visible()
    form = tab.locator("#key-form")
    form.get_by_label("Name").fill("made-in-a-session")
    form.get_by_role("button", name="Create key").click()  # a POST: api.js sends the session's CSRF token
    expect(tab.locator("#key-message")).to_contain_text("shown only once")
    expect(tab.locator("#keys-body tr").filter(has_text="made-in-a-session")).to_be_visible()

    context = browser.new_context(base_url=oidc.url)
    user = context.new_page()
    _sign_in(user, ALICE, "/admin")
    expect(user.locator("#signin-error")).to_contain_text("Not allowed")
    expect(user.locator("#app")).to_be_hidden()
    context.close()
