"""Rolling restart and live scaling of inference workers, through the balancer's admin API."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from appliance.runtime.health import probe_http
from appliance.runtime.local import LocalRuntime, RuntimeFailure
from appliance.runtime.plan import worker_names

__all__ = ["BalancerAdmin", "rolling_restart", "scale_workers"]

Step = Callable[[str, str, str], None]


class BalancerAdmin:
    """The balancer's `/workers` API (internal token)."""

    def __init__(self, base_url: str, token: str, timeout: float = 10.0) -> None:
        self._client = httpx.Client(base_url=base_url, headers={"X-Internal-Token": token}, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def workers(self) -> list[dict[str, Any]]:
        response = self._client.get("/workers")
        response.raise_for_status()
        body = response.json()
        workers = (body.get("workers") or body.get("data") or []) if isinstance(body, dict) else body
        return list(workers)

    def add(self, url: str) -> None:
        self._client.post("/workers", json={"url": url}).raise_for_status()

    def drain_and_remove(self, url: str, timeout: float) -> None:
        """Stop new traffic to ``url``, wait for its in-flight requests, then remove it."""
        response = self._client.delete("/workers", params={"url": url, "wait": str(timeout)}, timeout=timeout + 10)
        if response.status_code != 404:
            response.raise_for_status()


def _worker_url(runtime: LocalRuntime, index: int) -> str:
    return f"http://127.0.0.1:{runtime.settings.worker_port(index)}"


def _admin(runtime: LocalRuntime) -> BalancerAdmin:
    settings = runtime.settings
    return BalancerAdmin(f"http://127.0.0.1:{settings.balancer_port}", settings.resolved_internal_token())


def _wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not probe_http(f"{url}/health").ok:
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"{url} did not become healthy in {timeout:.0f}s")
        time.sleep(0.2)


def rolling_restart(runtime: LocalRuntime, drain_timeout: float = 120.0) -> list[str]:
    """Restart workers one at a time: drained, restarted, readmitted when healthy. No request fails."""
    admin = _admin(runtime)
    supervisor = runtime.supervisor
    names = sorted(info["name"] for info in supervisor.processes() if info["name"].startswith("inference-"))
    try:
        for name in names:
            index = int(name.rsplit("-", 1)[1])
            url = _worker_url(runtime, index)
            runtime.progress(name, "draining", url)
            admin.drain_and_remove(url, drain_timeout)
            runtime.progress(name, "stopping", "")
            supervisor.stop(name)
            supervisor.start(name, wait=False)
            runtime.progress(name, "starting", "")
            _wait_healthy(url, runtime.settings.ready_timeout_s)
            admin.add(url)
            runtime.progress(name, "ready", "readmitted")
    finally:
        admin.close()
    return names


def scale_workers(runtime: LocalRuntime, count: int) -> tuple[list[str], list[str]]:
    """Add or remove workers live; returns (added, removed) program names."""
    supervisor = runtime.supervisor
    before = {info["name"] for info in supervisor.processes() if info["name"].startswith("inference-")}
    wanted = set(worker_names(count))
    admin = _admin(runtime)
    try:
        removed = sorted(before - wanted, key=lambda n: int(n.rsplit("-", 1)[1]))
        for name in removed:
            admin.drain_and_remove(_worker_url(runtime, int(name.rsplit("-", 1)[1])), 120.0)
        runtime.settings = runtime.settings.model_copy(update={"workers": count})
        runtime.up()  # rewrites the supervisord config: adds new programs, removes dropped ones
        added = sorted(wanted - before, key=lambda n: int(n.rsplit("-", 1)[1]))
        for name in added:
            admin.add(_worker_url(runtime, int(name.rsplit("-", 1)[1])))
    finally:
        admin.close()
    return added, removed
