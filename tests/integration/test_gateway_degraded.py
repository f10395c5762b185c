"""Degraded modes with real processes: Redis killed mid-run, balancer down, a stream cut mid-way; TLS."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest

from tests.support.gateway_harness import TOKEN, assert_error_shape, fake_upstream, gateway, sse_events
from tests.support.processes import free_port, python_module, redis_server, run_service

pytestmark = pytest.mark.integration

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "temperature": 0}


def test_redis_killed_mid_run_no_5xx_for_cached_paths(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as (redis_proc, redis_url), fake_upstream(tmp_path) as upstream, \
            gateway(tmp_path, redis_url, upstream, settings={"key_cache_ttl_s": "60"}) as gw:
        key = gw.create_key("survivor")["key"]
        unverified = gw.create_key("never-used")["key"]
        with gw.client(key) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert client.post("/v1/chat/completions", json=CHAT).headers["x-cache"] == "HIT"
            redis_proc.stop()
            statuses = []
            for body in (CHAT, {**CHAT, "stream": True}, {**CHAT, "temperature": 1}):
                response = client.post("/v1/chat/completions", json=body)
                statuses.append(response.status_code)
                assert response.headers.get("x-cache") != "HIT"
            assert client.get("/v1/models").status_code == 200
            ready = client.get("/readyz")
        assert statuses == [200, 200, 200]
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert ready.json()["failing"] == ["redis"]
        with gw.client(unverified) as client:
            error = assert_error_shape(client.post("/v1/chat/completions", json=CHAT), 503)
            assert "Retry-After" in client.post("/v1/chat/completions", json=CHAT).headers
        assert error["type"] == "server_error"
        with gw.client(gw.admin_key) as admin:
            assert_error_shape(admin.get("/admin/keys"), 503)


def test_rate_limiter_fail_closed_refuses_when_redis_is_down(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as (redis_proc, redis_url), fake_upstream(tmp_path) as upstream, \
            gateway(tmp_path, redis_url, upstream, settings={"rate_limit_fail_open": "false"}) as gw:
        key = gw.create_key("closed")["key"]
        with gw.client(key) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            redis_proc.stop()
            response = client.post("/v1/chat/completions", json=CHAT)
        assert_error_shape(response, 503)
        assert response.headers["retry-after"]


def test_balancer_down_is_503_with_retry_after(tmp_path: Path, redis_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    # A body no other test sends: the session's Redis may hold another module's cached answer to CHAT.
    unseen = {**CHAT, "messages": [{"role": "user", "content": "is the balancer there?"}]}
    with gateway(tmp_path, redis_url, dead) as gw, gw.client(gw.admin_key) as client:
        for body in (unseen, {**unseen, "stream": True, "temperature": 1}):
            response = client.post("/v1/chat/completions", json=body)
            error = assert_error_shape(response, 503)
            assert response.headers["retry-after"] and error["code"] == "balancer_unavailable"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "balancer" in ready.json()["failing"]


def test_stream_cut_mid_way_ends_with_error_event_not_done(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    worker = f"http://127.0.0.1:{port}"
    argv = python_module("appliance.bench.fake_worker", "--port", str(port), "--model", "fake-model",
                         "--mode", "die-mid-stream")
    with run_service(argv, env={}, log_path=tmp_path / "fake-worker.log", ready_url=f"{worker}/health"), \
            gateway(tmp_path, redis_url, worker) as gw, gw.client(gw.admin_key) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        again = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = sse_events(response.text)
    assert response.status_code == 200
    assert events[-1][0] == "error" and json.loads(events[-1][1])["error"]["type"] == "server_error"
    assert ("message", "[DONE]") not in events
    assert again.headers["x-cache"] == "MISS"  # a broken stream is never cached


def test_tls_self_signed(tmp_path: Path, redis_url: str) -> None:
    with fake_upstream(tmp_path) as upstream, \
            gateway(tmp_path, redis_url, upstream, settings={"tls_self_signed": "true"}, scheme="https") as gw:
        cert = gw.data_dir / "tls" / "gateway.crt"
        assert (gw.data_dir / "tls" / "gateway.key").stat().st_mode & 0o777 == 0o600
        trusted = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=gw.url, verify=trusted, headers={"Authorization": f"Bearer {gw.admin_key}"}) \
                as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{gw.url}/healthz")  # not trusted without the certificate
        with pytest.raises(httpx.HTTPError):
            httpx.get(gw.url.replace("https", "http") + "/healthz", timeout=5)


def test_bad_configuration_exits_2_with_one_clear_message(tmp_path: Path) -> None:
    import subprocess

    env = {"APPLIANCE_GATEWAY_PORT": "99999", "APPLIANCE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
           "APPLIANCE_INTERNAL_TOKEN": TOKEN}
    done = subprocess.run(python_module("gateway"), env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 2
    assert b"APPLIANCE_GATEWAY_PORT" in done.stderr and b"Traceback" not in done.stderr
