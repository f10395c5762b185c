"""While every worker slot is busy, the chat page says where the request stands ("waiting: N ahead") and the
admin page shows who waits (real Chromium, the real stack: two workers of two slots)."""

from __future__ import annotations

import re
import threading
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.support.browser import MODEL, BrowserAppliance, send, set_max_tokens, sign_in, wait_answer_done

pytestmark = pytest.mark.browser


def _hold(stack: BrowserAppliance, release: threading.Event, holding: threading.Semaphore) -> None:
    """One long stream that keeps a slot until ``release`` is set."""
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 900,
        # Identical greedy streams end on the same token: without this, all four could free their slots at once
        # and let the queued requests (and the chat one) through before the page shows it waiting.
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write a very long story about ships and the sea."}],
    }
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    with (
        httpx.Client(timeout=300) as client,
        client.stream("POST", f"{stack.url}/v1/chat/completions", json=body, headers=headers) as response,
    ):
        first = True
        for _ in response.iter_bytes():
            if first:
                holding.release()
                first = False
            if release.is_set():
                return


def test_a_waiting_answer_shows_its_place_and_the_admin_page_shows_who_waits(
    page: Any, stack: BrowserAppliance
) -> None:
    slots = 2 * len(stack.workers)
    release, holding = threading.Event(), threading.Semaphore(0)
    # Every slot busy with a long stream that cannot end early (ignore_eos), and more streams of the same key
    # queued behind them, so the chat request below keeps waiting even if the first streams end before the
    # page signs in (900 tokens take 20-40 s here; with only two queued, a slow browser start once found every
    # earlier stream done and the chat served at once).
    queued = 6
    threads = [threading.Thread(target=_hold, args=(stack, release, holding), daemon=True)
               for _ in range(slots + queued)]
    for thread in threads[:slots]:
        thread.start()
    try:
        for _ in range(slots):
            assert holding.acquire(timeout=240), "the long streams did not start"
        for thread in threads[slots:]:
            thread.start()
        sign_in(page, stack.admin_key)
        set_max_tokens(page, 8)
        send(page, "Say hi.")
        answer = page.locator(".message.assistant").last
        expect(answer.locator(".meta")).to_have_text(re.compile(r"^waiting: \d+ ahead$"), timeout=30_000)

        admin = page.context.new_page()
        sign_in(admin, stack.admin_key, "/admin?interval=500")
        expect(admin.locator("#queue-summary")).to_contain_text(re.compile(r"^[1-9]\d* waiting"), timeout=15_000)
        expect(admin.locator("#queue-body tr").first).to_contain_text("bootstrap-admin")
        admin.close()
    finally:
        release.set()
        for thread in threads:
            thread.join(120)
    done = wait_answer_done(page, 1, timeout_ms=120_000)
    expect(done.locator(".error")).to_be_empty()
    expect(done.locator(".meta")).to_contain_text("tokens")
