"""The chat page at ``/`` in real Chromium against the real stack: sign-in, streaming, stop, RAG with
citations, rate limits, revoked keys, and model output that must never become markup."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from appliance.bench.harness import wait_until
from tests.support.browser import (
    MODEL,
    PARTIAL_TEXT_JS,
    BrowserAppliance,
    screenshot,
    send,
    set_max_tokens,
    sign_in,
    wait_answer_done,
)

pytestmark = pytest.mark.browser

# The signed-in person's stored conversations (the page keeps them under appliance.conversations:<scope>).
STORED_JS = """() => {
  const names = Object.keys(localStorage).filter((k) => k.startsWith('appliance.conversations:'));
  return names.length === 1 ? JSON.parse(localStorage.getItem(names[0])) : names;
}"""


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    remaining = iter(long)
    return all(word in remaining for word in short)


def test_sign_in_rejects_a_bad_key_then_accepts_a_good_one(page: Any, stack: BrowserAppliance) -> None:
    sign_in(page, "sk-not-a-real-key")
    expect(page.locator("#signin-error")).to_contain_text("not accepted")
    expect(page.locator("#app")).to_be_hidden()

    page.get_by_label("API key").fill(stack.admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#app")).to_be_visible()
    expect(page.get_by_label("Model")).to_have_value(MODEL)
    assert page.evaluate("() => localStorage.getItem('appliance.apiKey')") is None  # session storage only
    assert page.evaluate("() => sessionStorage.getItem('appliance.apiKey')") == stack.admin_key


def test_answer_streams_in_progressively_with_stats(page: Any, stack: BrowserAppliance) -> None:
    sign_in(page, stack.admin_key)
    set_max_tokens(page, 48)
    send(page, "Tell me a long story about a lighthouse keeper and the sea.")
    # Text is on the page while the answer is still streaming (not only once it is complete).
    partial = page.wait_for_function(PARTIAL_TEXT_JS, timeout=60_000).json_value()
    answer = wait_answer_done(page, 1)
    final = answer.locator(".body").inner_text()
    assert partial.strip() and len(final) >= len(partial.strip())
    expect(answer.locator(".meta")).to_contain_text(re.compile(r"\d+ tokens · \d+ prompt · first token \d+ ms"))
    expect(answer.locator(".error")).to_be_empty()
    expect(page.get_by_role("button", name="Regenerate")).to_be_enabled()
    # The conversation is kept in this browser and listed in the sidebar.
    stored = page.evaluate(STORED_JS)
    assert [m["role"] for m in stored[0]["messages"]] == ["user", "assistant"]
    # The page renders the stored Markdown: the words on screen are the stored answer's words, in order
    # (Markdown only takes characters away), and nearly all of them.
    shown, kept = _words(final), _words(stored[0]["messages"][1]["content"])
    assert shown and _is_subsequence(shown, kept) and len(shown) >= 0.8 * len(kept), (final, kept)
    expect(page.locator(".open-conversation").first).to_contain_text("lighthouse")

    page.get_by_role("button", name="Regenerate").click()  # replaces the answer, does not add one
    page.wait_for_function(PARTIAL_TEXT_JS, timeout=60_000)
    again = wait_answer_done(page, 1)
    expect(page.locator(".message.assistant")).to_have_count(1)
    expect(again.locator(".meta")).to_contain_text("tokens")


def test_escape_stops_a_generation_midway(page: Any, stack: BrowserAppliance) -> None:
    sign_in(page, stack.admin_key)
    set_max_tokens(page, 1000)
    send(page, "Write a very long essay about the history of bridges, with many details.")
    page.wait_for_function(PARTIAL_TEXT_JS, timeout=60_000)
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    page.keyboard.press("Escape")
    answer = wait_answer_done(page, 1, timeout_ms=10_000)
    expect(answer.locator(".meta")).to_contain_text("stopped")
    stopped_text = answer.locator(".body").inner_text()
    page.wait_for_timeout(1000)
    assert answer.locator(".body").inner_text() == stopped_text  # nothing more arrives after the stop
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    tokens = int(re.search(r"(\d+) tokens", answer.locator(".meta").inner_text()).group(1))  # type: ignore[union-attr]
    assert 0 < tokens < 1000


def test_upload_a_document_and_get_an_answer_citing_it(page: Any, stack: BrowserAppliance) -> None:
    sign_in(page, stack.admin_key)
    set_max_tokens(page, 24)
    page.get_by_label("New collection name").fill("handbook")
    page.get_by_role("button", name="Create").click()
    expect(page.get_by_label("Answer from")).to_have_value("handbook")
    document = ("# Project Zephyr\n\nThe launch code of Project Zephyr is AZURE-42. "
                "Only the night shift may use it.\n")
    data_transfer = page.evaluate_handle(
        "(text) => { const dt = new DataTransfer(); "
        "dt.items.add(new File([text], 'zephyr.md', {type: 'text/markdown'})); return dt; }", document)
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": data_transfer})  # drag and drop
    expect(page.locator("#upload-status")).to_contain_text("Indexed", timeout=60_000)

    send(page, "What is the launch code of Project Zephyr?")
    answer = wait_answer_done(page, 1)
    citation = answer.get_by_role("button", name=re.compile(r"^\[1\] Project Zephyr"))
    expect(citation).to_be_visible()
    citation.click()
    expect(citation).to_have_attribute("aria-expanded", "true")
    expect(answer.locator(".chunk").first).to_contain_text("AZURE-42")
    screenshot(page, "chat-rag-laptop")
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.get_by_label("Message", exact=True)).to_be_visible()
    screenshot(page, "chat-rag-phone")


def test_rate_limited_key_sees_the_wait_message(page: Any, stack: BrowserAppliance) -> None:
    key = stack.create_key("ui-rate-limited", rpm=1)
    sign_in(page, key["key"])
    set_max_tokens(page, 4)
    send(page, "Hello")
    wait_answer_done(page, 1)
    send(page, "Hello again")
    expect(page.locator("#banner")).to_have_text(re.compile(r"Rate limited, try again in \d+ s\."))
    expect(page.locator(".message.assistant").nth(1).locator(".error")).to_contain_text("Rate limited")
    expect(page.locator("#app")).to_be_visible()  # still signed in
    screenshot(page, "chat-rate-limited")


def test_revoked_key_is_sent_back_to_sign_in(page: Any, stack: BrowserAppliance) -> None:
    key = stack.create_key("ui-to-revoke")
    sign_in(page, key["key"])
    expect(page.locator("#app")).to_be_visible()
    stack.revoke(key["id"])
    set_max_tokens(page, 4)
    send(page, "Are you there?")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#signin-error")).to_contain_text("revoked")
    assert page.evaluate("() => sessionStorage.getItem('appliance.apiKey')") is None
    expect(page.get_by_label("API key")).to_be_focused()


def test_model_output_is_rendered_as_markdown_never_as_html(page: Any, stack: BrowserAppliance) -> None:
    hostile = ("**bold** and `code` <img src=x onerror=\"window.pwned=1\"> [link](javascript:alert(1))\n\n"
               "```python\nprint('<script>window.pwned=2</script>')\n```")
    conversation = {"id": "c1", "title": "Stored", "updated": 0, "messages": [
        {"role": "user", "content": "<b>hi</b>"}, {"role": "assistant", "content": hostile}]}
    page.goto("/")
    page.evaluate("(c) => localStorage.setItem('appliance.conversations', JSON.stringify([c]))", conversation)
    sign_in(page, stack.admin_key)
    answer = page.locator(".message.assistant").first
    expect(answer.locator("strong")).to_have_text("bold")
    expect(answer.locator(".code-block code")).to_contain_text("<script>window.pwned=2</script>")
    assert answer.locator("img, script, a[href^='javascript']").count() == 0
    assert page.locator(".message.user b").count() == 0
    assert page.evaluate("() => window.pwned") is None
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    answer.get_by_role("button", name="Copy code").click()
    expect(answer.get_by_role("button", name="Copy code")).to_have_text("Copied")

    box = page.get_by_label("Message", exact=True)
    box.press_sequentially("line one")
    box.press("Shift+Enter")
    box.press_sequentially("line two")
    assert box.input_value() == "line one\nline two"  # Shift+Enter is a newline, not a send
    expect(page.locator(".message")).to_have_count(2)
    with page.expect_download() as download:
        page.get_by_role("button", name="Export Markdown").click()
    exported = Path(download.value.path()).read_text()
    assert exported.startswith("# Stored") and "## Assistant" in exported and "**bold**" in exported


MARKDOWN_CASES = [
    ("# Title", "<h3>Title</h3>"),
    ("- a\n- b", "<ul><li>a</li><li>b</li></ul>"),
    ("1. one\n2. two", "<ol><li>one</li><li>two</li></ol>"),
    ("[site](https://example.org/x)",
     '<a href="https://example.org/x" target="_blank" rel="noopener noreferrer nofollow">site</a>'),
    ("[bad](javascript:alert(1))", "[bad](javascript:alert(1))"),
    ("a <b onclick=x>b</b> & c", "a &lt;b onclick=x&gt;b&lt;/b&gt; &amp; c"),
    ('`<i a="1">`', "<code>&lt;i a=&quot;1&quot;&gt;</code>"),
    ("```js\nlet a = 1 < 2;", "let a = 1 &lt; 2;</code></pre>"),  # an unclosed fence mid-stream is still code
    ("see [2]", '<sup class="cite-ref" data-cite="2">[2]</sup>'),
]


def test_markdown_renderer_escapes_first(page: Any, stack: BrowserAppliance) -> None:
    page.goto("/")
    rendered = page.evaluate(
        "async (cases) => { const m = await import('/static/js/markdown.js'); "
        "return cases.map(([src]) => m.renderMarkdown(src)); }", MARKDOWN_CASES)
    for (source, expected), html in zip(MARKDOWN_CASES, rendered, strict=True):
        assert expected in html, (source, html)


def test_a_cut_stream_is_shown_as_cut_never_as_finished(page: Any, stack: BrowserAppliance) -> None:
    sign_in(page, stack.admin_key)
    set_max_tokens(page, 1000)
    send(page, "Write a very long essay about rivers and the towns along them.")
    page.wait_for_function(PARTIAL_TEXT_JS, timeout=60_000)
    busy = [w["url"].rstrip("/") for w in stack.processes.balancer_workers() if w["inflight"]]
    assert len(busy) == 1, busy
    name = f"worker{stack.workers.index(busy[0])}"
    stack.processes.services[name].signal(signal.SIGKILL)  # the worker dies mid-answer
    answer = wait_answer_done(page, 1, timeout_ms=30_000)
    expect(answer.locator(".error")).to_contain_text("cut off")
    expect(page.locator("#banner")).to_contain_text("cut off")
    assert "stopped" not in answer.locator(".meta").inner_text()
    assert answer.locator(".body").inner_text().strip()  # what arrived before the cut is kept
    stack.processes.restart(name)
    wait_until(lambda: all(w["state"] == "healthy" for w in stack.processes.balancer_workers()), 60,
               what="the restarted worker healthy again")


def test_a_second_person_on_the_same_browser_does_not_see_the_first_ones_conversations(
        page: Any, stack: BrowserAppliance) -> None:
    """Alice signs out; Bob signs in with his key in the same browser: the sidebar is empty, and Alice's
    conversation (stored under her own name, never the key itself) is back when she signs in again."""
    alice = stack.create_key("ui-alice")["key"]
    bob = stack.create_key("ui-bob")["key"]
    sign_in(page, alice)
    set_max_tokens(page, 8)
    send(page, "Alice's private question about the quarterly figures")
    wait_answer_done(page, 1)
    expect(page.locator(".open-conversation")).to_have_count(1)
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#app")).to_be_hidden()
    expect(page.locator(".message")).to_have_count(0)  # the page forgot them at sign-out

    page.get_by_label("API key").fill(bob)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator(".open-conversation")).to_have_count(0)
    expect(page.locator(".message")).to_have_count(0)
    stored = page.evaluate("() => Object.entries(localStorage).filter(([k]) => k.startsWith('appliance.conv'))")
    assert len(stored) == 1 and not any(alice in name or alice in value for name, value in stored), stored

    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key").fill(alice)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".open-conversation")).to_have_count(1)
    expect(page.locator(".open-conversation").first).to_contain_text("quarterly figures")
