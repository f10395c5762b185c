"""Gateway processes and fast fake upstreams on loopback, for the gateway's integration and e2e tests."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from appliance.bench.harness import wait_until
from tests.support.processes import Service, free_port, python_module, run_service
from tests.support.rag_service import TOKEN as RAG_TOKEN
from tests.support.rag_service import rag_process

TOKEN = "gateway-test-internal-token-padded-to-32-characters"


@dataclass
class Gateway:
    url: str
    admin_key: str
    service: Service
    data_dir: Path

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def create_key(self, name: str = "app", scopes: tuple[str, ...] = ("chat",), **limits: int) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "scopes": list(scopes), "limits": {"rpm": 0, **limits}}
        with self.client(self.admin_key) as admin:
            response = admin.post("/admin/keys", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())


@contextmanager
def fake_upstream(tmp: Path, model: str = "fake-model") -> Iterator[str]:
    """The fast fake balancer + RAG service (appliance.bench.fake_worker) as its own process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = python_module("appliance.bench.fake_worker", "--port", str(port), "--token", TOKEN, "--model", model)
    with run_service(argv, env={}, log_path=tmp / f"fake-{port}.log", ready_url=f"{url}/health"):
        yield url


@contextmanager
def gateway(tmp: Path, redis_url: str, balancer_url: str, rag_url: str | None = None,
            settings: Mapping[str, str] | None = None, data_dir: Path | None = None,
            scheme: str = "http", token: str = TOKEN, port: int | None = None,
            env_extra: Mapping[str, str] | None = None) -> Iterator[Gateway]:
    """``env_extra``: variables of other tables (``APPLIANCE_AUTH_*``); ``port``: one chosen beforehand (a
    redirect URL registered with an OpenID provider names it)."""
    port = port or free_port()
    data_dir = data_dir or tmp / f"gw-data-{port}"
    env = {
        "APPLIANCE_DATA_DIR": str(data_dir), "APPLIANCE_INTERNAL_TOKEN": token, "APPLIANCE_LOG_JSON": "true",
        "APPLIANCE_GATEWAY_PORT": str(port), "APPLIANCE_GATEWAY_REDIS_URL": redis_url,
        "APPLIANCE_GATEWAY_BALANCER_URL": balancer_url, "APPLIANCE_GATEWAY_RAG_URL": rag_url or balancer_url,
        "APPLIANCE_GATEWAY_MODEL_INFO_TTL_S": "2",
        # The test machine is shared and often overloaded; a dead Redis is still detected at once (refused).
        "APPLIANCE_GATEWAY_REDIS_TIMEOUT_S": "5",
    }
    env.update({f"APPLIANCE_GATEWAY_{k.upper()}": v for k, v in (settings or {}).items()})
    env.update(env_extra or {})
    url = f"{scheme}://127.0.0.1:{port}"
    ready = None if scheme == "https" else f"{url}/healthz"
    with run_service(python_module("gateway"), env=env, log_path=tmp / f"gateway-{port}.log", ready_url=ready,
                     ready_timeout=60) as service:
        if scheme == "https":
            _wait_tls(url, data_dir / "tls" / "gateway.crt", service)
        yield Gateway(url, (data_dir / "admin_key").read_text().strip(), service, data_dir)


def _wait_tls(url: str, cert: Path, service: Service) -> None:
    def answers() -> bool:
        try:
            trusted = ssl.create_default_context(cafile=str(cert))
            return cert.exists() and httpx.get(f"{url}/healthz", timeout=2, verify=trusted).status_code == 200
        except (httpx.HTTPError, OSError):
            return False

    wait_until(answers, 60, f"{url} ready over TLS", proc=service)


def assert_error_shape(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


def sse_events(raw: str) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        event, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        events.append((event, "\n".join(data)))
    return events


def last_upstream_body(upstream: str) -> dict[str, Any]:
    return dict(json.loads(httpx.get(f"{upstream}/_last", timeout=10).text))


@dataclass
class TwoGateways:
    """Two gateways over one real worker, the balancer and the RAG service (:func:`two_gateways`)."""

    gateways: list[Gateway]
    balancer: str
    worker: str

    @property
    def gw(self) -> Gateway:
        return self.gateways[0]

    def sdk(self, key: str, index: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateways[index].url}/v1", api_key=key, max_retries=0, timeout=120)


@contextmanager
def two_gateways(tmp: Path, model_path: Path, redis_url: str) -> Iterator[TwoGateways]:
    """A real worker (8 slots, 512 context), the balancer, the real RAG service and two gateways sharing Redis
    and one data dir (so one admin key)."""
    common = {"APPLIANCE_INTERNAL_TOKEN": RAG_TOKEN, "APPLIANCE_LOG_JSON": "true", "APPLIANCE_CONFIG": ""}
    wport, bport = free_port(), free_port()
    worker, balancer = f"http://127.0.0.1:{wport}", f"http://127.0.0.1:{bport}"
    worker_env = {**common, "APPLIANCE_DATA_DIR": str(tmp / "worker"), "APPLIANCE_WORKER_PORT": str(wport),
                  "APPLIANCE_WORKER_MODEL_PATH": str(model_path), "APPLIANCE_WORKER_SLOTS": "8",
                  "APPLIANCE_WORKER_N_CTX": "512", "APPLIANCE_WORKER_QUEUE_SIZE": "64",
                  "APPLIANCE_WORKER_MAX_TOKENS_CAP": "128"}
    balancer_env = {**common, "APPLIANCE_DATA_DIR": str(tmp / "balancer"), "APPLIANCE_BALANCER_PORT": str(bport),
                    "APPLIANCE_BALANCER_WORKERS": worker, "APPLIANCE_BALANCER_PROBE_INTERVAL_S": "0.5"}
    with run_service(python_module("inference"), env=worker_env, log_path=tmp / "worker.log",
                     ready_url=f"{worker}/health", ready_timeout=180), \
            run_service(python_module("balancer"), env=balancer_env, log_path=tmp / "balancer.log",
                        ready_url=f"{balancer}/health", ready_timeout=60), \
            rag_process(tmp / "rag") as (_, rag_url), \
            gateway(tmp, redis_url, balancer, rag_url, token=RAG_TOKEN, data_dir=tmp / "gw") as first, \
            gateway(tmp, redis_url, balancer, rag_url, token=RAG_TOKEN, data_dir=tmp / "gw") as second:
        yield TwoGateways([first, second], balancer, worker)
