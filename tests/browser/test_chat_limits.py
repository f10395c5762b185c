"""The chat page's "Longest answer" control follows the worker's published limit (one authority for limits)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.support.browser import MODEL, BrowserAppliance, set_max_tokens, sign_in

pytestmark = pytest.mark.browser


def test_longest_answer_takes_its_maximum_from_the_worker(page: Any, stack: BrowserAppliance) -> None:
    published = httpx.get(f"{stack.workers[0]}/v1/models/{MODEL}", headers=stack.processes.internal_headers(),
                          timeout=30).json()
    limit = published["max_tokens"]
    sign_in(page, stack.admin_key)
    expect(page.get_by_label("Model")).to_have_value(MODEL)
    field = page.get_by_label("Longest answer (tokens)")
    expect(field).to_have_attribute("max", str(limit))
    set_max_tokens(page, limit + 1000)
    field.press("Tab")  # the change event: a value above the limit comes back to it
    expect(field).to_have_value(str(limit))
