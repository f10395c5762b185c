"""Redis killed under load (AOF everysec), and SIGTERM to gateway and balancer with 20 streams open.

Behind the real gateway and balancer sit fake workers (``appliance.bench.fake_worker``):
these tests are about the gateway's and balancer's own behaviour, and the fakes make the
streams' length exact. Figures go to ``artifacts/chaos/*.json``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.bench.harness import wait_until
from tests.support.figures import record_figures
from tests.support.stack import LoopbackAppliance, appliance_stack, restart_redis
from tests.support.streams import stream_chat

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path, fake_workers=2, rag="none",
                         balancer_settings={"probe_interval_s": "0.5"}) as stack:
        yield stack


def _slow_streams(stack: LoopbackAppliance, chunks: int, delay: float) -> None:
    for url in stack.workers:
        body = json.dumps({"mode": "slow-stream", "chunks": chunks, "delay": delay}).encode()
        request = urllib.request.Request(f"{url}/_mode", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except OSError:
        return 0  # refused or reset: not ready


def _admin(stack: LoopbackAppliance) -> httpx.Client:
    return httpx.Client(base_url=stack.gateway, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=10)


def test_redis_kill_9_under_load(stack: LoopbackAppliance) -> None:
    """Keys are created (acknowledged writes) and chats served while redis-server is killed and restarted."""
    key = stack.create_key("load", ("chat",), rpm=100000)
    acked: list[tuple[float, str]] = []
    statuses: list[int] = []
    stop = time.monotonic() + 9
    killed_at = restarted_at = 0.0
    with _admin(stack) as admin, httpx.Client(base_url=stack.gateway, timeout=10,
                                              headers={"Authorization": f"Bearer {key}"}) as api:
        index = 0
        while time.monotonic() < stop:
            index += 1
            created = admin.post("/admin/keys", json={"name": f"k{index}", "scopes": ["chat"]})
            statuses.append(created.status_code)
            if created.status_code == 201:
                acked.append((time.monotonic(), created.json()["id"]))
            chat = api.post("/v1/chat/completions", json={
                "model": stack.model, "max_tokens": 2, "messages": [{"role": "user", "content": f"c{index % 5}"}]})
            statuses.append(chat.status_code)
            if not killed_at and time.monotonic() > stop - 6:
                stack.services["redis"].signal(signal.SIGKILL)
                killed_at = time.monotonic()
            if killed_at and time.monotonic() > killed_at + 2 and stack.services["redis"].proc.poll() is not None:
                restart_redis(stack)
                restarted_at = time.monotonic()
        if not restarted_at:
            restart_redis(stack)
            restarted_at = time.monotonic()
        wait_until(lambda: admin.get("/admin/keys").status_code == 200, 20, "gateway reconnected", interval=0.1)
        reconnect_s = min([at for at, _ in acked if at > restarted_at] or [time.monotonic()]) - restarted_at
        present = {k["id"] for k in admin.get("/admin/keys").json()["data"]}
    lost = [(at, key_id) for at, key_id in acked if key_id not in present]
    window = max((killed_at - at for at, _ in lost), default=0.0)
    server_errors = [s for s in statuses if s >= 500 and s != 503]
    before_kill = [at for at, _ in acked if at < killed_at]
    after_restart = [at for at, _ in acked if at > restarted_at]
    record_figures("chaos_redis_kill9", acknowledged_writes=len(acked), acknowledged_writes_lost=len(lost),
                   lost_window_before_kill_s=round(window, 3), responses=len(statuses),
                   status_counts=status_counts(statuses),
                   reconnect_after_restart_s=round(reconnect_s, 2))
    assert not server_errors, "5xx other than 503 while Redis was down"
    # Writes were acknowledged before the kill and again after the restart (a gateway answering 503 to
    # everything acknowledges nothing and loses nothing: that is not durability).
    assert len(before_kill) >= 3 and after_restart, (len(before_kill), len(after_restart), status_counts(statuses))
    # A lost write acknowledged after the kill was written by nobody (window < 0): never allowed.
    assert all(at < killed_at for at, _ in lost), f"writes acknowledged after the kill were lost: {lost}"
    assert window <= 1.5, f"lost writes acknowledged {window:.2f}s before the kill (AOF everysec allows ~1s)"


def status_counts(statuses: list[int]) -> dict[str, int]:
    return {str(s): statuses.count(s) for s in sorted(set(statuses))}


async def _term_with_streams(
    stack: LoopbackAppliance, name: str, base: str, ready: str, headers: dict[str, str]
) -> None:
    chunks, delay = 50, 0.1
    _slow_streams(stack, chunks=chunks, delay=delay)  # 5 s streams, paced by the fake workers
    service = stack.services[name]
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30,
                                 limits=httpx.Limits(max_connections=40)) as client:
        tasks = [asyncio.create_task(stream_chat(client, i, model=stack.model, max_tokens=chunks)) for i in range(20)]
        await asyncio.sleep(1.0)
        service.signal(signal.SIGTERM)
        termed = time.monotonic()
        # Not ready while the streams still flow: no wall-clock threshold, the event order is what counts.
        not_ready_s = await asyncio.to_thread(wait_until, lambda: _status(ready, headers) != 200, chunks * delay,
                                              f"{name} not ready", interval=0.02)
        finished_before_not_ready = sum(task.done() for task in tasks)
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    code = await asyncio.to_thread(service.proc.wait, 15)
    exited_s = time.monotonic() - termed
    finished = sum(o.done for o in outcomes)
    record_figures(f"chaos_sigterm_{name}", streams=20, finished=finished, not_ready_after_s=round(not_ready_s, 3),
                   exit_code=code, exited_after_s=round(exited_s, 2))
    assert finished == 20, [(o.status, o.chunks, o.exception) for o in outcomes if not o.done]
    assert finished_before_not_ready == 0, "readiness stayed up until streams had ended"
    assert code == 0


async def test_sigterm_gateway_with_20_streams(stack: LoopbackAppliance) -> None:
    key = stack.create_key("streams", ("chat",))
    await _term_with_streams(stack, "gateway", stack.gateway, f"{stack.gateway}/readyz",
                             {"Authorization": f"Bearer {key}"})


async def test_sigterm_balancer_with_20_streams(stack: LoopbackAppliance) -> None:
    await _term_with_streams(stack, "balancer", stack.balancer, f"{stack.balancer}/health",
                             stack.internal_headers())
