"""Fixtures shared by every test layer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core.model_files import prepare_default_model
from tests.support.processes import redis_server

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The real default GGUF (assembled once into the repo's data dir, sha256 checked)."""
    return prepare_default_model(REPO / "data")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port for the whole session."""
    with redis_server(tmp_path_factory.mktemp("redis")) as (_, url):
        yield url
