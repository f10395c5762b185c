"""The appliance as containers on this machine's Docker Engine, driven by the ``appliance`` CLI (e2e tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.support.processes import free_port, run_cli

__all__ = ["ComposeAppliance", "docker"]


def docker(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``docker ARGS``, its output captured."""
    binary = shutil.which("docker") or "docker"
    return subprocess.run([binary, *args], capture_output=True, text=True, check=check, timeout=timeout)


class ComposeAppliance:
    """The appliance as containers: `appliance … --runtime compose` as a subprocess, on free loopback ports and
    its own compose project."""

    def __init__(self, data_dir: Path) -> None:
        self.project = f"llm-appliance-e2e-{os.getpid()}"
        self.port = free_port()
        self.prometheus = free_port()
        self.gateway = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "APPLIANCE_RUNTIME_GATEWAY_HOST": "127.0.0.1",
            "APPLIANCE_RUNTIME_GATEWAY_PORT": str(self.port),
            "APPLIANCE_RUNTIME_PROMETHEUS_PORT": str(self.prometheus),
            "APPLIANCE_WORKER_SLOTS": "4",
            "NO_COLOR": "1",
        }
        for name in ("APPLIANCE_CONFIG", "COMPOSE_FILE", "APPLIANCE_INTERNAL_TOKEN"):
            self.env.pop(name, None)
        self.use(data_dir)

    def use(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env["APPLIANCE_DATA_DIR"] = str(data_dir)

    def cli(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return run_cli(args, env=self.env, timeout=timeout, check=check)

    def admin_key(self) -> str:
        return (self.data_dir / "gateway" / "admin_key").read_text().strip()

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway}/v1", api_key=key, max_retries=0, timeout=180)

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.gateway, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def container(self, service: str) -> dict[str, Any]:
        ids = docker(
            "ps",
            "-aq",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
        ).stdout.split()
        assert len(ids) == 1, (service, ids)
        info: dict[str, Any] = json.loads(docker("inspect", ids[0], check=True).stdout)[0]
        return info

    def leftovers(self) -> tuple[list[str], list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return (
            docker("ps", "-aq", "--filter", label).stdout.split(),
            docker("network", "ls", "-q", "--filter", label).stdout.split(),
        )

    def remove_everything(self) -> None:
        containers, networks = self.leftovers()
        if containers:
            docker("rm", "-f", *containers, timeout=300)
        if networks:
            docker("network", "rm", *networks)
