"""The admin dashboard at ``/admin`` in real Chromium against the real stack: every worker, live charts,
cache, collections, and key management."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.support.browser import MODEL, BrowserAppliance, screenshot, sign_in

pytestmark = pytest.mark.browser


def _chat(stack: BrowserAppliance, text: str) -> None:
    response = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {stack.admin_key}"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16})
    assert response.status_code == 200, response.text


def test_admin_page_shows_every_worker_and_live_throughput(page: Any, stack: BrowserAppliance) -> None:
    sign_in(page, stack.admin_key, "/admin?interval=500")
    rows = page.locator("#workers-body tr.worker")
    expect(rows).to_have_count(len(stack.workers))
    for url in stack.workers:
        row = rows.filter(has_text=url)
        expect(row).to_have_count(1)
        expect(row).to_contain_text(MODEL)
        expect(row.locator("td").nth(2)).to_have_text("healthy")
        expect(row.locator("td").nth(3)).to_have_text(re.compile(r"^\d+ / 2$"))
    expect(page.locator("#workers-summary")).to_contain_text(f"{len(stack.workers)} of {len(stack.workers)} healthy")
    expect(page.locator("#chart-tokens-caption")).to_contain_text("tokens/s")

    _chat(stack, "Say hello to the operators.")
    # The generated tokens show up in the throughput chart (deltas of the gateway's own counters).
    expect(page.locator("#chart-tokens-caption")).to_contain_text(re.compile(r"peak (?!0\.00)\d"), timeout=15_000)
    expect(page.locator("#chart-latency-caption")).to_contain_text(re.compile(r"now \d+\.\d+ s"))
    expect(page.locator("#cache-rate")).not_to_be_empty()
    expect(page.locator("#gpu")).to_contain_text("GPU")
    screenshot(page, "admin-laptop")
    page.set_viewport_size({"width": 390, "height": 844})
    expect(rows.first).to_be_attached()
    screenshot(page, "admin-phone")


def test_admin_creates_a_key_with_limits_and_revokes_it(page: Any, stack: BrowserAppliance) -> None:
    sign_in(page, stack.admin_key, "/admin")
    form = page.locator("#key-form")
    form.get_by_label("Name").fill("ui-made-key")
    form.get_by_label("Requests/min").fill("5")
    form.get_by_label("embeddings").uncheck()
    form.get_by_role("button", name="Create key").click()
    expect(page.locator("#key-message")).to_contain_text("shown only once")
    secret = page.locator("#new-secret-value").inner_text().strip()
    assert secret
    row = page.locator("#keys-body tr").filter(has_text="ui-made-key")
    expect(row).to_contain_text("rpm 5")
    expect(row.locator("td").nth(2)).to_have_text("chat")
    ok = httpx.get(f"{stack.url}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert ok.status_code == 200

    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke key ui-made-key").click()
    expect(row).to_contain_text("revoked")
    refused = httpx.get(f"{stack.url}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert refused.status_code == 401


def test_a_key_without_the_admin_scope_is_refused(page: Any, stack: BrowserAppliance) -> None:
    key = stack.create_key("ui-not-admin")
    sign_in(page, key["key"], "/admin")
    expect(page.locator("#signin-error")).to_contain_text("Not allowed")
    expect(page.locator("#app")).to_be_hidden()

    sign_in(page, key["key"], "/")  # signed in to the chat, the same tab follows the link to /admin
    expect(page.locator("#app")).to_be_visible()
    page.get_by_role("link", name="Admin").click()
    expect(page.locator("#signin-error")).to_contain_text("Not allowed")
    page.go_back()
    expect(page.locator("#app")).to_be_visible()  # the chat session survived the refusal
