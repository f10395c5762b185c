"""Start the real RAG service (``python -m rag``, real embedding model) on loopback for tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.processes import Service, free_port, python_module, run_service

TOKEN = "rag-integration-token-padded-to-at-least-32-characters"


@contextmanager
def rag_process(data_dir: Path, port: int | None = None, **settings: str) -> Iterator[tuple[Service, str]]:
    port = port or free_port()
    env = {"APPLIANCE_DATA_DIR": str(data_dir), "APPLIANCE_RAG_PORT": str(port),
           "APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_LOG_JSON": "true", "APPLIANCE_CONFIG": "",
           **{f"APPLIANCE_RAG_{key.upper()}": value for key, value in settings.items()}}
    url = f"http://127.0.0.1:{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    with run_service(python_module("rag"), env=env, log_path=data_dir / "rag.log", ready_url=f"{url}/health",
                     ready_timeout=120) as service:
        yield service, url
