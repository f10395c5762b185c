"""An engine stand-in for the compose runtime's unit tests, and offline bundles made with it."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from appliance.runtime.compose.bundle import write_bundle
from appliance.runtime.compose.engine import Engine

__all__ = ["SERVICES", "FakeEngine", "make_bundle", "rewrite_bundle"]

SERVICES = ["redis", "inference-1", "inference-2", "balancer", "rag", "gateway"]


class FakeEngine(Engine):
    """Answers `compose config --services`, `ps`, `inspect`, `save`, `load` like an idle engine would."""

    def __init__(self) -> None:
        super().__init__("docker", ("docker", "compose"))
        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "loaded", {})

    def run(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)  # type: ignore[attr-defined]
        stdout = ""
        if args[:2] == ("image", "inspect"):
            stdout = self.loaded.get(args[-1], "")  # type: ignore[attr-defined]
        elif args[0] == "save":
            Path(args[2]).write_bytes(b"layers of " + " ".join(args[3:]).encode())
        elif args[0] == "load":
            self.loaded.update({"app/one:1": "sha256:one", "app/two:1": "sha256:two"})  # type: ignore[attr-defined]
        return subprocess.CompletedProcess(list(args), 0, stdout, "")

    def compose_run(
        self, files: list[Path], project: str, *args: str, **_options: Any
    ) -> subprocess.CompletedProcess[str]:
        self.calls.append(("compose", *args))  # type: ignore[attr-defined]
        stdout = "\n".join(SERVICES) if args[:2] == ("config", "--services") else ""
        return subprocess.CompletedProcess(list(args), 0, stdout, "")

    def image_exists(self, name: str) -> bool:
        return name in self.loaded  # type: ignore[attr-defined]

    def inspect(self, *names: str) -> list[dict[str, Any]]:
        return []


def make_bundle(tmp_path: Path) -> tuple[FakeEngine, Path]:
    """A bundle of two fake images and one model under ``tmp_path``, and the engine that holds the images."""
    engine = FakeEngine()
    engine.loaded.update({"app/one:1": "sha256:one", "app/two:1": "sha256:two"})  # type: ignore[attr-defined]
    models = tmp_path / "models"
    models.mkdir()
    (models / "mine.gguf").write_bytes(b"GGUF" + os.urandom(64))
    result = write_bundle(engine, ["app/one:1", "app/two:1"], tmp_path / "b.tar", models, lambda _m: None)
    assert result.images == ["app/one:1", "app/two:1"] and result.files > 3
    return engine, result.archive


def rewrite_bundle(archive: Path, change: Any) -> Path:
    """A copy of the bundle with ``change(name, data) -> list[(name, data)]`` applied to each member."""
    out = archive.with_name("changed.tar")
    with tarfile.open(archive) as source, tarfile.open(out, "w") as target:
        for member in source:
            data = source.extractfile(member).read()  # type: ignore[union-attr]
            for name, payload in change(member.name, data):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                target.addfile(info, io.BytesIO(payload))
    return out
