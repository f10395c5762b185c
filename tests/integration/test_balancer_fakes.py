"""The balancer in front of failure-mode fake workers (real sockets on loopback, one event loop).

Fakes are used only where a failure must be produced on demand: death, hangs, 429/503,
loading, broken streams. The real-worker behaviour is in test_balancer_real_workers.py.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from appliance.bench.fake_worker import FakeState, fake_workers
from appliance.core.registry import announce, heartbeat, withdraw
from balancer.app import POOL
from balancer.worker import WorkerState
from tests.support.balancer_app import AUTH, MODEL, TOKEN, balancer, chat, post, stream_events, until

pytestmark = pytest.mark.integration

CONTRACT_METRICS = (
    "appliance_balancer_requests_total{", "appliance_balancer_inflight{", "appliance_balancer_worker_healthy{",
    "appliance_balancer_ejections_total{", "appliance_balancer_retries_total ", "appliance_balancer_queue_depth ",
    "appliance_balancer_queue_wait_seconds_bucket{", "appliance_balancer_upstream_latency_seconds_bucket{",
)


async def test_proxies_json_and_streams_with_ids_and_token() -> None:
    a, b = FakeState(name="a"), FakeState(name="b")
    async with fake_workers(a, b) as urls, balancer(urls) as (url, _), aiohttp.ClientSession() as client:
        status, _body, _headers = await post(client, url, chat(temperature=0.5), **{"X-Request-Id": "req-123"})
        served = a if a.requests else b
        assert status == 200 and served.last["temperature"] == 0.5
        assert served.last_request_id == "req-123" and served.last_token == TOKEN
        events = await stream_events(client, url, chat(stream=True))
        assert events[-1].is_done and not any(e.is_error for e in events)
        assert "".join(e.json()["choices"][0]["delta"]["content"] for e in events[:-1]).startswith("t0 t1")
        async with client.get(f"{url}/v1/models", headers=AUTH) as response:
            assert [m["id"] for m in (await response.json())["data"]] == [MODEL]
        async with client.get(f"{url}/health") as response:
            assert response.status == 200 and (await response.json())["healthy_workers"] == 2
        async with client.get(f"{url}/metrics") as response:
            exposition = await response.text()
        for name in CONTRACT_METRICS:  # docs/CONTRACTS.md: dashboards and alerts use exactly these
            assert f"\n{name}" in exposition, name
        served = [line for line in exposition.splitlines()
                  if line.startswith("appliance_balancer_requests_total{") and 'status="200"' in line]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in served) == 2  # one JSON answer, one stream


async def test_the_models_limits_are_the_strictest_its_workers_publish() -> None:
    """max_choices (n) like the other limits: the smallest over the workers; one that does not publish it
    (an older worker) adds no limit, and a model none of whose workers publish it shows none."""
    small = FakeState(name="a", limits={"context_length": 512, "max_tokens": 128, "max_choices": 4})
    large = FakeState(name="b", limits={"context_length": 1024, "max_tokens": 64, "max_choices": 8})
    older = FakeState(name="c", limits={"context_length": 2048, "max_tokens": 256})
    alone = FakeState(name="d", model="other", limits={"context_length": 2048, "max_tokens": 256})
    async with fake_workers(small, large, older, alone) as urls, balancer(urls) as (url, app), \
            aiohttp.ClientSession() as client:
        await until(lambda: all(w.limits is not None for w in app[POOL]))
        async with client.get(f"{url}/v1/models", headers=AUTH) as response:
            listed = {m["id"]: m for m in (await response.json())["data"]}
    assert {k: listed[MODEL].get(k) for k in ("context_length", "max_tokens", "max_choices")} == {
        "context_length": 512, "max_tokens": 64, "max_choices": 4}
    assert listed["other"]["max_tokens"] == 256 and "max_choices" not in listed["other"]


async def test_client_errors_are_openai_shaped() -> None:
    async with fake_workers(FakeState()) as urls, balancer(urls, max_body_bytes=2048) as (url, _), \
            aiohttp.ClientSession() as client:
        async with client.post(f"{url}/v1/chat/completions", json=chat()) as response:
            assert response.status == 401 and (await response.json())["error"]["type"] == "authentication_error"
        status, body, _ = await post(client, url, chat(model="nope"))
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body, _ = await post(client, url, chat(padding="x" * 4096))
        assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}
        async with client.post(f"{url}/v1/chat/completions", data=b"{not json", headers=AUTH) as response:
            assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_json"


async def test_load_spreads_by_capacity_and_never_exceeds_slots() -> None:
    states = [FakeState(name=n, mode="slow-stream", slots=s, delay=0.02) for n, s in (("a", 2), ("b", 4), ("c", 2))]
    async with fake_workers(*states) as urls, balancer(urls) as (url, app), aiohttp.ClientSession() as client:
        results = await asyncio.gather(*(post(client, url, chat()) for _ in range(64)))
        assert {status for status, _, _ in results} == {200}
        assert [s.max_active <= s.slots for s in states] == [True, True, True]
        assert states[1].requests > max(states[0].requests, states[2].requests)  # twice the slots, more work
        assert all(w.inflight == 0 for w in app[POOL])


async def test_full_pool_queues_then_answers_503_with_retry_after() -> None:
    state = FakeState(mode="slow-stream", slots=1, delay=0.3)
    async with fake_workers(state) as urls, balancer(urls, queue_size=1, queue_timeout_s=60) as (url, _app), \
            aiohttp.ClientSession() as client:
        results = await asyncio.gather(*(post(client, url, chat()) for _ in range(3)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [200, 200, 503] and state.max_active == 1
        rejected = next(r for r in results if r[0] == 503)
        assert rejected[2]["Retry-After"] and rejected[1]["error"]["code"] == "overloaded"
    async with fake_workers(FakeState(mode="slow-stream", slots=1, delay=0.5)) as urls, \
            balancer(urls, queue_timeout_s=0.1) as (url, _), aiohttp.ClientSession() as client:
        statuses = sorted(r[0] for r in await asyncio.gather(*(post(client, url, chat()) for _ in range(2))))
        assert statuses == [200, 503]


async def test_dead_worker_is_ejected_at_once_and_requests_retried() -> None:
    dead, alive = FakeState(name="dead"), FakeState(name="alive")
    async with fake_workers(dead, alive) as urls, balancer(urls, probe_interval_s=30) as (url, app), \
            aiohttp.ClientSession() as client:
        dead.mode = "die"
        results = await asyncio.gather(*(post(client, url, chat()) for _ in range(8)))
        assert [status for status, _, _ in results] == [200] * 8
        worker = app[POOL].get(urls[0])
        assert worker is not None and worker.state is WorkerState.EJECTED and worker.ejections == 1
        assert dead.requests >= 1 and alive.completed == 8
        async with client.get(f"{url}/metrics") as response:
            text = await response.text()
        assert "appliance_balancer_retries_total " in text and "appliance_balancer_ejections_total{" in text


async def test_retry_budget_stops_retry_storms_and_4xx_is_never_retried() -> None:
    states = [FakeState(name=n, mode="503") for n in "abc"]
    async with fake_workers(*states) as urls, balancer(urls, retry_budget_burst=2, retry_budget_ratio=0) as (url, _), \
            aiohttp.ClientSession() as client:
        results = [await post(client, url, chat()) for _ in range(10)]
        assert {r[0] for r in results} == {503} and all(r[2].get("Retry-After") for r in results)
        assert sum(s.requests for s in states) == 10 + 2  # every first attempt, and only 2 retries
        for state in states:
            state.mode = "429"
        results = [await post(client, url, chat()) for _ in range(6)]
        assert {r[0] for r in results} == {429}
        assert sum(s.requests for s in states) == 12 + 6


async def test_hung_worker_is_detected_and_readmitted_when_it_recovers() -> None:
    hung, fine = FakeState(name="hung"), FakeState(name="fine")
    async with fake_workers(hung, fine) as urls, balancer(urls, first_byte_timeout_s=0.5, strategy="round_robin") \
            as (url, app), aiohttp.ClientSession() as client:
        hung.mode = "hang"
        events = await asyncio.gather(*(stream_events(client, url, chat(stream=True)) for _ in range(4)))
        assert all(e[-1].is_done for e in events) and fine.completed == 4
        worker = app[POOL].get(urls[0])
        assert worker is not None
        await until(lambda: worker.state is WorkerState.EJECTED)
        hung.mode = "ok"
        await until(lambda: worker.state is WorkerState.HEALTHY)
        assert worker.good_probes >= 2


async def test_stream_broken_after_start_ends_with_error_event_not_done() -> None:
    async with fake_workers(FakeState(mode="die-mid-stream")) as urls, balancer(urls) as (url, _), \
            aiohttp.ClientSession() as client:
        events = await stream_events(client, url, chat(stream=True))
        assert [e.is_error for e in events] == [False, False, True]
        assert not any(e.is_done for e in events)
        assert events[-1].json()["error"]["type"] == "server_error"


async def test_client_disconnect_closes_the_upstream_request() -> None:
    state = FakeState(mode="slow-stream", chunks=200, delay=0.02)
    async with fake_workers(state) as urls, balancer(urls) as (url, app), aiohttp.ClientSession() as client:
        response = await client.post(f"{url}/v1/chat/completions", json=chat(stream=True), headers=AUTH)
        await response.content.readany()
        response.close()
        await until(lambda: state.disconnected == 1 and state.active == 0)
        await until(lambda: all(w.inflight == 0 for w in app[POOL]))
        assert state.completed == 0


async def test_loading_worker_gets_no_traffic_until_ready() -> None:
    loading, ready = FakeState(name="loading", mode="loading"), FakeState(name="ready")
    async with fake_workers(loading, ready) as urls, balancer(urls) as (url, app), aiohttp.ClientSession() as client:
        for _ in range(6):
            assert (await post(client, url, chat()))[0] == 200
        assert loading.requests == 0 and ready.completed == 6
        worker = app[POOL].get(urls[0])
        assert worker is not None and worker.state is WorkerState.LOADING
        loading.mode = "ok"
        await until(lambda: worker.state is WorkerState.HEALTHY)


async def test_workers_admin_adds_lists_and_drains() -> None:
    slow = FakeState(name="slow", mode="slow-stream", chunks=10, delay=0.05)
    async with fake_workers(slow) as urls, balancer([]) as (url, _app), aiohttp.ClientSession() as client:
        async with client.get(f"{url}/workers") as response:
            assert response.status == 401
        async with client.post(f"{url}/workers", json={"url": urls[0]}, headers=AUTH) as response:
            assert response.status == 201
            added = await response.json()
        assert added["state"] == "healthy" and added["slots"] == 8 and added["model"] == MODEL
        streaming = asyncio.create_task(stream_events(client, url, chat(stream=True)))
        await until(lambda: slow.active == 1)
        async with client.delete(f"{url}/workers", params={"url": urls[0]}, headers=AUTH) as response:
            assert response.status == 202 and (await response.json())["state"] == "draining"
        assert (await post(client, url, chat()))[0] == 503  # draining: no new traffic
        assert (await streaming)[-1].is_done  # the in-flight stream finishes
        async with client.get(f"{url}/workers", headers=AUTH) as response:
            assert (await response.json())["workers"] == []


async def test_workers_join_and_leave_through_the_redis_registry(redis_url: str) -> None:
    from redis.asyncio import Redis

    remote = FakeState(name="remote")
    async with fake_workers(remote) as urls, balancer([], redis_url=redis_url, registry_poll_s=0.1) as (url, app), \
            aiohttp.ClientSession() as client:
        redis = Redis.from_url(redis_url)
        beating = asyncio.create_task(heartbeat(redis, urls[0], MODEL, TOKEN, ttl_s=0.6, interval_s=0.15))
        try:
            await until(lambda: app[POOL].healthy_count == 1)
            assert (await post(client, url, chat()))[0] == 200 and remote.completed == 1
            await asyncio.sleep(1.0)  # longer than the TTL: only the heartbeat keeps it in
            assert app[POOL].healthy_count == 1
            beating.cancel()  # the worker "dies" without saying goodbye: its key expires
            await until(lambda: len(app[POOL]) == 0)
            await announce(redis, urls[0], MODEL, TOKEN, ttl_s=30)
            await until(lambda: app[POOL].healthy_count == 1)
            await withdraw(redis, urls[0])  # a clean shutdown deletes the key at once
            await until(lambda: len(app[POOL]) == 0)
        finally:
            beating.cancel()
            await redis.aclose()


async def test_requests_waiting_on_a_worker_move_on_when_probes_eject_it() -> None:
    """Non-streaming requests have no first-byte timeout; a hung worker's probes free them."""
    hung, fine = FakeState(name="hung"), FakeState(name="fine")
    async with fake_workers(hung, fine) as urls, \
            balancer(urls, strategy="round_robin", read_timeout_s=60) as (url, app), \
            aiohttp.ClientSession() as client:
        hung.mode = "hang"
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(post(client, url, chat()) for _ in range(4)))
        assert [r[0] for r in results] == [200] * 4 and fine.completed == 4
        # Probes ejected it (PROBE_TIMEOUT_S), long before the read timeout would have (60 s).
        assert asyncio.get_running_loop().time() - started < 60 / 2
        worker = app[POOL].get(urls[0])
        assert worker is not None and worker.errors["ejected"] >= 1 and not worker.pending and not worker.aborted
