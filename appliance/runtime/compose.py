"""`--runtime compose`: the same verbs mapped onto `docker compose` and compose.yaml."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass

from appliance.runtime.local import RuntimeFailure
from appliance.runtime.settings import RuntimeSettings

__all__ = ["ComposeRuntime"]


@dataclass
class ComposeRuntime:
    settings: RuntimeSettings

    def _argv(self, *args: str) -> list[str]:
        docker = shutil.which("docker")
        if docker is None:
            raise RuntimeFailure("docker is not installed; use the local runtime (the default)")
        return [docker, "compose", "-f", str(self.settings.compose_file), *args]

    def _run(self, *args: str, capture: bool = False) -> str:
        argv = self._argv(*args)
        result = subprocess.run(argv, check=False, text=True, capture_output=capture)  # noqa: S603
        if result.returncode != 0:
            detail = (result.stderr or "").strip().splitlines()[-1:] if capture else []
            raise RuntimeFailure(f"`docker compose {' '.join(args)}` failed ({'; '.join(detail) or result.returncode})")
        return result.stdout or ""

    def up(self) -> None:
        self._run("up", "-d", "--wait", "--scale", f"inference={self.settings.workers}")

    def down(self) -> None:
        self._run("down", "--timeout", "60")

    def restart(self, service: str | None) -> None:
        self._run("restart", *([service] if service else []))

    def status(self) -> int:
        """0 healthy, 1 degraded, 2 down — from the containers' healthchecks."""
        raw = self._run("ps", "--format", "json", capture=True)
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if not rows:
            return 2
        healthy = [row.get("Health") in ("healthy", "") and row.get("State") == "running" for row in rows]
        return 0 if all(healthy) else 1

    def exec(self, service: str, *argv: str) -> str:
        return self._run("exec", "-T", service, *argv, capture=True)
