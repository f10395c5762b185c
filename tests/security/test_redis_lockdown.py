"""Redis is locked: a local process without a password can do nothing, each service's user only its own
work, a worker entry not signed with the internal token gets no traffic, a short internal token refuses
to start, and the response cache can neither push out keys and usage nor outlive its TTL cap.

Real redis-server (the one the local runtime starts, with the runtime's own arguments and ACL file), a
real balancer and real gateway processes on loopback; only the workers are fakes (they record what
reaches them)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from appliance.bench.fake_worker import FakeState, fake_workers, serving
from appliance.bench.harness import redis_answers, wait_until
from balancer import BalancerSettings, create_app
from tests.support.gateway_harness import fake_upstream, gateway
from tests.support.processes import REPO, Service, free_port, python_module, redis_server

pytestmark = pytest.mark.integration

TOKEN = "redis-lockdown-test-internal-token-0123456789"
MODEL = "fake-model"
PREFIX = "appliance:workers:"


def _raw(port: int, *args: str) -> bytes:
    """One command over a bare socket, as any local process could send it; the raw reply."""
    payload = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        return sock.recv(256)


@contextmanager
def runtime_redis(tmp: Path, maxmemory: str = "64mb") -> Iterator[tuple[int, Path]]:
    """redis-server exactly as `appliance up` starts it (plan.redis_argv, the ACL file the runtime writes)."""
    from appliance.core.redis_auth import ensure_redis_users
    from appliance.runtime.plan import redis_argv
    from appliance.runtime.settings import RuntimeSettings

    data = (tmp / "data").resolve()
    (data / "redis").mkdir(parents=True)
    settings = RuntimeSettings(data_dir=data, redis_port=free_port(), redis_maxmemory=maxmemory,
                               internal_token=TOKEN)
    ensure_redis_users(data)
    service = Service(redis_argv(settings, data), {}, tmp / "redis.log")
    try:
        wait_until(lambda: redis_answers(settings.redis_port), 10, "redis-server", proc=service)
        yield settings.redis_port, data
    finally:
        service.stop()


def _login(data: Path, port: int, user: str) -> redis.Redis:
    from appliance.core.redis_auth import password_file, read_login

    return redis.Redis(port=port, socket_timeout=5, **read_login(user, password_file(data, user)).kwargs())


def test_a_process_without_a_password_can_neither_read_nor_write_redis(tmp_path: Path) -> None:
    with runtime_redis(tmp_path) as (port, data):
        admin = _login(data, port, "admin")
        admin.hset("gw:key:" + "ab" * 32, mapping={"id": "key_victim", "scopes": "chat"})
        for command in (("HGETALL", "gw:key:" + "ab" * 32), ("KEYS", "*"), ("GET", "gw:usage:2026-12-07"),
                        ("HSET", "gw:key:" + "cd" * 32, "scopes", "admin,chat"),
                        ("SET", PREFIX + "http://127.0.0.1:1", '{"url": "http://127.0.0.1:1"}'),
                        ("CONFIG", "SET", "appendonly", "no"), ("FLUSHALL",)):
            assert _raw(port, *command).startswith(b"-NOAUTH"), command
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, username="gateway", password="guessed", socket_timeout=5).ping()
        with pytest.raises(redis.AuthenticationError):  # the default user has no password and is off
            redis.Redis(port=port, username="default", password="", socket_timeout=5).ping()
        assert admin.hgetall("gw:key:" + "ab" * 32) == {b"id": b"key_victim", b"scopes": b"chat"}
        assert admin.exists(PREFIX + "http://127.0.0.1:1", "gw:key:" + "cd" * 32) == 0


def test_each_service_user_can_do_only_its_own_work(tmp_path: Path) -> None:
    key = "gw:key:" + "ab" * 32
    worker_key = PREFIX + "http://127.0.0.1:9"
    with runtime_redis(tmp_path) as (port, data):
        gateway_user, balancer_user = _login(data, port, "gateway"), _login(data, port, "balancer")
        worker_user, exporter_user = _login(data, port, "worker"), _login(data, port, "exporter")
        gateway_user.hset(key, mapping={"id": "key_1", "scopes": "chat"})
        worker_user.set(worker_key, "{}", px=60_000)
        denied = [
            (gateway_user, lambda c: c.set(PREFIX + "http://127.0.0.1:2", "{}")),  # no worker registrations
            (gateway_user, lambda c: c.config_set("appendonly", "no")),
            (gateway_user, lambda c: c.flushall()),
            (gateway_user, lambda c: c.execute_command("ACL", "LIST")),
            (balancer_user, lambda c: c.hgetall(key)),  # cannot read key hashes
            (balancer_user, lambda c: c.set(worker_key, "{}")),  # reads the registry, never writes it
            (balancer_user, lambda c: c.delete(worker_key)),
            (worker_user, lambda c: c.hgetall(key)),
            (worker_user, lambda c: c.hset("gw:key:" + "cd" * 32, "scopes", "admin")),
            (exporter_user, lambda c: c.get(worker_key)),  # read-only, and no data at all
            (exporter_user, lambda c: c.hgetall(key)),
            (exporter_user, lambda c: c.set("gw:stats", "1")),
            (exporter_user, lambda c: c.config_set("maxmemory", "0")),
        ]
        for client, command in denied:
            with pytest.raises(redis.exceptions.NoPermissionError):
                command(client)
        assert balancer_user.get(worker_key) == b"{}"
        assert list(balancer_user.scan_iter(match=PREFIX + "*")) == [worker_key.encode()]
        assert exporter_user.info("memory")["maxmemory_policy"] == "noeviction"
        assert int(exporter_user.info("memory")["maxmemory"]) == 64 * 1024 * 1024
        assert gateway_user.hget(key, "scopes") == b"chat"
    # The secrets on disk: owner-only, and the ACL file holds hashes, not the passwords.
    from appliance.core.redis_auth import acl_file, password_file, redis_dir

    assert redis_dir(data).stat().st_mode & 0o777 == 0o700
    acl_text = acl_file(data).read_text()
    for user in ("gateway", "balancer", "worker", "exporter", "admin"):
        path = password_file(data, user)
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.read_text().strip() not in acl_text
    assert acl_file(data).stat().st_mode & 0o777 == 0o600


@asynccontextmanager
async def balancer_app(settings: BalancerSettings) -> AsyncIterator[str]:
    async with serving(create_app(settings)) as url:
        yield url


async def _chats(balancer: str, count: int) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession(headers={"X-Internal-Token": TOKEN}) as http:
        for n in range(count):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"secret prompt {n}"}]}
            async with http.post(f"{balancer}/v1/chat/completions", json=body) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


async def test_a_worker_entry_not_signed_with_the_internal_token_gets_no_traffic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack: a process that can write Redis (a leaked password; before this fix, any local process)
    registers its own listener as a worker, unsigned or signed with a guessed key. The balancer must never
    probe it, send it the internal token or a prompt; the real worker keeps serving everything."""
    rogue, forged, good = FakeState(name="rogue"), FakeState(name="forged"), FakeState(name="good")
    with redis_server(tmp_path / "redis") as (_, url):
        async with fake_workers(rogue, forged, good) as (rogue_url, forged_url, good_url):
            writer = Redis.from_url(url)
            await writer.set(PREFIX + rogue_url, json.dumps({"url": rogue_url, "model": MODEL}), px=60_000)
            expires_ms = int(time.time() * 1000) + 60_000
            message = f"appliance-worker-registration-v1\n{forged_url}\n{MODEL}\n{expires_ms}".encode()
            sig = hmac.new(b"a-guessed-internal-token-0123456789abcd", message, hashlib.sha256).hexdigest()
            await writer.set(PREFIX + forged_url, json.dumps({"url": forged_url, "model": MODEL,
                                                              "expires_ms": expires_ms, "sig": sig}), px=60_000)
            settings = BalancerSettings(workers=(good_url,), internal_token=TOKEN, redis_url=url,
                                        registry_poll_s=0.1, probe_interval_s=0.1, probe_timeout_s=2.0)
            caplog.set_level(logging.WARNING, logger="balancer.registry")
            async with balancer_app(settings) as balancer:
                await asyncio.sleep(1.5)  # fifteen registry polls
                statuses = await _chats(balancer, 12)
                async with aiohttp.ClientSession() as http, \
                        http.get(f"{balancer}/workers", headers={"X-Internal-Token": TOKEN}) as response:
                    listed = [w["url"] for w in (await response.json())["workers"]]
            await writer.aclose()
    assert statuses == [200] * 12
    for fake in (rogue, forged):
        assert (fake.requests, fake.paths, fake.last_token) == (0, [], None), f"{fake.name} was reached"
    assert good.requests == 12
    assert listed == [good_url]
    refused = [r for r in caplog.records if "not signed" in r.getMessage()]
    assert sorted(getattr(r, "key", "") for r in refused) == sorted([PREFIX + rogue_url, PREFIX + forged_url])
    assert all(TOKEN not in r.getMessage() and TOKEN not in str(r.__dict__) for r in caplog.records)


async def test_a_signed_worker_joins_through_its_own_redis_user_and_serves(tmp_path: Path) -> None:
    """The real registration code (worker user, password file) and the real watcher (balancer user)."""
    from appliance.core.redis_auth import login_kwargs, password_file
    from inference.registration import Registration

    good = FakeState(name="good")
    redis_dir = tmp_path / "redis"
    with redis_server(redis_dir) as (_, admin_url):
        plain_url = "redis://" + admin_url.rsplit("@", 1)[1]  # no credentials: the services read their files
        async with fake_workers(good) as (good_url,):
            worker_client = Redis.from_url(plain_url, **login_kwargs("worker", password_file(redis_dir, "worker")))
            registration = Registration(worker_client, good_url, MODEL, lambda: True, token=TOKEN,
                                        heartbeat_s=0.2, ttl_s=3.0, grace_s=0.0)
            registration.start()
            settings = BalancerSettings(internal_token=TOKEN, redis_url=plain_url, registry_poll_s=0.1,
                                        redis_password_file=password_file(redis_dir, "balancer"),
                                        probe_interval_s=0.1, probe_timeout_s=2.0)
            try:
                async with balancer_app(settings) as balancer:
                    deadline = time.monotonic() + 10
                    while good.requests == 0 and time.monotonic() < deadline:
                        statuses = await _chats(balancer, 1)
                        await asyncio.sleep(0.1)
                    statuses = await _chats(balancer, 5)
                    reader = Redis.from_url(admin_url)
                    stored = json.loads(await reader.get(PREFIX + good_url) or b"{}")
                    await reader.aclose()
            finally:
                await registration.close()
                await worker_client.aclose()
    assert statuses == [200] * 5 and good.requests >= 5
    assert good.last_token == TOKEN
    assert set(stored) == {"url", "model", "expires_ms", "sig"} and TOKEN not in json.dumps(stored)


def _start(module: str, env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "APPLIANCE_DATA_DIR": str(tmp / "data"), "APPLIANCE_CONFIG": "",
            "APPLIANCE_LOG_JSON": "false"}
    return subprocess.run(python_module(module), env={**base, **env}, cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(("module", "token"), [("balancer", "short-token"), ("gateway", "x" * 31),
                                               ("inference", "0123456789abcdef0123456789abcde")])
def test_a_short_internal_token_refuses_to_start(module: str, token: str, tmp_path: Path) -> None:
    done = _start(module, {"APPLIANCE_INTERNAL_TOKEN": token}, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "internal_token" in done.stderr and "at least 32 characters" in done.stderr
    assert token not in done.stderr  # the message says how long, never what


@pytest.mark.parametrize("content", ["", "too-short\n"])
def test_an_empty_or_short_token_file_refuses_to_start(content: str, tmp_path: Path) -> None:
    (tmp_path / "data" / "run").mkdir(parents=True)
    (tmp_path / "data" / "run" / "internal_token").write_text(content)
    done = _start("balancer", {}, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "fewer than 32" in done.stderr and "refusing to start" in done.stderr


def test_an_empty_token_never_turns_internal_authentication_off() -> None:
    from appliance.core.edge import edge_middleware

    for token in ("", "x" * 31):
        with pytest.raises(ValueError, match="at least 32"):
            edge_middleware("worker", token)


def _memory(client: redis.Redis) -> dict[str, Any]:
    return dict(client.info("memory")) | dict(client.info("stats"))


def test_the_response_cache_cannot_push_out_keys_or_usage_and_its_ttl_is_capped(tmp_path: Path) -> None:
    cap = 64 * 1024
    with runtime_redis(tmp_path, maxmemory="8mb") as (port, data), fake_upstream(tmp_path) as upstream:
        plain = f"redis://127.0.0.1:{port}/0"
        from appliance.core.redis_auth import password_file

        settings = {"redis_password_file": str(password_file(data, "gateway")), "cache_max_bytes": str(cap),
                    "cache_max_entry_bytes": str(16 * 1024), "cache_max_ttl_s": "600", "cache_ttl_s": "60"}
        with gateway(tmp_path, plain, upstream, settings=settings) as gw:
            key = gw.create_key("tenant")
            admin = _login(data, port, "admin")
            before = set(admin.scan_iter(match="gw:key:*"))
            with gw.client(key["key"]) as client:
                for n in range(300):  # 300 distinct cacheable answers, several times what the cap holds
                    body = {"model": MODEL, "temperature": 0, "messages": [{"role": "user", "content": f"q{n}"}]}
                    response = client.post("/v1/chat/completions", json=body)
                    assert response.status_code == 200, response.text
                long_ttl = client.post("/v1/chat/completions", headers={"X-Cache-TTL": str(30 * 86400)},
                                       json={"model": MODEL, "temperature": 0,
                                             "messages": [{"role": "user", "content": "keep me a month"}]})
                assert long_ttl.status_code == 200
                again = client.post("/v1/chat/completions", json={"model": MODEL, "temperature": 1,
                                                                 "messages": [{"role": "user", "content": "again"}]})
            with gw.client(gw.admin_key) as admin_api:
                usage = admin_api.get("/admin/usage", params={"key_id": key["id"]}).json()["data"]
            after = set(admin.scan_iter(match="gw:key:*"))
            entries = list(admin.scan_iter(match="gw:cache:*", count=1000))
            ttls = [admin.ttl(k) for k in entries]
            counted = int(admin.get("gw:cache-meta:bytes") or 0)
            stored = sum(len(admin.get(k) or b"") for k in entries)
            memory = _memory(admin)
    assert again.status_code == 200  # the key still works
    assert before and before <= after  # no key record was pushed out
    assert counted <= cap and stored <= cap, (counted, stored)
    assert 0 < len(entries) < 300  # the oldest went to make room
    assert max(ttls) <= 600, "X-Cache-TTL above cache_max_ttl_s is lowered to it"
    assert memory["evicted_keys"] == 0 and memory["maxmemory_policy"] == "noeviction"
    assert sum(int(row["requests"]) for row in usage) == 302, usage  # every request's usage is still there


@pytest.mark.skipif(shutil.which("prometheus-redis-exporter") is None, reason="needs prometheus-redis-exporter")
def test_the_redis_exporter_scrapes_as_the_read_only_user_with_compose_s_own_command(tmp_path: Path) -> None:
    """compose.yaml's exporter command as it is (only the addresses and the secret's path swapped)."""
    import yaml

    from appliance.core.redis_auth import password_file

    service = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["redis-exporter"]
    shell, flag, script = service["command"]
    with runtime_redis(tmp_path) as (port, data):
        listen = free_port()
        script = (script.replace("$$", "$").replace("/run/secrets/redis_exporter", str(password_file(data, "exporter")))
                  .replace("redis://redis:6379", f"redis://127.0.0.1:{port}").replace(":9121", f"127.0.0.1:{listen}"))
        exporter = Service([shell, flag, script], {"PATH": "/usr/bin:/bin"}, tmp_path / "exporter.log")
        try:
            deadline, text = time.monotonic() + 20, ""
            while "redis_up" not in text and time.monotonic() < deadline:
                try:
                    text = httpx.get(f"http://127.0.0.1:{listen}/metrics", timeout=5).text
                except httpx.HTTPError:
                    time.sleep(0.2)
        finally:
            exporter.stop()
        logs = exporter.logs()
    assert "redis_up 1" in text and "NOPERM" not in logs, (text[-500:], logs[-1000:])
    assert "redis_memory_max_bytes 6.7108864e+07" in text  # INFO reached it: the 64mb cap
    assert password_file(data, "exporter").read_text().strip() not in logs + text


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(puts=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3000), st.integers(1, 5)), min_size=1, max_size=60),
       cap=st.integers(1024, 20_000))
def test_the_cache_store_keeps_its_books_under_the_cap(redis_url: str, puts: list[tuple[int, int, int]],
                                                       cap: int) -> None:
    """Any sequence of stores (same or new keys, any sizes): the counted bytes equal the indexed entries'
    sizes, never exceed the cap, and every indexed entry is one the books count."""
    from gateway.cache import CACHE_BYTES, CACHE_INDEX, CACHE_PUT, CACHE_SIZES, ENTRY_OVERHEAD_BYTES

    client = redis.Redis.from_url(redis_url)
    client.delete(CACHE_INDEX, CACHE_SIZES, CACHE_BYTES, *client.keys("gw:cache:prop*"))
    for name, size, ttl in puts:
        client.eval(CACHE_PUT, 4, f"gw:cache:prop{name}", CACHE_INDEX, CACHE_SIZES, CACHE_BYTES,
                    b"j" + b"x" * size, ttl, cap, 86400, ENTRY_OVERHEAD_BYTES, time.time())
        sizes = {k: int(v) for k, v in client.hgetall(CACHE_SIZES).items()}
        counted = int(client.get(CACHE_BYTES) or 0)
        assert counted == sum(sizes.values()) <= cap
        assert set(sizes) == set(client.zrange(CACHE_INDEX, 0, -1))
        stored = [k for k in client.keys("gw:cache:prop*")]
        assert set(stored) <= set(sizes)
    client.delete(CACHE_INDEX, CACHE_SIZES, CACHE_BYTES, *client.keys("gw:cache:prop*"))
    client.close()
