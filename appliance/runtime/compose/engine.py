"""The Docker Engine and its compose front end, found once: `docker compose` (v2) or `docker-compose` (1.29).

Every failure is an :class:`EngineError` with one sentence for the operator (engine missing, daemon not
running, permission denied, a port already taken), never a traceback.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.runtime.protocol import RuntimeFailure

__all__ = ["Engine", "EngineError", "find_engine"]

_PORT_TAKEN = re.compile(
    r"(?:Bind for|listen tcp[^:]*:?) ?([0-9.:\[\]]*:\d+)[^\n]*?(?:port is already allocated|address already in use)"
)


class EngineError(RuntimeFailure):
    """The engine or compose could not do what was asked; the message is for the operator."""


def explain(stderr: str) -> str | None:
    """A one-line diagnosis of a docker/compose failure we recognise."""
    text = stderr.strip()
    if "port is already allocated" in text or "address already in use" in text:
        match = _PORT_TAKEN.search(text)
        where = f" ({match.group(1)})" if match else ""
        return (
            f"a published port is already taken{where}: stop what listens there or choose another port "
            "(APPLIANCE_GATEWAY_PUBLISH / APPLIANCE_PROMETHEUS_PUBLISH in .env)"
        )
    if "Cannot connect to the Docker daemon" in text or "Is the docker daemon running" in text:
        return "the Docker daemon is not running (start it: `sudo systemctl start docker`, or `sudo dockerd &`)"
    if "permission denied" in text and "docker.sock" in text:
        return "no permission on the Docker socket: run as root or add your user to the `docker` group"
    return None


@dataclass(frozen=True)
class Engine:
    docker: str
    compose: tuple[str, ...]  # argv prefix: ("docker", "compose") or ("docker-compose",)

    @property
    def compose_v1(self) -> bool:
        return self.compose[-1].endswith("docker-compose")

    def docker_argv(self, *args: str) -> list[str]:
        return [self.docker, *args]

    def run(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return _checked([self.docker, *args], check, timeout)

    def compose_run(
        self,
        files: list[Path],
        project: str,
        *args: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        capture: bool = True,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [*self.compose, "-p", project]
        for file in files:
            argv += ["-f", str(file)]
        return _checked([*argv, *args], check, timeout, env, capture)

    def image_exists(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0

    def image_size(self, name: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())

    def import_rootfs(self, root: Path, name: str) -> None:
        with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as tar:  # noqa: S603, S607
            result = subprocess.run(  # noqa: S603
                [self.docker, "import", "-", name],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0 or tar.returncode != 0:
            raise EngineError(f"docker import of {name} failed: {result.stderr.strip()}")

    def inspect(self, *names: str) -> list[dict[str, Any]]:
        if not names:
            return []
        result = self.run("inspect", *names, check=False)
        try:
            parsed = json.loads(result.stdout or "[]")
        except ValueError:
            return []
        return parsed if isinstance(parsed, list) else []


def _checked(
    argv: list[str], check: bool, timeout: float | None, env: dict[str, str] | None = None, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {**os.environ, **(env or {})}
    try:
        result = subprocess.run(  # noqa: S603
            argv,
            capture_output=capture,
            text=True,
            check=False,
            timeout=timeout,
            env=full_env,
        )
    except subprocess.TimeoutExpired:
        raise EngineError(f"`{' '.join(argv[:4])} …` did not finish within {timeout:.0f} s") from None
    if check and result.returncode != 0:
        stderr = result.stderr or ""
        reason = explain(stderr)
        if reason is None:
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit {result.returncode}"
        raise EngineError(
            f"`{Path(argv[0]).name} {' '.join(a for a in argv[1:3] if not a.startswith('-'))}` failed: {reason}"
        )
    return result


def find_engine() -> Engine:
    """The docker CLI plus a working compose; a clear error when either or the daemon is missing."""
    docker = shutil.which("docker")
    if docker is None:
        raise EngineError(
            "Docker is not installed: install Docker Engine (Debian: apt-get install docker.io "
            "docker-compose) or use the local runtime (the default, no Docker needed)"
        )
    probe = subprocess.run(  # noqa: S603
        [docker, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise EngineError(explain(probe.stderr or "") or f"the Docker Engine does not answer: {probe.stderr.strip()}")
    if subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:  # noqa: S603
        return Engine(docker, (docker, "compose"))
    legacy = shutil.which("docker-compose")
    if legacy is not None:
        return Engine(docker, (legacy,))
    raise EngineError(
        "neither `docker compose` (v2) nor `docker-compose` is installed (Debian: apt-get install docker-compose)"
    )
