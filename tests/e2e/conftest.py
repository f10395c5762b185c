"""Stacks shared by the e2e modules that drive third-party clients (the Agents SDK, Codex CLI)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.stack import LoopbackAppliance, appliance_stack


@pytest.fixture(scope="session")
def clients_stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    """One real worker (the bundled model) behind a balancer and a gateway, with room for Codex's prompt."""
    with appliance_stack(tmp_path_factory.mktemp("clients"), model_path=model_path, workers=1, rag="none",
                         worker_settings={"slots": "2", "n_ctx": "4096"}) as stack:
        yield stack


@pytest.fixture(scope="session")
def new_chat_key(clients_stack: LoopbackAppliance) -> Callable[[str], str]:
    """Make a chat-scoped key on the clients' stack (one per client, so their prefix caches stay apart)."""

    def make(name: str) -> str:
        with httpx.Client(base_url=clients_stack.gateway, timeout=60,
                          headers={"Authorization": f"Bearer {clients_stack.admin_key}"}) as admin:
            response = admin.post("/admin/keys", json={"name": name, "scopes": ["chat"]})
        assert response.status_code == 201, response.text
        return str(response.json()["key"])

    return make
