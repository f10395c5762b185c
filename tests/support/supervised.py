"""The appliance started by the ``appliance`` CLI under the local runtime (supervisord), for the e2e tests."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import xmlrpc.client
from pathlib import Path
from typing import Any

import openai
from supervisor.xmlrpc import SupervisorTransport

from appliance.runtime.local.supervisor_conf import socket_path
from tests.support.processes import REPO, free_port, run_cli

__all__ = ["SupervisedAppliance"]


class SupervisedAppliance:
    """The appliance under the local runtime (supervisord), driven by ``appliance`` run as a subprocess against
    one data dir on free ports (``cwd`` is where the admin stands)."""

    def __init__(self, data_dir: Path, cwd: Path = REPO, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.cwd = cwd
        base = free_port()
        while base + 2 > 65000 or any(_busy(base + i) for i in range(3)):
            base = free_port()
        self.env = {
            **os.environ,
            "APPLIANCE_DATA_DIR": str(data_dir),
            "APPLIANCE_RUNTIME_GATEWAY_PORT": str(free_port()),
            "APPLIANCE_RUNTIME_BALANCER_PORT": str(free_port()),
            "APPLIANCE_RUNTIME_WORKER_BASE_PORT": str(base),
            "APPLIANCE_RUNTIME_RAG_PORT": str(free_port()),
            "APPLIANCE_RUNTIME_REDIS_PORT": str(free_port()),
            "APPLIANCE_RUNTIME_PROMETHEUS_PORT": str(free_port()),
            "APPLIANCE_RUNTIME_EXPORTER_PORT": str(free_port()),
            "APPLIANCE_WORKER_SLOTS": "4",
            "NO_COLOR": "1",
            **(env or {}),
        }
        self.env.pop("APPLIANCE_CONFIG", None)
        self.port = int(self.env["APPLIANCE_RUNTIME_GATEWAY_PORT"])
        self.gateway = f"http://127.0.0.1:{self.port}"
        self.verify: bool | ssl.SSLContext = True

    def cli(self, *args: str, check: bool = True, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        return run_cli(args, env=self.env, cwd=self.cwd, timeout=timeout, check=check)

    def status(self) -> tuple[int, dict[str, Any]]:
        result = self.cli("status", "--json", check=False)
        return result.returncode, json.loads(result.stdout)

    def admin_key(self) -> str:
        return (self.data_dir / "admin_key").read_text().strip()

    def process(self, name: str) -> tuple[str, int]:
        """A program's state and pid as supervisord has them (its own socket: cheaper than a CLI run)."""
        transport = SupervisorTransport(None, None, f"unix://{socket_path(self.data_dir / 'run')}")
        with xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport) as supervisord:
            info: dict[str, Any] = supervisord.supervisor.getProcessInfo(name)  # type: ignore[assignment]
        return str(info["statename"]), int(info["pid"])

    def openai(self, key: str) -> openai.OpenAI:
        if self.verify is True:
            return openai.OpenAI(base_url=f"{self.gateway}/v1", api_key=key, max_retries=0, timeout=120)
        http = openai.DefaultHttpxClient(verify=self.verify, timeout=120)  # closed when collected, as the default
        return openai.OpenAI(base_url=f"{self.gateway}/v1", api_key=key, max_retries=0, timeout=120, http_client=http)


def _busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
