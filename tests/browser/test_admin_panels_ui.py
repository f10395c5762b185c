"""The admin dashboard's prompt-prefix reuse rate per worker, its models, batches and users panels (each hidden
while the gateway has no such endpoint), and the dashboard on a phone: real Chromium, the real stack."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import expect

from tests.support.browser import MODEL, BrowserAppliance, ProviderGateway, screenshot, sign_in

pytestmark = pytest.mark.browser

SYSTEM = "You answer questions about the lighthouse keepers' handbook in one short sentence. " * 12
COUNTER = re.compile(r"^appliance_worker_prompt_tokens(_reused)?_total\{[^}]*\} (\S+)$", re.MULTILINE)


def _chat(stack: BrowserAppliance, messages: list[dict[str, str]]) -> str:
    response = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {stack.admin_key}"},
                          json={"model": MODEL, "messages": messages, "max_tokens": 16})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def _worker_counters(stack: BrowserAppliance, url: str) -> tuple[int, int]:
    """(prompt tokens, reused) from the worker's own Prometheus counters, summed over its models."""
    text = httpx.get(f"{url}/metrics", headers=stack.processes.internal_headers(), timeout=10).text
    totals = [0.0, 0.0]
    for reused, value in COUNTER.findall(text):
        totals[1 if reused else 0] += float(value)
    return int(totals[0]), int(totals[1])


def _admin_get(stack: BrowserAppliance, path: str) -> httpx.Response:
    return httpx.get(f"{stack.url}{path}", headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30)


def test_dashboard_shows_prefix_reuse_per_worker_and_the_endpoint_panels(page: Any, stack: BrowserAppliance) -> None:
    # A conversation of two turns: the second resends the first, which its worker still holds.
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When is the lamp lit?"}]
    answer = _chat(stack, messages)
    _chat(stack, [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "And put out?"}])
    counters = {url: _worker_counters(stack, url) for url in stack.workers}
    assert any(reused > 0 for _, reused in counters.values()), counters

    sign_in(page, stack.admin_key, "/admin?interval=500")
    rows = page.locator("#reuse-body tr.reuse")
    expect(rows).to_have_count(len(stack.workers))
    for url, (prompt, reused) in counters.items():  # the dashboard's figure is the workers' counters' ratio
        row = rows.filter(has_text=url)
        expect(row.locator("td").nth(1)).to_have_text(f"{100 * reused / prompt:.1f} %" if prompt else "no prompts yet",
                                                      timeout=15_000)
        expect(row.locator("td").nth(2)).to_have_text(f"{reused:,} / {prompt:,}")
    total_prompt, total_reused = (sum(c[i] for c in counters.values()) for i in (0, 1))
    expect(page.locator("#reuse-rate")).to_have_text(f"{100 * total_reused / total_prompt:.1f} %")
    expect(page.locator("#reuse-rate")).not_to_have_text("0.0 %")

    # Models: every model the gateway lists, with its state where the gateway publishes one.
    listed = _admin_get(stack, "/v1/models").json()["data"]
    model_rows = page.locator("#models-body tr")
    expect(model_rows).to_have_count(len(listed))
    for model in listed:
        row = model_rows.filter(has_text=model["id"])
        expect(row).to_have_count(1)
        if "state" in model:
            expect(row.locator("td").nth(1)).to_have_text(model["state"])
    assert MODEL in {m["id"] for m in listed}

    # A batch sent with the official client shows up in the batches panel with its key and request count.
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.admin_key)
    line = {"custom_id": "one", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}}
    uploaded = client.files.create(file=("one.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    listed_batch = next(b for b in _admin_get(stack, "/admin/batches").json()["data"] if b["id"] == batch.id)
    page.get_by_role("button", name="Refresh batches").click()
    row = page.locator("#batches-body tr").filter(has_text=batch.id)
    expect(row).to_have_count(1)
    expect(row.locator("td").nth(1)).to_have_text(listed_batch["key_name"])
    expect(row.locator("td").nth(3)).to_have_text(re.compile(r"^[01] / 1$"))

    # Batches and users: a panel shows what its endpoint lists, or hides while the gateway answers 404.
    for name, path, field in (("batches", "/admin/batches", "id"), ("users", "/admin/users", "subject")):
        response = _admin_get(stack, path)
        panel = page.locator(f"#{name}-panel")
        if response.status_code == 404:
            expect(panel).to_be_hidden()
            continue
        assert response.status_code == 200, (path, response.text)
        body = response.json()
        items = body if isinstance(body, list) else body.get("data", body.get(name, []))
        expect(panel).to_be_visible()
        expect(page.locator(f"#{name}-body tr")).to_have_count(len(items))
        for item in items:
            expect(page.locator(f"#{name}-body")).to_contain_text(str(item[field]))
    screenshot(page, "admin-panels-laptop")

    # On a phone the panels stack in one column, tables read as lines, nothing scrolls sideways.
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.locator("#workers-body tr.worker").first.locator("td").first).to_have_css("display", "grid")
    widths = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], widths
    boxes = page.evaluate("""() => [...document.querySelectorAll('.admin main > .panel')]
      .filter((p) => !p.hidden).map((p) => { const r = p.getBoundingClientRect();
        return {id: p.getAttribute('aria-labelledby'), x: r.x, right: r.right, top: r.top, bottom: r.bottom}; })""")
    assert len(boxes) >= 6, boxes
    for above, below in pairwise(boxes):
        assert below["top"] >= above["bottom"], (above, below)  # one under the other
    assert all(b["x"] >= 0 and b["right"] <= 390 for b in boxes), boxes
    assert len({round(b["x"]) for b in boxes}) == 1, boxes
    screenshot(page, "admin-panels-phone")

    # A gateway without a panel's endpoint answers 404 there: the panel hides itself (the module, on a real 404).
    hidden = page.evaluate("""async () => {
      const { EndpointPanel } = await import('/static/js/admin_panels.js');
      const panel = new EndpointPanel({ name: 'batches', path: '/admin/no-such-panel', render: () => null,
                                        onAuthLost: () => {} });
      const before = panel.section.hidden;
      await panel.refresh();
      return [before, panel.section.hidden]; }""")
    assert hidden == [False, True], hidden
    assert _admin_get(stack, "/admin/no-such-panel").status_code == 404


def test_the_users_panel_lists_a_signed_in_person_and_disables_her(page: Any, stack: BrowserAppliance,
                                                                   provider_gateway: ProviderGateway) -> None:
    carol = provider_gateway.person("carol")
    provider_gateway.sign_in_over_http(carol)  # with the real provider, at the gateway that signs people in
    sign_in(page, stack.admin_key, "/admin")  # the package's gateway (same Redis) lists her
    row = page.locator("#users-body tr").filter(has_text=carol.sub)
    expect(row).to_have_count(1)
    cells = row.locator("td")
    expect(cells.nth(0)).to_have_text(f"Carol ({carol.sub})")
    expect(cells.nth(1)).to_have_text("carol@example.com")
    expect(cells.nth(2)).to_have_text("user")
    expect(cells.nth(3)).to_have_text("staff")
    expect(cells.nth(5)).to_have_text("active")
    expect(cells.nth(6)).not_to_have_text("never")  # she signed in

    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name=f"Disable user {carol.sub}").click()
    expect(cells.nth(5)).to_have_text("disabled")
    listed = {u["subject"]: u for u in _admin_get(stack, "/admin/users").json()["data"]}
    assert listed[carol.sub]["disabled"] is True
    row.get_by_role("button", name=f"Enable user {carol.sub}").click()
    expect(cells.nth(5)).to_have_text("active")
    listed = {u["subject"]: u for u in _admin_get(stack, "/admin/users").json()["data"]}
    assert listed[carol.sub]["disabled"] is False
