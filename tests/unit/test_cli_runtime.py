"""The stack verbs, written once against the Runtime protocol, driven through the CLI with a recording runtime.

The real runtimes run in tests/e2e/test_runtime_lifecycle.py (local) and test_compose_appliance.py (compose);
here the CLI's own part: what it passes down, what it prints, what it remembers, how failures read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from appliance.backup.service import BackupResult, RestoreResult
from appliance.cli.app import create_app
from appliance.cli.context import state_file
from appliance.runtime.protocol import (
    DEGRADED,
    BackupStep,
    Intro,
    Restarted,
    Runtime,
    RuntimeFailure,
    Scaled,
    ServiceRow,
    Started,
    Status,
)
from appliance.runtime.settings import RuntimeSettings


@dataclass
class RecordingRuntime:
    """A Runtime that records each verb and answers what the test set."""

    settings: RuntimeSettings
    calls: list[tuple[str, Any]] = field(default_factory=list)
    failure: str | None = None
    stopped_note: str = " (the data stays)"
    schedules_backups: bool = False

    def _call(self, verb: str, *args: Any) -> None:
        self.calls.append((verb, args))
        if self.failure:
            raise RuntimeFailure(self.failure)

    def intro(self) -> Intro:
        return Intro("Starting the test stack", f"{self.settings.workers} workers", ("one note",))

    def up(self) -> Started:
        self._call("up")
        return Started("http://gw/", "http://gw/v1", self.settings.data_dir / "admin_key", healthy_in_s=1.5)

    def down(self) -> bool:
        self._call("down")
        return True

    def status(self) -> Status:
        self._call("status")
        row = ServiceRow("inference-1", False, {"state": "running", "health": "loading"})
        report = {"state": "degraded", "services": [{"name": "inference-1"}]}
        return Status(DEGRADED, report, ("state", "health"), (row,), errors=("one is late",), lines=("  more",))

    def restart(self, service: str | None, *, allow_outage: bool = False) -> Restarted:
        self._call("restart", service, allow_outage)
        return Restarted([], "Restarted", when_none="nothing was running")

    def scale(self, count: int) -> Scaled:
        self._call("scale", count)
        return Scaled(count, ["inference-3"], [])

    def upgrade(self, *, allow_outage: bool = False) -> list[str]:
        self._call("upgrade", allow_outage)
        return ["inference-1", "gateway"]

    def logs(self, service: str, *, follow: bool = False, lines: int = 100) -> None:
        self._call("logs", service, follow, lines)

    def backup(
        self, to: Path | None, *, with_models: bool, keep: int, offsite: Path | None, step: BackupStep
    ) -> BackupResult:
        self._call("backup", to, with_models, keep, offsite)
        return BackupResult(Path("a.tar.gz"), 3, 10, 2, Path("key"))

    def restore(self, archive: Path, *, dry_run: bool, key_file: Path | None, allow_unsigned: bool) -> RestoreResult:
        self._call("restore", archive, dry_run)
        raise NotImplementedError


@pytest.fixture
def made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[RecordingRuntime]:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "empty.toml"))
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NO_COLOR", "1")
    return []


def _cli(made: list[RecordingRuntime], *args: str, failure: str | None = None) -> tuple[int, str, str]:
    def runtime_for(settings: RuntimeSettings) -> Runtime:
        made.append(RecordingRuntime(settings, failure=failure))
        return made[-1]

    result = CliRunner().invoke(create_app(runtime_for), list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_up_passes_its_flags_down_prints_what_the_runtime_reports_and_remembers_them(
    made: list[RecordingRuntime],
) -> None:
    code, stdout, stderr = _cli(made, "up", "--workers", "3", "--json")
    assert code == 0 and made[0].settings.workers == 3 and made[0].calls == [("up", ())]
    report = json.loads(stdout)
    assert report["openai_base_url"] == "http://gw/v1" and report["healthy_in_s"] == 1.5
    assert "listen" not in report  # a runtime that does not choose the listen address does not report one
    assert "Starting the test stack (3 workers)" in stderr and "one note" in stderr
    assert json.loads(state_file(made[0].settings).read_text())["workers"] == 3
    _cli(made, "status")
    assert made[1].settings.workers == 3  # a later verb runs with what `up` was told


def test_a_refusal_is_one_sentence_and_remembers_nothing(made: list[RecordingRuntime]) -> None:
    code, _, stderr = _cli(made, "up", "--workers", "5", failure="compose.yaml defines 2 workers")
    assert code == 1 and stderr.splitlines()[-1] == "error: compose.yaml defines 2 workers"
    assert not state_file(made[0].settings).exists()


def test_status_prints_the_runtimes_table_and_exits_with_its_code(made: list[RecordingRuntime]) -> None:
    code, stdout, stderr = _cli(made, "status")
    assert code == DEGRADED and "one is late" in stderr
    assert "appliance: degraded" in stdout and "inference-1" in stdout and "loading" in stdout
    assert stdout.rstrip().endswith("more")
    code, stdout, _ = _cli(made, "status", "--json")
    assert code == DEGRADED and json.loads(stdout)["state"] == "degraded"


def test_verbs_reach_the_runtime_with_their_arguments(made: list[RecordingRuntime]) -> None:
    assert _cli(made, "restart", "inference", "--allow-outage")[2].strip() == "Restarted: nothing was running"
    code, _, stderr = _cli(made, "scale", "inference=3")
    assert code == 0 and "Scaled to 3 workers (added: inference-3, removed: none)" in stderr
    assert json.loads(state_file(made[1].settings).read_text())["workers"] == 3
    assert "Upgraded: inference-1, gateway" in _cli(made, "upgrade")[2]
    _cli(made, "logs", "gateway", "-n", "5")
    assert "Stopped (the data stays)." in _cli(made, "down")[2]
    assert [r.calls[0] for r in made] == [
        ("restart", ("inference", True)),
        ("scale", (3,)),
        ("upgrade", (False,)),
        ("logs", ("gateway", False, 5)),
        ("down", ()),
    ]


def test_scheduled_backups_are_refused_where_the_runtime_does_not_run_them(made: list[RecordingRuntime]) -> None:
    code, _, stderr = _cli(made, "backup", "--every", "6h")
    assert code == 1 and "--every and --offsite are for the local runtime" in stderr
    assert made[0].calls == []
    code, stdout, _ = _cli(made, "backup", "--json")
    assert code == 0 and json.loads(stdout)["archive"] == "a.tar.gz"
