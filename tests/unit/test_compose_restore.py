"""`appliance up --runtime compose` finishes an interrupted restore before compose starts a container, as the
local runtime's `up` does: a restore stopped after its commit point is rolled forward (the admin key to
``gateway/admin_key``, where the journal says the compose runtime keeps it), one stopped before it dropped.

The engine answers like an idle one and records what the data directory holds at the moment compose is
asked to start the stack, then stops there (no containers in a unit test; tests/e2e drives the real engine).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from appliance.backup.archive import ArchiveWriter
from appliance.backup.key import default_key_path, load_or_create_key
from appliance.backup.restore import RESTORE_DIR, restore_backup
from appliance.runtime.compose import ComposeRuntime
from appliance.runtime.compose.backup import ADMIN_KEY_PLACE
from appliance.runtime.compose.engine import EngineError
from appliance.runtime.compose.images import DEBIAN_IMAGES, PYTHON_IMAGES
from appliance.runtime.settings import RuntimeSettings
from tests.support.compose_engine import FakeEngine
from tests.support.processes import REPO, free_port


class Stopped(BaseException):
    """Stands in for the SIGKILL of tests/integration/test_backup_restore.py (the same code paths)."""


class EngineStoppingAtUp(FakeEngine):
    def compose_run(
        self, files: list[Path], project: str, *args: str, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        if args[:1] == ("up",):
            data = Path(kwargs["env"]["APPLIANCE_DATA_PATH"])
            object.__setattr__(self, "seen", _state(data))
            raise EngineError("stopped at compose up")
        return super().compose_run(files, project, *args, **kwargs)


def _state(data: Path) -> dict[str, Any]:
    key = data / ADMIN_KEY_PLACE
    return {
        "rag": (data / "rag" / "state.txt").read_text() if (data / "rag" / "state.txt").is_file() else None,
        "admin_key": key.read_text() if key.is_file() else None,
        "restore_dir": (data / RESTORE_DIR).exists(),
        "stray_admin_key": (data / "admin_key").exists(),
    }


@pytest.fixture
def stack(tmp_path: Path) -> ComposeRuntime:
    """A compose data directory in the "old" state, and the runtime over it with every image present."""
    (tmp_path / "empty.toml").write_text("")
    data = tmp_path / "data"
    (data / "rag").mkdir(parents=True)
    (data / "rag" / "state.txt").write_text("old")
    (data / "gateway").mkdir()
    (data / ADMIN_KEY_PLACE).write_text("admin-old")
    settings = RuntimeSettings(
        data_dir=data,
        compose_file=REPO / "compose.yaml",
        internal_token="t" * 32,
        gateway_port=free_port(),
        prometheus_port=free_port(),
    )
    engine = EngineStoppingAtUp()
    runtime = ComposeRuntime(settings, engine=engine)
    engine.loaded.update({runtime.image(name): "sha256:x" for name in [*PYTHON_IMAGES, *DEBIAN_IMAGES]})  # type: ignore[attr-defined]
    return runtime


def _new_archive(runtime: ComposeRuntime, tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    (source / "state.txt").write_text("new")
    (source / "admin_key").write_text("admin-new")
    writer = ArchiveWriter(tmp_path / "backups", load_or_create_key(default_key_path(runtime.data_path())))
    writer.add_file(source / "state.txt", "rag/state.txt")
    writer.add_file(source / "admin_key", "secrets/admin_key")
    return writer.finish()


def _restore_stopped_at(runtime: ComposeRuntime, archive: Path, milestone: str) -> None:
    def step(name: str) -> None:
        if name == milestone:
            raise Stopped(name)

    settings = runtime.settings.model_copy(update={"data_dir": runtime.data_path()})
    with pytest.raises(Stopped):
        restore_backup(settings, archive, step=step, places={"admin_key": ADMIN_KEY_PLACE})  # as compose_restore


@pytest.mark.parametrize("milestone", ["journal", "swap:rag:aside", "swap:rag:in", "swap:admin_key:aside"])
def test_up_rolls_a_restore_stopped_after_its_commit_point_forward_before_any_container_starts(
    stack: ComposeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, milestone: str
) -> None:
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "empty.toml"))
    _restore_stopped_at(stack, _new_archive(stack, tmp_path), milestone)
    assert (stack.data_path() / RESTORE_DIR / "journal.json").is_file()
    with pytest.raises(EngineError, match="stopped at compose up"):
        stack.up()
    seen = stack.docker.seen  # type: ignore[attr-defined]
    assert seen == {"rag": "new", "admin_key": "admin-new", "restore_dir": False, "stray_admin_key": False}
    assert (stack.data_path() / ADMIN_KEY_PLACE).stat().st_mode & 0o777 == 0o600


def test_up_drops_a_restore_stopped_before_its_commit_point(
    stack: ComposeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "empty.toml"))
    _restore_stopped_at(stack, _new_archive(stack, tmp_path), "staged")
    assert (stack.data_path() / RESTORE_DIR).is_dir()
    with pytest.raises(EngineError, match="stopped at compose up"):
        stack.up()
    seen = stack.docker.seen  # type: ignore[attr-defined]
    assert seen == {"rag": "old", "admin_key": "admin-old", "restore_dir": False, "stray_admin_key": False}
