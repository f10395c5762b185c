"""What the browser tests share: the appliance they drive, and how they sign in, send a message, wait for the
answer and take screenshots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.oidc_provider import IdpUser, OidcProvider, sign_in_over_http
from tests.support.processes import REPO
from tests.support.stack import LoopbackAppliance

SCREENSHOTS = REPO / "artifacts" / "screenshots"
MODEL = "gemma-3-270m"

# The streaming answer's text, read in the page in one go while it is still marked as streaming.
PARTIAL_TEXT_JS = """() => {
  const m = document.querySelector('.message.assistant.streaming[aria-busy="true"]');
  const text = m ? m.querySelector('.body').textContent : '';
  return text.trim().length > 0 ? text : null;
}"""


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page: Any, key: str, path: str = "/") -> None:
    page.goto(path)
    page.locator("#api-key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def set_max_tokens(page: Any, tokens: int) -> None:
    page.locator("details.settings summary").click()
    page.get_by_label("Longest answer (tokens)").fill(str(tokens))


def send(page: Any, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def wait_answer_done(page: Any, count: int, timeout_ms: int = 60_000) -> Any:
    """The ``count``-th assistant message once it stopped streaming."""
    page.wait_for_function(
        "(n) => { const m = document.querySelectorAll('.message.assistant'); "
        "return m.length >= n && !m[n - 1].classList.contains('streaming'); }", arg=count, timeout=timeout_ms)
    return page.locator(".message.assistant").nth(count - 1)


@dataclass
class BrowserAppliance:
    """The loopback appliance the browser tests drive: the gateway's URL, its admin key, the workers."""

    url: str
    admin_key: str
    workers: list[str]
    tmp: Path
    processes: LoopbackAppliance  # the processes: services by name, restart(), balancer_workers()

    def create_key(self, name: str, scopes: tuple[str, ...] = ("chat",), **limits: int) -> dict[str, Any]:
        body = {"name": name, "scopes": list(scopes), "limits": {"rpm": 0, **limits}}
        response = httpx.post(f"{self.url}/admin/keys", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {self.admin_key}"})
        assert response.status_code == 201, response.text
        return dict(response.json())

    def revoke(self, key_id: str) -> None:
        response = httpx.delete(f"{self.url}/admin/keys/{key_id}", timeout=30,
                                headers={"Authorization": f"Bearer {self.admin_key}"})
        assert response.status_code == 200, response.text


@dataclass
class ProviderGateway:
    """A gateway of the browser package's stack that signs people in with a real OpenID provider."""

    url: str
    idp: OidcProvider

    def person(self, username: str) -> IdpUser:
        return self.idp.users[username]

    def sign_in_over_http(self, user: IdpUser) -> None:
        """``user`` signs in once without a browser (the gateway then knows them as a user)."""
        with httpx.Client(base_url=self.url, timeout=30) as client:
            start = client.get("/auth/login")
            assert start.status_code == 302, start.text
            done = client.get(str(sign_in_over_http(client, start.headers["location"], user)))
            assert done.status_code == 303, done.text

    def sign_in(self, page: Any, user: IdpUser) -> None:
        """``user`` signs in on ``page`` (at this gateway) through the provider's own pages."""
        page.goto("/")
        page.get_by_role("link", name="Sign in with Test IdP").click()
        page.get_by_label("Username").fill(user.username)
        page.get_by_label("Password").fill(user.password)
        page.get_by_role("button", name="Continue").click()
