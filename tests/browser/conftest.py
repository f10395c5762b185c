"""The real stack on loopback (Redis, two inference workers, balancer, RAG, gateway: ``tests.support.stack``) and
Debian's Chromium driven by Playwright, for the web UI tests. One stack for the whole browser package."""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import BrowserAppliance, ProviderGateway
from tests.support.oidc_provider import IdpUser, installed, oidc_provider
from tests.support.processes import free_port, python_module, run_service
from tests.support.stack import appliance_stack
from tests.support.strict import STRICT

# Missing Playwright: a skip on a developer machine, an import error (a failure) under CI=true / ./scripts/test.
playwright_sync = import_module("playwright.sync_api") if STRICT else pytest.importorskip("playwright.sync_api")

CHROMIUM = Path(os.environ.get("APPLIANCE_TEST_CHROMIUM", "/usr/bin/chromium"))  # Debian's; tests name another
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

@pytest.fixture(scope="package")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserAppliance]:
    if not CHROMIUM.exists():  # before starting anything
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("browser-stack")
    with appliance_stack(tmp, model_path=model_path, workers=2,
                         worker_settings={"slots": "2", "n_ctx": "1024"},
                         gateway_settings={"model_info_ttl_s": "1", "rag_max_context_chars": "1200"}) as running:
        yield BrowserAppliance(running.gateway, running.admin_key, running.workers, tmp, running)


@pytest.fixture(scope="package")
def browser(stack: BrowserAppliance) -> Iterator[Any]:
    """Closed before the stack stops, so no open browser connection holds up the gateway's shutdown."""
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, stack: BrowserAppliance) -> Iterator[Any]:
    """A fresh browser context (empty sessionStorage and localStorage) at laptop size."""
    context = browser.new_context(base_url=stack.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(30_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="package")
def provider_gateway(stack: BrowserAppliance) -> Iterator[ProviderGateway]:
    """A second gateway on the package's stack (same Redis, workers and data dir) that signs people in with the
    real oidc-provider (tests/support/oidc_provider.mjs); key sign-in is off there. People: carol and dave
    (group staff, allowed)."""
    if not installed() and not STRICT:
        pytest.skip("oidc-provider is not installed (./scripts/test installs it into .cache/npm)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    people = [IdpUser("carol", ("staff",)), IdpUser("dave", ("staff",))]
    with oidc_provider(stack.tmp / "idp-staff", redirect_uris=[f"{url}/auth/callback"], users=people) as idp:
        env = {**stack.processes.env["gateway"], "APPLIANCE_GATEWAY_PORT": str(port),
               **idp.auth_settings(f"{url}/auth/callback", allowed_groups="staff")}
        with run_service(python_module("gateway"), env=env, log_path=stack.tmp / "logs" / "gateway-staff.log",
                         ready_url=f"{url}/healthz", ready_timeout=90):
            yield ProviderGateway(url, idp)
