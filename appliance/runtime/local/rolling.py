"""Rolling restart and live scaling of inference workers.

Workers join the balancer through the Redis registry once ready and leave it on SIGTERM
(withdraw, stay up while the balancer drains them, finish in-flight requests, exit). So a
worker is added by starting its program and removed by stopping it: the balancer process
is never restarted, and its ``/workers`` API is only read, to wait until a worker takes traffic.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx

from appliance.core.hop import INTERNAL_TOKEN_HEADER
from appliance.runtime.plan import Program
from appliance.runtime.protocol import RuntimeFailure

if TYPE_CHECKING:
    from appliance.runtime.local.runtime import LocalRuntime

__all__ = ["BalancerView", "rolling_restart", "scale_workers", "start_and_admit", "worker_replace"]


class BalancerView:
    """The balancer's `/workers` listing (internal token)."""

    def __init__(self, base_url: str, token: str, timeout: float = 10.0) -> None:
        self._client = httpx.Client(base_url=base_url, headers={INTERNAL_TOKEN_HEADER: token}, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def workers(self) -> list[dict[str, Any]]:
        response = self._client.get("/workers")
        response.raise_for_status()
        body = response.json()
        workers = (body.get("workers") or body.get("data") or []) if isinstance(body, dict) else body
        return list(workers)

    def routable(self, url: str) -> bool:
        return any(w.get("url") == url and w.get("state") == "healthy" for w in self.workers())

    def wait_routable(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.routable(url):
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"the balancer did not admit {url} within {timeout:.0f}s (is Redis up?)")
            time.sleep(0.2)


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def _worker_url(runtime: LocalRuntime, name: str) -> str:
    return f"http://127.0.0.1:{runtime.settings.worker_port(_index(name))}"


def _view(runtime: LocalRuntime) -> BalancerView:
    settings = runtime.settings
    return BalancerView(f"http://127.0.0.1:{settings.balancer_port}", settings.resolved_internal_token())


def _program(plan: list[Program], name: str) -> Program:
    return next(p for p in plan if p.name == name)


def start_and_admit(runtime: LocalRuntime, view: BalancerView, program: Program) -> None:
    runtime.supervisor.start(program.name, wait=False)
    runtime.progress(program.name, "starting", "")
    runtime.wait_ready(program)
    view.wait_routable(_worker_url(runtime, program.name), runtime.settings.ready_timeout_s)
    runtime.progress(program.name, "ready", "in the balancer")


def worker_replace(runtime: LocalRuntime, view: BalancerView, program: Program, reload_group: bool) -> None:
    """Stop (the worker withdraws and is drained first), start, wait until the balancer routes to it."""
    supervisor = runtime.supervisor
    runtime.progress(program.name, "draining", "withdrawn from the registry")
    supervisor.stop(program.name)
    if reload_group:  # its configuration changed: the new one applies to a re-added group
        supervisor.remove_group(program.name)
        supervisor.add_group(program.name)
    start_and_admit(runtime, view, program)


def rolling_restart(runtime: LocalRuntime, allow_outage: bool = False) -> list[str]:
    """Restart workers one at a time, each drained before it stops and admitted again before the next.

    Refused with a single worker (nobody would serve meanwhile) unless ``allow_outage``.
    """
    supervisor = runtime.supervisor
    names = sorted((i["name"] for i in supervisor.processes() if i["name"].startswith("inference-")), key=_index)
    if len(names) < 2 and not allow_outage:
        raise RuntimeFailure(
            "only one inference worker: restarting it leaves no one serving; run `appliance scale inference=2` "
            "first (or pass --allow-outage)"
        )
    plan = runtime.plan()
    runtime.write_files(plan)  # an edited appliance.toml ([worker] model...) applies worker by worker
    _added, changed, _removed = supervisor.reload_config()
    view = _view(runtime)
    try:
        for name in names:
            worker_replace(runtime, view, _program(plan, name), reload_group=name in changed)
    finally:
        view.close()
    return names


def scale_workers(runtime: LocalRuntime, count: int) -> tuple[list[str], list[str]]:
    """Add or remove workers live; returns (added, removed) program names.

    New workers start first; workers whose settings change (threads per worker follow the count)
    restart one at a time while the others serve; removed workers stop last, all together.
    """
    supervisor = runtime.supervisor
    running = {i["name"] for i in supervisor.processes() if i["name"].startswith("inference-")}
    runtime.settings = runtime.settings.model_copy(update={"workers": count})
    plan = runtime.plan()
    runtime.write_files(plan)
    added, changed, removed = supervisor.reload_config()
    added = sorted((n for n in added if n.startswith("inference-")), key=_index)
    removed = sorted((n for n in removed if n in running), key=_index)
    view = _view(runtime)
    try:
        for name in added:
            supervisor.add_group(name)
        for name in added:
            start_and_admit(runtime, view, _program(plan, name))
        for name in sorted((n for n in changed if n.startswith("inference-")), key=_index):
            worker_replace(runtime, view, _program(plan, name), reload_group=True)
    finally:
        view.close()
    runtime.stop_together(removed)
    for name in removed:
        supervisor.remove_group(name)
    runtime.start_missing()  # anything else the new configuration changed; a no-op otherwise
    return added, removed
