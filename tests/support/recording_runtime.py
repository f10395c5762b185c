"""The recording runtime: a Runtime that records each verb the CLI passes down and answers what a test set.

The CLI's own part (what it passes down, prints, remembers, records) is tested through it; the real runtimes
run in tests/e2e/test_runtime_lifecycle.py (local) and test_compose_appliance.py (compose).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from appliance.backup.service import BackupResult, RestoreResult
from appliance.cli.app import create_app
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

__all__ = ["RecordingRuntime", "invoke"]


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


def invoke(made: list[RecordingRuntime], *args: str, failure: str | None = None) -> tuple[int, str, str]:
    def runtime_for(settings: RuntimeSettings) -> Runtime:
        made.append(RecordingRuntime(settings, failure=failure))
        return made[-1]

    result = CliRunner().invoke(create_app(runtime_for), list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr
