"""The real stack on loopback (Redis, two inference workers, balancer, RAG, gateway) and Debian's Chromium
driven by Playwright, for the web UI tests. One stack for the whole browser package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import free_port, python_module, run_service, wait_http_ok

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-internal-token"
MODEL = "gemma-3-270m"


@dataclass
class Stack:
    url: str
    admin_key: str
    workers: list[str]
    tmp: Path

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


def _start_workers(stack: ExitStack, common: dict[str, str], model_path: Path, tmp: Path) -> list[str]:
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    env = {**common, "APPLIANCE_WORKER_MODEL_PATH": str(model_path), "APPLIANCE_WORKER_SLOTS": "2",
           "APPLIANCE_WORKER_N_THREADS": "1", "APPLIANCE_WORKER_N_CTX": "1024"}
    services = [stack.enter_context(run_service(
        python_module("inference"), env={**env, "APPLIANCE_WORKER_PORT": url.rsplit(":", 1)[1]},
        log_path=tmp / f"worker{i}.log", ready_url=None)) for i, url in enumerate(urls)]
    for url, service in zip(urls, services, strict=True):  # they load in parallel
        wait_http_ok(f"{url}/health", 120, service.proc)
    return urls


@pytest.fixture(scope="package")
def stack(model_path: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("browser-stack")
    common = {"APPLIANCE_CONFIG": "", "APPLIANCE_DATA_DIR": str(tmp), "APPLIANCE_INTERNAL_TOKEN": TOKEN,
              "APPLIANCE_LOG_LEVEL": "WARNING"}
    redis_db = redis_url.rsplit("/", 1)[0] + "/9"  # a database of its own on the shared test Redis
    with ExitStack() as es:
        rag_port, balancer_port, gateway_port = free_port(), free_port(), free_port()
        rag = es.enter_context(run_service(
            python_module("rag"), env={**common, "APPLIANCE_RAG_PORT": str(rag_port)}, log_path=tmp / "rag.log",
            ready_url=None))
        workers = _start_workers(es, common, model_path, tmp)
        balancer_env = {**common, "APPLIANCE_BALANCER_PORT": str(balancer_port),
                        "APPLIANCE_BALANCER_WORKERS": ",".join(workers), "APPLIANCE_BALANCER_PROBE_INTERVAL_S": "0.5"}
        es.enter_context(run_service(python_module("balancer"), env=balancer_env, log_path=tmp / "balancer.log",
                                     ready_url=f"http://127.0.0.1:{balancer_port}/health"))
        wait_http_ok(f"http://127.0.0.1:{rag_port}/health", 120, rag.proc)
        gateway_env = {
            **common, "APPLIANCE_GATEWAY_PORT": str(gateway_port), "APPLIANCE_GATEWAY_REDIS_URL": redis_db,
            "APPLIANCE_GATEWAY_BALANCER_URL": f"http://127.0.0.1:{balancer_port}",
            "APPLIANCE_GATEWAY_RAG_URL": f"http://127.0.0.1:{rag_port}",
            "APPLIANCE_GATEWAY_MODEL_INFO_TTL_S": "1", "APPLIANCE_GATEWAY_RAG_MAX_CONTEXT_CHARS": "1200",
        }
        url = f"http://127.0.0.1:{gateway_port}"
        es.enter_context(run_service(python_module("gateway"), env=gateway_env, log_path=tmp / "gateway.log",
                                     ready_url=f"{url}/readyz"))
        yield Stack(url, (tmp / "admin_key").read_text().strip(), workers, tmp)


@pytest.fixture(scope="package")
def browser(stack: Stack) -> Iterator[Any]:
    """Closed before the stack stops, so no open browser connection holds up the gateway's shutdown."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Any]:
    """A fresh browser context (empty sessionStorage and localStorage) at laptop size."""
    context = browser.new_context(base_url=stack.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(30_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"
