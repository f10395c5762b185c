"""The chat page on a phone (390 x 844, touch) in real Chromium against the real stack: the sidebar is a drawer, the
message list takes the screen, the composer stays reachable, every control is a thumb-sized target, nothing
scrolls sideways; and at laptop size the sidebar is still there without a drawer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.support.browser import PARTIAL_TEXT_JS, BrowserAppliance, ProviderGateway, screenshot, wait_answer_done

pytestmark = pytest.mark.browser

PHONE = {"width": 390, "height": 844}
PARAGRAPH = "The keeper climbs the stairs at dusk, trims the wick and winds the clockwork that turns the lens. " * 3
# A conversation already longer than the screen: the list scrolls, and the new answer arrives below the fold.
EARLIER = {"id": "c1", "title": "Lighthouse", "updated": 0, "messages": [
    {"role": role, "content": PARAGRAPH} for role in ("user", "assistant") * 3]}
STREAM_MS = 120_000  # a busy shared machine is slow; a quiet one answers in seconds
TAP = 44  # px: the smallest target a thumb hits reliably (WCAG 2.5.5, Apple's and Google's guidelines)

# Every control a person can reach in `root` that is on screen now, with its box.
TARGETS_JS = """(root) => [...document.querySelector(root).querySelectorAll(
    'button, a[href], input, select, textarea, summary')]
  .filter((el) => { const r = el.getBoundingClientRect(); const s = getComputedStyle(el);
    return r.width > 1 && r.height > 1 && s.visibility === 'visible' && !el.closest('[inert]'); })
  .map((el) => { const r = el.getBoundingClientRect();
    return {what: el.id || el.getAttribute('aria-label') || el.textContent.trim().slice(0, 30) || el.tagName,
            width: r.width, height: r.height}; })"""


def _phone_at(browser: Any, url: str) -> Iterator[Any]:
    """A fresh touch-screen context the size of a phone, at ``url``."""
    context = browser.new_context(base_url=url, viewport=PHONE, has_touch=True, is_mobile=True)
    context.set_default_timeout(30_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def phone(browser: Any, stack: BrowserAppliance) -> Iterator[Any]:
    yield from _phone_at(browser, stack.url)


@pytest.fixture
def phone_with_provider(browser: Any, provider_gateway: ProviderGateway) -> Iterator[Any]:
    yield from _phone_at(browser, provider_gateway.url)


def _box(locator: Any) -> dict[str, float]:
    box = locator.bounding_box()
    assert box is not None, locator
    return dict(box)


def _no_sideways_scroll(page: Any) -> None:
    widths = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], f"the page scrolls sideways: {widths}"


def _thumb_sized(page: Any, root: str) -> None:
    targets = page.evaluate(TARGETS_JS, root)
    assert targets, root
    small = [t for t in targets if t["width"] < TAP or t["height"] < TAP]
    assert not small, f"targets under {TAP} px: {small}"


def test_phone_chat_drawer_composer_and_stream(phone: Any, stack: BrowserAppliance) -> None:
    page = phone
    page.goto("/")
    page.evaluate("(c) => localStorage.setItem('appliance.conversations', JSON.stringify([c]))", EARLIER)
    page.reload()  # the page reads its conversations when it loads
    expect(page.get_by_label("API key")).to_be_visible()
    _no_sideways_scroll(page)
    _thumb_sized(page, "#signin")
    button = _box(page.get_by_role("button", name="Sign in"))
    assert PHONE["height"] / 2 <= button["y"] and button["y"] + button["height"] <= PHONE["height"], button  # thumb
    assert page.evaluate("() => document.documentElement.scrollHeight") <= PHONE["height"]  # all of it on screen
    screenshot(page, "signin-phone")
    page.get_by_label("API key").fill(stack.admin_key)
    page.get_by_role("button", name="Sign in").tap()
    expect(page.locator("#app")).to_be_visible()

    toggle = page.get_by_role("button", name="Conversations and documents")
    sidebar = page.locator("#sidebar")
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(sidebar).to_be_hidden()
    messages, prompt = page.locator("#messages"), page.get_by_label("Message", exact=True)
    assert _box(messages)["height"] >= 0.6 * PHONE["height"], _box(messages)  # most of the screen is the chat
    composer = _box(page.locator("#composer"))
    assert composer["y"] + composer["height"] <= PHONE["height"] + 0.5, composer  # at the foot, on screen
    _no_sideways_scroll(page)
    _thumb_sized(page, "#app")

    # Tap: the drawer opens over the conversation, focus inside, the conversation unreachable meanwhile.
    toggle.tap()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(sidebar).to_be_visible()
    expect(page.get_by_role("button", name="New chat")).to_be_focused()
    expect(page.locator(".chat")).to_have_attribute("inert", "")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")  # slid in
    drawer = _box(sidebar)
    assert drawer["x"] >= 0 and drawer["x"] + drawer["width"] < PHONE["width"], drawer
    _thumb_sized(page, "#sidebar")
    _no_sideways_scroll(page)
    screenshot(page, "chat-phone-drawer")
    # Escape closes it and gives focus back to its button.
    page.keyboard.press("Escape")
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(sidebar).to_be_hidden()
    expect(toggle).to_be_focused()
    # Keyboard: Enter on the button opens it, Enter on the button again closes it.
    page.keyboard.press("Enter")
    expect(sidebar).to_be_visible()
    page.keyboard.press("Shift+Tab")
    expect(toggle).to_be_focused()
    page.keyboard.press("Enter")
    expect(sidebar).to_be_hidden()
    # A tap outside the drawer (on the dimmed conversation) closes it.
    toggle.tap()
    expect(sidebar).to_be_visible()
    outside = (PHONE["width"] - 20, PHONE["height"] // 2)
    # What a tap there hits is the drawer's backdrop, not the conversation under it.
    assert page.evaluate("([x, y]) => document.elementFromPoint(x, y).id", outside) == "drawer-backdrop"
    page.touchscreen.tap(*outside)
    expect(sidebar).to_be_hidden()
    expect(page.locator(".chat")).not_to_have_attribute("inert", "")

    # The answer's length is a setting in the drawer; then a chat streams on the real worker.
    toggle.tap()
    page.locator("details.settings summary").tap()
    page.get_by_label("Longest answer (tokens)").fill("64")
    page.keyboard.press("Escape")
    expect(sidebar).to_be_hidden()
    prompt.tap()
    prompt.fill("Tell me a short story about a lighthouse keeper and the sea.")
    page.get_by_role("button", name="Send").tap()
    page.wait_for_function(PARTIAL_TEXT_JS, timeout=STREAM_MS)  # text on screen while the answer still streams
    stop = page.get_by_role("button", name="Stop")
    box = _box(stop)  # within the thumb's reach while it streams
    assert box["height"] >= TAP and box["y"] + box["height"] <= PHONE["height"] + 0.5, box
    # The reader scrolls up to read what came before: the stream no longer pulls the list back down.
    streamed = page.evaluate("""() => { const log = document.getElementById('messages'); log.scrollTop = 0;
      return document.querySelector('.message.assistant.streaming .body').textContent.length; }""")
    answer = wait_answer_done(page, 4, timeout_ms=STREAM_MS)
    expect(answer.locator(".meta")).to_contain_text("tokens")
    assert len(answer.locator(".body").text_content() or "") > streamed  # text arrived after the scroll...
    assert page.evaluate("() => document.getElementById('messages').scrollTop") < 50  # ...and the reader stayed
    assert _box(messages)["height"] >= 0.6 * PHONE["height"]
    _no_sideways_scroll(page)
    _thumb_sized(page, "#app")
    screenshot(page, "chat-phone-answer")

    # The conversation is listed in the drawer; choosing it closes the drawer.
    toggle.tap()
    page.locator(".open-conversation").first.tap()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(sidebar).to_be_hidden()
    expect(page.locator(".message.assistant")).to_have_count(4)

    # An on-screen keyboard takes the lower part of the screen: the page follows the visual viewport, so the
    # composer moves up above it and the list gives up the room.
    keyboard_up = {"width": PHONE["width"], "height": 520}
    page.set_viewport_size(keyboard_up)
    page.wait_for_function("(h) => getComputedStyle(document.documentElement)"
                           ".getPropertyValue('--viewport-height').trim() === `${h}px`", arg=keyboard_up["height"])
    composer = _box(page.locator("#composer"))
    assert composer["y"] + composer["height"] <= keyboard_up["height"] + 0.5, composer
    assert _box(messages)["height"] >= 0.4 * keyboard_up["height"], _box(messages)
    _no_sideways_scroll(page)


def test_laptop_keeps_the_sidebar_beside_the_chat(page: Any, stack: BrowserAppliance) -> None:
    page.goto("/")
    page.get_by_label("API key").fill(stack.admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#app")).to_be_visible()
    sidebar, messages = page.locator("#sidebar"), page.locator("#messages")
    expect(sidebar).to_be_visible()
    expect(page.locator("#sidebar-toggle")).to_be_hidden()  # no drawer: nothing to open
    expect(page.get_by_role("button", name="New chat")).to_be_visible()
    side, chat = _box(sidebar), _box(messages)
    assert side["x"] == 0 and 200 <= side["width"] <= 320, side
    assert chat["x"] >= side["x"] + side["width"], (side, chat)  # beside it, not under it
    assert side["height"] >= 0.8 * 800 and chat["height"] >= 0.6 * 800, (side, chat)
    page.keyboard.press("Escape")  # Escape has no drawer to close here
    expect(sidebar).to_be_visible()
    _no_sideways_scroll(page)


def test_phone_sign_in_with_the_provider_then_chat(phone_with_provider: Any, provider_gateway: ProviderGateway
                                                   ) -> None:
    page, dave = phone_with_provider, provider_gateway.person("dave")
    page.goto("/")
    link = page.get_by_role("link", name="Sign in with Test IdP")
    expect(link).to_be_visible()
    box = _box(link)  # one wide target in the lower half of the screen
    assert box["height"] >= TAP and box["width"] >= 0.8 * PHONE["width"] and box["y"] >= PHONE["height"] / 2, box
    expect(page.locator("#signin-form")).to_be_hidden()  # key sign-in is off here: no empty form box
    _no_sideways_scroll(page)
    screenshot(page, "signin-provider-phone")
    link.tap()
    page.get_by_label("Username").fill(dave.username)  # the provider's own page
    page.get_by_label("Password").fill(dave.password)
    page.get_by_role("button", name="Continue").tap()
    expect(page.locator("#app")).to_be_visible()
    assert _box(page.locator("#messages"))["height"] >= 0.6 * PHONE["height"]
    toggle = page.get_by_role("button", name="Conversations and documents")
    toggle.tap()
    expect(page.locator("#sidebar")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).to_be_hidden()
    prompt = page.get_by_label("Message", exact=True)
    prompt.tap()
    prompt.fill("Say hello.")
    page.get_by_role("button", name="Send").tap()  # a session's chat: cookie and CSRF token, no key
    answer = wait_answer_done(page, 1, timeout_ms=STREAM_MS)
    expect(answer.locator(".error")).to_be_empty()
    assert answer.locator(".body").inner_text().strip()
    _no_sideways_scroll(page)
