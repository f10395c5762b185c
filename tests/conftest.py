"""Fixtures shared by every test layer, and the rule that a missing dependency fails the suite in CI.

Under ``CI=true`` and ``./scripts/test`` (``APPLIANCE_TEST_STRICT=1``) a skip is a failure unless its reason
names the one part that cannot exist on a machine by installing packages: a GPU. Chromium, Playwright,
Prometheus and its exporters are installed by ``./scripts/test``; missing, they fail the run instead of
leaving it green with those checks silently not done.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core.model_files import prepare_default_model
from tests.support.processes import redis_server
from tests.support.strict import fail_strict_skip

REPO = Path(__file__).resolve().parent.parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    fail_strict_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    fail_strict_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The real default GGUF (assembled once into the repo's data dir, sha256 checked)."""
    return prepare_default_model(REPO / "data")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port for the whole session."""
    with redis_server(tmp_path_factory.mktemp("redis")) as (_, url):
        yield url
