"""Stacks shared by the security tests: one with a real worker, one with the real RAG service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.connection_watch import ConnectionWatch
from tests.support.stack import LoopbackAppliance, appliance_stack

RAG_BYTES_PER_KEY = 64 * 1024  # what one non-admin key may store on rag_stack
RAG_JOBS_PER_KEY = 2


@pytest.fixture(scope="session")
def security_stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("security-stack"), model_path=model_path, workers=1) as stack:
        yield stack


@pytest.fixture(scope="session")
def rag_watch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConnectionWatch]:
    """Real Redis, the real RAG service, a real gateway and the fake balancer (which records what it is sent:
    ``GET /_last``), its processes watched for connections beyond loopback from the start."""
    with appliance_stack(tmp_path_factory.mktemp("rag-security"), upstream="fake", rag="real",
                         gateway_settings={"rag_max_bytes_per_key": str(RAG_BYTES_PER_KEY)},
                         rag_settings={"max_jobs_per_key": str(RAG_JOBS_PER_KEY)}) as stack:
        watch = ConnectionWatch(stack)
        watch.start()
        yield watch
        watch.halt.set()
        watch.join(5)


@pytest.fixture(scope="session")
def rag_stack(rag_watch: ConnectionWatch) -> LoopbackAppliance:
    return rag_watch.stack
