"""Real processes on loopback for integration tests, through the benchmarks' harness (``appliance.bench.harness``):
start, wait until ready, always stop. What is added here is what tests alone want: the repository as the
working directory, the ``appliance`` CLI as an admin types it, Redis with AOF for the admin user."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from appliance.bench.harness import Service, free_port, http_ok, redis_process, service, wait_until
from appliance.bench.harness import python as python_module

__all__ = ["REPO", "Service", "free_port", "python_module", "redis_server", "run_cli", "run_service",
           "wait_http_ok"]

REPO = Path(__file__).resolve().parents[2]


def wait_http_ok(url: str, timeout: float, proc: Service | subprocess.Popen[bytes] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
    """Until ``url`` answers 200 (a 503 while a worker loads its model is waited through)."""
    wait_until(lambda: http_ok(url, headers), timeout, f"{url} ready", proc=proc)


@contextmanager
def run_service(argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, ready_url: str | None,
                ready_timeout: float = 60.0, ready_headers: Mapping[str, str] | None = None) -> Iterator[Service]:
    """A service process run from the repository, its output in ``log_path``, ready once ``ready_url`` is 200."""
    with service(argv, env, log=log_path, ready=ready_url, timeout=ready_timeout, headers=ready_headers,
                 cwd=REPO) as running:
        yield running


def run_cli(args: Sequence[str], *, env: Mapping[str, str], cwd: Path = REPO, timeout: float = 400,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """``appliance ARGS`` in a new process, as an admin types it; ``check``: a non-zero exit fails the test
    with the end of its stderr."""
    result = subprocess.run(python_module("appliance.cli", *args), env=dict(env), cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


@contextmanager
def redis_server(tmp_dir: Path, port: int | None = None, appendonly: bool = True) -> Iterator[tuple[Service, str]]:
    """A real redis-server locked like the local runtime's; yields it and the ``admin`` user's URL."""
    with redis_process(tmp_dir, user="admin", appendonly=appendonly, port=port) as (running, url):
        yield running, url
