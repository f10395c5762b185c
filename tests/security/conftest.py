"""One real stack (worker, balancer, RAG, gateway, Redis) shared by the security tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import Stack, appliance_stack


@pytest.fixture(scope="session")
def security_stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with appliance_stack(tmp_path_factory.mktemp("security-stack"), model_path=model_path, workers=1) as stack:
        yield stack

